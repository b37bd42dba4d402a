#!/usr/bin/env python
"""Benchmark the kvcompress paged kernels against dense PyTorch SDPA (and flash-attn / FlashInfer).

Decode is memory-bound, so besides milliseconds the tables report the achieved bandwidth
``(K + V bytes read) / time`` and its share of the GPU's HBM bandwidth (H100 3.0 TB/s, H200 4.3 TB/s as
measured for this project, or ``--hbm-tbps``; other GPUs show n/a). Prefill also reports TFLOP/s of the causal
attention. A last table checks the issue's kernel targets (docs/GPU.md) against the measured points:
score accumulation within 10% of plain decode at >= 4k tokens per head; plain decode >= 70% of HBM at batch 8 x 16k
and >= 85% at batch 32 x >= 8k; paged prefill >= 0.8x SDPA-flash TFLOP/s at 4k-8k tokens.

    python scripts/bench_kernels.py                       # CUDA: full grid (bf16, 32/8/128), Markdown to stdout
    python scripts/bench_kernels.py --out bench.md        # ... and to a file
    python scripts/bench_kernels.py --hbm-tbps 4.8        # % HBM against another peak
    python scripts/bench_kernels.py --smoke               # CPU: tiny shapes under the Triton interpreter

On a machine without CUDA and without ``--smoke`` it exits with a message (interpreter timings say
nothing about GPU speed).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

HBM_BYTES_PER_S = {"H200": 4.3e12, "H100": 3.0e12}  # checked in this order ("H100" is not in "H200")


@dataclass
class Measurement:
    """One timed point: ``impl`` at (batch, context per head / prompt tokens)."""

    kind: str  # "decode" or "prefill"
    impl: str
    batch: int
    ctx: int
    ms: float
    nbytes: int  # K + V bytes the attention must read
    flops: float = 0.0  # prefill only

    def gbs(self) -> float:
        return self.nbytes / (self.ms * 1e-3) / 1e9

    def tflops(self) -> float:
        return self.flops / (self.ms * 1e-3) / 1e12


@dataclass
class Shape:
    heads_q: int
    heads_kv: int
    head_dim: int
    block_size: int
    dtype: torch.dtype


def _import_kernels():
    """Import after TRITON_INTERPRET is settled; fall back to the repo's kernels/ when not installed."""
    try:
        import kvcompress_kernels
    except ImportError:
        import importlib.util

        pkg = Path(__file__).resolve().parents[1] / "kernels"
        spec = importlib.util.spec_from_file_location(
            "kvcompress_kernels", pkg / "__init__.py", submodule_search_locations=[str(pkg)]
        )
        assert spec is not None and spec.loader is not None
        kvcompress_kernels = importlib.util.module_from_spec(spec)
        sys.modules["kvcompress_kernels"] = kvcompress_kernels
        spec.loader.exec_module(kvcompress_kernels)
    return kvcompress_kernels


