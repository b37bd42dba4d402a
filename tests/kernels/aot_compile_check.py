"""Compile every Triton kernel for an NVIDIA sm_90 target (TTIR -> PTX -> cubin via the bundled ptxas)
without a GPU. Run as a script in a fresh process: kernels must be defined with TRITON_INTERPRET unset.

The ops' Triton wrappers are called with small CPU tensors while each ``*_kernel`` launch is intercepted, so
the exact argument lists and constexprs the wrappers produce are what gets compiled. Exit status 1 lists
any kernel the real compiler rejects (the interpreter accepts some programs that the compiler does not).
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32", torch.int64: "i64"}


class _Capture:
    """Stands in for ``kernel[grid]`` and records the launch arguments instead of running."""

    def __init__(self, fn, sink: list) -> None:
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, num_warps: int = 4, **kwargs):
            self.sink.append((self.fn, args, kwargs, num_warps))

        return launch


def _compile(fn, args, kwargs, num_warps: int):
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    values = dict(zip(fn.arg_names, args, strict=False)) | kwargs
    signature, constexprs = {}, {}
    for name in fn.arg_names:
        value = values[name]
        if name in constexpr_names:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _DTYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    triton.compile(
        ASTSource(fn, signature, constexprs=constexprs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps},
    )


def main() -> int:
    mods = [importlib.import_module(f"kvcompress_kernels.{m}") for m in ("paged_decode", "paged_prefill", "cache_ops")]
    launches: list = []
    for mod in mods:
        for name, obj in vars(mod).copy().items():
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                setattr(mod, name, _Capture(obj, launches))
    decode, prefill, cache_ops = mods
    d, bs, nb = 128, 16, 64
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        kc, vc = torch.zeros(nb, bs, d, dtype=dtype), torch.zeros(nb, bs, d, dtype=dtype)
        pos, score = torch.zeros(nb, bs, dtype=torch.int32), torch.zeros(nb, bs)
        bt, lengths = torch.zeros(2, 2, 20, dtype=torch.int32), torch.full((2, 2), 300, dtype=torch.int32)
        q = torch.zeros(2, 8, d, dtype=dtype)
        slots = torch.arange(3)
        for bias in (None, torch.zeros(nb, bs)):  # and the summary slots' logit biases: every kernel's HAS_BIAS
            for splits in (1, 4):
                decode.paged_decode_triton(
                    q, kc, vc, bt, lengths, 0.1, score_out=score, num_splits=splits, slot_bias=bias
                )
            prefill.paged_prefill_triton(
                torch.zeros(20, 6, d, dtype=dtype),
                kc,
                vc,
                pos,
                bt,
                lengths,
                torch.zeros(20, dtype=torch.int32),
                torch.tensor([0, 7, 20], dtype=torch.int32),
                0.1,
                obs_window=4,
                slot_bias=bias,
            )
            rows, positions = torch.zeros(3, d), torch.zeros(3, dtype=torch.int32)
            cache_ops.write_kv_triton(kc, vc, pos, score, slots, rows, rows, positions, bias)
            cache_ops.compact_triton(kc, vc, pos, score, slots, slots + 3, bias)
    failures = []
    for fn, args, kwargs, num_warps in launches:
        try:
            _compile(fn, args, kwargs, num_warps)
        except Exception as exc:  # noqa: BLE001 - collect every failure, report at the end
            failures.append(f"{fn.__name__}: {type(exc).__name__}: {str(exc)[:2000]}")
    names = sorted({fn.__name__ for fn, *_ in launches})
    print(f"compiled {len(launches) - len(failures)}/{len(launches)} launches of {names}")
    print("\n".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