def hbm_bandwidth(device: torch.device) -> float | None:
    """Peak HBM bytes/s for known GPUs (by device name), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn``: triton.testing.do_bench on CUDA, wall clock on CPU (smoke only)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def make_paged(batch: int, ctx: int, shape: Shape, device: torch.device, gen: torch.Generator):
    """A pool with ``ctx`` tokens per (seq, kv head) in randomly permuted blocks, plus the dense K/V copy
    ``[B, H_kv, ctx, D]`` the dense baselines read."""
    per_head = math.ceil(ctx / shape.block_size)
    num_blocks = batch * shape.heads_kv * per_head
    k_cache = torch.randn(num_blocks, shape.block_size, shape.head_dim, generator=gen).to(device, shape.dtype)
    v_cache = torch.randn(num_blocks, shape.block_size, shape.head_dim, generator=gen).to(device, shape.dtype)
    block_tables = torch.randperm(num_blocks, generator=gen).view(batch, shape.heads_kv, per_head)
    block_tables = block_tables.to(device, torch.int32)
    lengths = torch.full((batch, shape.heads_kv), ctx, dtype=torch.int32, device=device)
    flat = block_tables.long()
    dense_k = k_cache[flat].reshape(batch, shape.heads_kv, -1, shape.head_dim)[:, :, :ctx].contiguous()
    dense_v = v_cache[flat].reshape(batch, shape.heads_kv, -1, shape.head_dim)[:, :, :ctx].contiguous()
    return k_cache, v_cache, block_tables, lengths, dense_k, dense_v


def _row(m: Measurement, hbm: float | None, extra: str = "") -> str:
    pct = f"{100 * m.gbs() * 1e9 / hbm:.0f}%" if hbm else "n/a"
    return f"| {m.impl} | {m.batch} | {m.ctx} | {m.ms:.3f} | {m.gbs():.0f} | {pct} |{extra}"


def _optional_decode_baselines(q, dense_k, dense_v, scale):
    """flash-attn / FlashInfer decode closures over the dense K/V, when those packages import."""
    out: dict[str, Callable[[], object]] = {}
    try:
        from flash_attn import flash_attn_with_kvcache

        kc, vc = dense_k.transpose(1, 2).contiguous(), dense_v.transpose(1, 2).contiguous()  # [B, S, Hkv, D]
        out["flash-attn (dense)"] = lambda: flash_attn_with_kvcache(q[:, None], kc, vc, softmax_scale=scale)
    except Exception:  # noqa: BLE001 - optional baseline: any import/setup failure just skips it
        pass
    try:
        import flashinfer

        kv = [
            (dense_k[b].transpose(0, 1).contiguous(), dense_v[b].transpose(0, 1).contiguous())
            for b in range(q.shape[0])
        ]  # NHD per sequence
        out["flashinfer (per-seq)"] = lambda: [
            flashinfer.single_decode_with_kv_cache(q[b], k, v, sm_scale=scale) for b, (k, v) in enumerate(kv)
        ]
    except Exception:  # noqa: BLE001
        pass
    return out


def _decode_case(
    kk, shape: Shape, batch: int, ctx: int, device, reps: int, gen, hbm: float | None, record: list[Measurement]
) -> list[str]:
    """Table rows of one (batch, context) decode point; appends its measurements to ``record``."""
    scale = shape.head_dim**-0.5
    k_cache, v_cache, bt, lengths, dk, dv = make_paged(batch, ctx, shape, device, gen)
    q = torch.randn(batch, shape.heads_q, shape.head_dim, generator=gen).to(device, shape.dtype)
    score = torch.zeros(k_cache.shape[:2], device=device)
    nbytes = 2 * dk.numel() * dk.element_size()
    qd = q[:, :, None]
    fns = {
        "paged_decode": lambda: kk.paged_decode(q, k_cache, v_cache, bt, lengths, scale),
        "paged_decode + scores": lambda: kk.paged_decode(q, k_cache, v_cache, bt, lengths, scale, score_out=score),
        "SDPA (dense)": lambda: torch.nn.functional.scaled_dot_product_attention(
            qd, dk, dv, scale=scale, enable_gqa=True
        ),
        **_optional_decode_baselines(q, dk, dv, scale),
    }
    lines, plain = [], None
    for name, fn in fns.items():
        try:
            m = Measurement("decode", name, batch, ctx, time_ms(fn, device, reps), nbytes)
        except Exception as exc:  # noqa: BLE001 - an optional baseline failing is reported, not fatal
            if name.startswith("paged_"):
                raise
            lines.append(f"| {name} | {batch} | {ctx} | error: {type(exc).__name__} | | | |")
            continue
        record.append(m)
        plain = m.ms if name == "paged_decode" else plain
        overhead = f" {100 * (m.ms / plain - 1):+.1f}% |" if name == "paged_decode + scores" else " |"
        lines.append(_row(m, hbm, overhead))
    return lines


def bench_decode(
    kk,
    shape: Shape,
    batches: list[int],
    contexts: list[int],
    device,
    reps: int,
    hbm: float | None,
    record: list[Measurement],
) -> list[str]:
    """Markdown table: paged_decode with/without score accumulation vs dense baselines."""
    gen = torch.Generator().manual_seed(0)
    lines = [
        "### paged_decode vs dense SDPA",
        "",
        f"H_q={shape.heads_q} H_kv={shape.heads_kv} D={shape.head_dim} block={shape.block_size} "
        f"{str(shape.dtype).removeprefix('torch.')}",
        "",
        "| impl | batch | context/head | ms | GB/s | % HBM | score overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch in batches:
        for ctx in contexts:
            lines += _decode_case(kk, shape, batch, ctx, device, reps, gen, hbm, record)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return lines


def _prefill_case(
    kk, shape: Shape, tokens: int, device, reps: int, gen, hbm: float | None, record: list[Measurement]
) -> list[str]:
    """Table rows of one prompt length: a single sequence of ``tokens`` new tokens, no cached prefix."""
    scale = shape.head_dim**-0.5
    group = shape.heads_q // shape.heads_kv
    k_cache, v_cache, bt, lengths, dk, dv = make_paged(1, tokens, shape, device, gen)
    slots = bt.long()[0, :, :, None] * shape.block_size + torch.arange(shape.block_size, device=device)
    slots = slots.reshape(shape.heads_kv, -1)[:, :tokens]
    slot_pos = torch.zeros(k_cache.shape[:2], dtype=torch.int32, device=device)
    slot_pos.view(-1)[slots.reshape(-1)] = torch.arange(tokens, dtype=torch.int32, device=device).repeat(shape.heads_kv)
    q = torch.randn(tokens, shape.heads_q, shape.head_dim, generator=gen).to(device, shape.dtype)
    q_pos = torch.arange(tokens, dtype=torch.int32, device=device)
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    nbytes = 2 * dk.numel() * dk.element_size()
    flops = 4 * shape.heads_q * shape.head_dim * tokens * tokens / 2  # causal: half of QK^T and PV
    args = (q, k_cache, v_cache, slot_pos, bt, lengths, q_pos, cu, scale)
    qd = q.transpose(0, 1)[None]
    kd, vd = dk.repeat_interleave(group, dim=1), dv.repeat_interleave(group, dim=1)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if device.type == "cuda" else SDPBackend.MATH

    def run_sdpa():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale)

    fns = {
        "paged_prefill": lambda: kk.paged_prefill(*args),
        "paged_prefill + obs(32)": lambda: kk.paged_prefill(*args, obs_window=32, obs_power=2),
        f"SDPA {backend.name.lower()}": run_sdpa,
    }
    try:
        from flash_attn import flash_attn_func

        qf, kf, vf = q[None], dk.transpose(1, 2), dv.transpose(1, 2)
        fns["flash-attn"] = lambda: flash_attn_func(qf, kf, vf, causal=True, softmax_scale=scale)
    except Exception:  # noqa: BLE001 - optional baseline
        pass
    lines = []
    for name, fn in fns.items():
        try:
            m = Measurement("prefill", name, 1, tokens, time_ms(fn, device, reps), nbytes, flops)
        except Exception as exc:  # noqa: BLE001 - e.g. flash backend unavailable for this dtype/GPU
            if name.startswith("paged_"):
                raise
            lines.append(f"| {name} | 1 | {tokens} | error: {type(exc).__name__} | | | |")
            continue
        record.append(m)
        lines.append(_row(m, hbm, f" {m.tflops():.1f} |"))
    return lines


def bench_prefill(
    kk, shape: Shape, seq_lens: list[int], device, reps: int, hbm: float | None, record: list[Measurement]
) -> list[str]:
    """Markdown table: paged_prefill (with/without obs window) vs SDPA's flash backend and flash-attn."""
    gen = torch.Generator().manual_seed(1)
    lines = [
        "### paged_prefill vs SDPA flash backend",
        "",
        "| impl | batch | tokens | ms | GB/s | % HBM | TFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for tokens in seq_lens:
        lines += _prefill_case(kk, shape, tokens, device, reps, gen, hbm, record)
    return lines


def target_rows(record: list[Measurement], hbm: float | None) -> list[str]:
    """Markdown table of the issue's kernel targets, each evaluated at every measured point it applies to.

    * score accumulation: ``paged_decode + scores`` ms <= 1.10 x ``paged_decode`` ms, context >= 4096 per head;
    * bandwidth: ``paged_decode`` >= 70% of HBM at batch 8 x 16384, >= 85% at batch 32 x context >= 8192;
    * prefill: ``paged_prefill`` TFLOP/s >= 0.8 x SDPA flash TFLOP/s at 4096..8192 tokens.
    A target none of whose points was measured says so (the grid was changed on the command line)."""
    at = {(m.kind, m.impl, m.batch, m.ctx): m for m in record}
    lines = ["### Kernel targets (issue 11)", "", "| target | point | measured | goal | met |", "|---|---|---|---|---|"]

    def add(target: str, point: str, value: float | None, fmt: str, goal: str, met: bool | None) -> None:
        shown = "n/a" if value is None else fmt.format(value)
        lines.append(f"| {target} | {point} | {shown} | {goal} | {'n/a' if met is None else 'yes' if met else 'NO'} |")

    decode = sorted((m.batch, m.ctx) for m in record if m.kind == "decode" and m.impl == "paged_decode")
    scored = [(b, c) for b, c in decode if c >= 4096 and ("decode", "paged_decode + scores", b, c) in at]
    for b, c in scored:
        ratio = at["decode", "paged_decode + scores", b, c].ms / at["decode", "paged_decode", b, c].ms
        add("score accumulation overhead", f"B={b} ctx={c}", 100 * (ratio - 1), "{:+.1f}%", "<= +10%", ratio <= 1.10)
    if not scored:
        add("score accumulation overhead", "ctx >= 4096", None, "", "<= +10%", None)
    for batch, min_ctx, goal in ((8, 16384, 0.70), (32, 8192, 0.85)):
        points = [(b, c) for b, c in decode if b == batch and (c == min_ctx if batch == 8 else c >= min_ctx)]
        for b, c in points:
            frac = at["decode", "paged_decode", b, c].gbs() * 1e9 / hbm if hbm else None
            add(
                "decode bandwidth",
                f"B={b} ctx={c}",
                None if frac is None else 100 * frac,
                "{:.0f}% HBM",
                f">= {goal:.0%} HBM",
                None if frac is None else frac >= goal,
            )
        if not points:
            add(
                "decode bandwidth",
                f"B={batch} ctx{'=' if batch == 8 else '>='}{min_ctx}",
                None,
                "",
                f">= {goal:.0%} HBM",
                None,
            )
    sdpa = "SDPA flash_attention"
    prefill = sorted(
        m.ctx
        for m in record
        if m.kind == "prefill"
        and m.impl == "paged_prefill"
        and 4096 <= m.ctx <= 8192
        and ("prefill", sdpa, 1, m.ctx) in at
    )
    for t in prefill:
        ratio = at["prefill", "paged_prefill", 1, t].tflops() / at["prefill", sdpa, 1, t].tflops()
        add("prefill vs SDPA flash", f"T={t}", ratio, "{:.2f}x TFLOP/s", ">= 0.80x", ratio >= 0.8)
    if not prefill:
        add("prefill vs SDPA flash", "T in 4096..8192", None, "", ">= 0.80x", None)
    return lines


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=_ints, default=[1, 8, 32], help="comma-separated decode batch sizes")
    parser.add_argument(
        "--context",
        type=_ints,
        default=[1024, 4096, 8192, 16384, 32768],
        help="comma-separated decode context lengths per kv head",
    )
    parser.add_argument("--prefill", type=_ints, default=[1024, 4096, 8192], help="prefill prompt lengths")
    parser.add_argument("--heads-q", type=int, default=32)
    parser.add_argument("--heads-kv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument(
        "--hbm-tbps",
        type=float,
        help="HBM peak in TB/s for the %% HBM columns (default: by GPU "
        f"name: {', '.join(f'{k} {v / 1e12:.1f}' for k, v in HBM_BYTES_PER_S.items())})",
    )
    parser.add_argument("--reps", type=int, default=3, help="CPU smoke repetitions (CUDA uses do_bench)")
    parser.add_argument("--out", type=Path, help="also write the Markdown report to this file")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on CPU under the Triton interpreter: checks that the script runs",
    )
    args = parser.parse_args(argv)

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by the kernels)
        args.batch, args.context, args.prefill = [1, 2], [40, 100], [48]
        args.heads_q, args.heads_kv, args.head_dim, args.dtype, args.reps = 4, 2, 64, "fp32", 1
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(
            "bench_kernels: no CUDA device. GPU timings need a GPU; run with --smoke for a CPU check that the "
            "script works (Triton interpreter, meaningless times).",
            file=sys.stderr,
        )
        return 2
    else:
        device = torch.device("cuda")
    kk = _import_kernels()
    if args.smoke:
        if problem := kk.backend.interpreter_problem():
            print(f"bench_kernels: {problem}", file=sys.stderr)
            return 2
        kk.set_backend("triton")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shape = Shape(args.heads_q, args.heads_kv, args.head_dim, args.block_size, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter, smoke)"
    hbm = args.hbm_tbps * 1e12 if args.hbm_tbps else hbm_bandwidth(device)
    lines = [
        f"## kvcompress kernel benchmark: {name}",
        "",
        f"HBM peak used for %: {hbm / 1e12:.1f} TB/s" if hbm else "HBM peak: unknown device (n/a)",
        "",
    ]
    record: list[Measurement] = []
    lines += bench_decode(kk, shape, args.batch, args.context, device, args.reps, hbm, record) + [""]
    lines += bench_prefill(kk, shape, args.prefill, device, args.reps, hbm, record) + [""]
    lines += target_rows(record, hbm)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
