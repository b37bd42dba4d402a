"""Speed and memory benchmarks of kvcompress (docs/BENCHMARKS.md), configured by ``conf/bench.yaml``.

    python experiments/bench.py                                   # all sections, embedded SmolLM2, lfu + global
    python experiments/bench.py sections=[throughput] repeats=5 throughput.workload.n_requests=16
    python experiments/bench.py policy=snapkv budget.allocation=uniform sections=[throughput]

Sections (each figure repeated ``repeats`` times, interleaved across ratios/systems so drift hits all alike):

* ``throughput``: (a) generated tokens/s and peak concurrent sequences against compression ratio on one fixed
  pool, (d) pool bytes in use; see :mod:`kvcompress.bench.throughput`.
* ``latency``: (b) one decode step against context length for HF dense, the paged cache, and the paged cache
  at ``latency.ratio``; see :mod:`kvcompress.bench.latency`.
* ``generation``: end-to-end greedy generation (prefill + decode) of one real prompt: HF ``generate`` against
  the paged cache uncompressed and at ``generation.ratio``; see :mod:`kvcompress.bench.generation`.
* ``overhead``: (c) a policy's decode bookkeeping plus continual compression as a % of decode time; see
  :mod:`kvcompress.bench.overhead`.
* ``evaluation``: ``evaluation.n_samples`` task samples evaluated through the engine together against one at a
  time (and a loop of HF ``generate`` calls); see :mod:`kvcompress.bench.evaluation`.

Every measurement is appended to ``rows.jsonl`` in the Hydra run directory as soon as it exists; re-running with
``hydra.run.dir=<that dir>`` skips what is there (resume). ``tables.md`` is rewritten at the end of each section.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kvcompress.bench.evaluation import evaluation_speed, task_items
from kvcompress.bench.generation import generation_speed, task_prompt
from kvcompress.bench.latency import decode_latency
from kvcompress.bench.overhead import compression_overhead
from kvcompress.bench.throughput import Workload, throughput_sweep
from kvcompress.budget import Budget, BudgetError
from kvcompress.compressor import Compressor
from kvcompress.experiment.policy_config import load_policy
from kvcompress.model import ModelNotFoundError, load_model

log = logging.getLogger("kvcompress.bench")
SECTIONS = ("throughput", "latency", "generation", "overhead", "evaluation")
MIB = 1 << 20


class Rows:
    """``rows.jsonl`` of a bench run: appended and flushed per measurement, read back to resume."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lines = path.read_text().splitlines() if path.exists() else []
        self.rows: list[dict[str, Any]] = [json.loads(line) for line in lines if line.strip()]

    def of(self, section: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["section"] == section]

    def add(self, section: str, row: dict[str, Any]) -> None:
        row = {"section": section, **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)


def _spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """``median [min–max]`` of repeated measurements."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def throughput_table(rows: list[dict[str, Any]]) -> str:
    by_ratio: dict[float, list[dict]] = defaultdict(list)
    for r in rows:
        by_ratio[r["ratio"]].append(r)
    base = statistics.median(r["tokens_per_s"] for r in by_ratio[1.0]) if 1.0 in by_ratio else None
    dbase = statistics.median(r["decode_tokens_per_s"] for r in by_ratio[1.0]) if 1.0 in by_ratio else None
    lines = [
        "| ratio | tokens/s median [min–max] | vs uncompressed | decode-phase tokens/s | vs uncompressed | "
        "peak concurrent seqs | mean decode batch | preemptions | peak pool MiB (of pool) | "
        "prompt compression (logical) | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ratio in sorted(by_ratio):
        rs = by_ratio[ratio]
        tps = [r["tokens_per_s"] for r in rs]
        dtps = [r["decode_tokens_per_s"] for r in rs]
        speedup = f"{statistics.median(tps) / base:.2f}x" if base else "n/a"
        dspeedup = f"{statistics.median(dtps) / dbase:.2f}x" if dbase else "n/a"
        lines.append(
            f"| {ratio:g} | {_spread(tps)} | {speedup} | {_spread(dtps)} | {dspeedup} | "
            f"{max(r['peak_running'] for r in rs)} | "
            f"{statistics.median(r['mean_decode_batch'] for r in rs):.1f} | "
            f"{statistics.median(r['preemptions'] for r in rs):g} | "
            f"{statistics.median(r['peak_pool_bytes'] for r in rs) / MIB:.1f} ({rs[0]['pool_bytes'] / MIB:.1f}) | "
            f"{statistics.median(r['prompt_logical_compression'] for r in rs):.1f}x | {len(rs)} |"
        )
    return "\n".join(lines)


def latency_table(rows: list[dict[str, Any]]) -> str:
    systems = list(dict.fromkeys(r["system"] for r in rows))
    contexts = sorted({r["context"] for r in rows})
    cell = {(r["system"], r["context"]): r for r in rows}
    lines = [
        "| context | "
        + " | ".join(f"{s} ms/step median [min–max] (vs hf_dense)" for s in systems)
        + " | KV MiB "
        + " / ".join(systems)
        + " |",
        "|---|" + "---|" * (len(systems) + 1),
    ]
    for c in contexts:
        cells, mem = [], []
        for s in systems:
            r = cell.get((s, c))
            if r is None:
                cells.append("-")
                mem.append("-")
                continue
            cells.append(
                f"{r['step_ms_median']:.1f} [{r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}] ({r['ratio_vs_hf']:.2f}x)"
            )
            mem.append(f"{r['kv_bytes'] / MIB:.1f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " | " + " / ".join(mem) + " |")
    return "\n".join(lines)


def generation_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"Prompt {rows[0]['prompt_tokens']} tokens, {rows[0]['new_tokens']} new tokens, "
        f"{rows[0]['repeats']} repeats.\n",
        "| system | wall s median [min–max] | new tokens/s | vs hf_dense (time) | same tokens as HF |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        same = "yes" if r["same_tokens_as_hf"] else "no"
        if "first_divergent_step" in r:  # a half-precision run that parted from HF's greedy path
            same += (
                f": from step {r['first_divergent_step']}, |Δlogit| ≤ {r['max_abs_logit_diff']:.3g} there, "
                f"HF's top-2 margin {r['hf_top2_margin']:.3g}"
            )
        lines.append(
            f"| {r['system']} | {r['wall_s_median']:.2f} [{r['wall_s_min']:.2f}–{r['wall_s_max']:.2f}] | "
            f"{r['tokens_per_s']:.1f} | {r['ratio_vs_hf']:.2f}x | {same} |"
        )
    return "\n".join(lines)


def overhead_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| policy | decode ms/step without policy | with policy | compress ms total (n) | overhead % median "
        "[min–max] |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['baseline_ms_per_step']:.1f} | {r['decode_ms_per_step']:.1f} | "
            f"{r['compress_ms_total']:.1f} ({r['n_compressions']}) | {r['overhead_pct']:.1f} "
            f"[{r['overhead_pct_min']:.1f}–{r['overhead_pct_max']:.1f}] |"
        )
    return "\n".join(lines)


def evaluation_table(rows: list[dict[str, Any]]) -> str:
    r0 = rows[0]
    lines = [
        f"{r0['n_samples']} samples of ~{r0['prompt_tokens_mean']:.0f} prompt tokens, {r0['repeats']} repeats.\n",
        "| system | sequences at once | compressed | wall s median [min–max] | samples/s | time vs one at a time | "
        "predictions as one at a time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = f"{r['predictions_matching']} / {r['n_samples']}" if "predictions_matching" in r else "-"
        lines.append(
            f"| {r['system']} | {r['max_seqs']} | {'yes' if r['compressed'] else 'no'} | "
            f"{r['wall_s_median']:.1f} [{r['wall_s_min']:.1f}–{r['wall_s_max']:.1f}] | {r['samples_per_s']:.2f} | "
            f"{r['time_vs_one_at_a_time']:.2f}x | {same} |"
        )
    return "\n".join(lines)


def write_tables(rows: Rows, out: Path, header: str) -> None:
    parts = [header]
    for section, fmt, title in (
        ("throughput", throughput_table, "(a, d) Throughput and pool memory against compression ratio"),
        ("latency", latency_table, "(b) Decode step latency against context length"),
        ("generation", generation_table, "(b) End-to-end generation: HF dense against the paged cache"),
        ("overhead", overhead_table, "(c) Compression overhead per policy"),
        ("evaluation", evaluation_table, "Evaluation: batched through the engine against one at a time"),
    ):
        if rows.of(section):
            parts += [f"\n## {title}\n", fmt(rows.of(section))]
    out.write_text("\n".join(parts) + "\n")


def _compressor_factory(cfg: DictConfig):
    budget_kw = OmegaConf.to_container(cfg.budget, resolve=True)

    def make(ratio: float) -> Compressor | None:
        if ratio == 1:
            return None
        return Compressor(instantiate(cfg.policy), Budget(**{**budget_kw, "ratio": ratio}))

    return make


def run_bench(cfg: DictConfig, out: Path) -> Path:
    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench section(s) {unknown}; accepted: {', '.join(SECTIONS)}")
    if cfg.warmup is not None and (not isinstance(cfg.warmup, int) or cfg.warmup < 0):
        raise ValueError(f"warmup={cfg.warmup!r}: give the number of untimed runs (0, 1, ...) or null (1 on CUDA)")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    loaded = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.device)
    model, tok = loaded.model, loaded.tokenizer
    rows = Rows(out / "rows.jsonl")
    device = torch.cuda.get_device_name() if model.device.type == "cuda" else platform.processor() or "cpu"
    header = (
        f"# kvcompress bench: {loaded.name}, {cfg.model.dtype} on {model.device.type} ({device}), "
        f"{torch.get_num_threads()} threads, policy {HydraConfig.get().runtime.choices.get('policy')} + "
        f"{cfg.budget.allocation}\n\nCommand: `python experiments/bench.py "
        + " ".join(HydraConfig.get().overrides.task)
        + "`"
    )
    tables = out / "tables.md"
    warmup = cfg.warmup if cfg.warmup is not None else int(model.device.type == "cuda")
    header += f"\n\nUntimed warm-up runs of each system before the timed ones: {warmup}"
    for section in cfg.sections:
        if section == "throughput":
            workload = Workload(**OmegaConf.to_container(cfg.throughput.workload, resolve=True))
            done = {(r["ratio"], r["repeat"]) for r in rows.of("throughput")}
            ratios = [float(r) for r in cfg.throughput.ratios]
            throughput_sweep(
                model, tok, ratios, _compressor_factory(cfg), workload, cfg.repeats, done, warmup=warmup,
                on_row=lambda row: (rows.add("throughput", row), log.info(
                    "throughput x%g repeat %d: %.1f tok/s, peak %d seqs, %d preemptions", row["ratio"],
                    row["repeat"], row["tokens_per_s"], row["peak_running"], row["preemptions"])),
            )  # fmt: skip
        elif section == "latency":
            done_ctx = {r["context"] for r in rows.of("latency")}
            for context in cfg.latency.contexts:
                if context in done_ctx:
                    continue
                for row in decode_latency(
                    model, [int(context)], ratio=float(cfg.latency.ratio), steps=int(cfg.latency.steps),
                    repeats=int(cfg.repeats), batch=int(cfg.latency.batch),
                ):  # fmt: skip
                    rows.add("latency", row)
                log.info("latency at %d tokens done", context)
        elif section == "generation" and not rows.of("generation"):
            ratio = float(cfg.generation.ratio)
            ids = task_prompt(tok, int(cfg.generation.prompt_tokens))
            compressed = {f"paged_x{ratio:g}": partial(_compressor_factory(cfg), ratio)}
            for row in generation_speed(
                model, ids, int(cfg.generation.new_tokens), int(cfg.repeats), compressed, warmup
            ):
                rows.add("generation", row)
            log.info("generation done")
        elif section == "overhead":
            done_pol = {r["policy"] for r in rows.of("overhead")}
            for name in cfg.overhead.policies:
                if name in done_pol:
                    continue
                try:
                    policy = load_policy(name)
                except ValueError as err:
                    raise ValueError(f"overhead.policies: {err}") from err
                for row in compression_overhead(
                    model, tok, {name: policy}, ratio=float(cfg.overhead.ratio), context=int(cfg.overhead.context),
                    steps=int(cfg.overhead.steps), compress_every=int(cfg.overhead.compress_every),
                    repeats=int(cfg.repeats), warmup=warmup,
                ):  # fmt: skip
                    rows.add("overhead", row)
                log.info("overhead of %s done", name)
        elif section == "evaluation" and not rows.of("evaluation"):
            ev = cfg.evaluation
            items = task_items(loaded, str(ev.task), int(ev.n_samples), int(ev.prompt_tokens))
            budget = Budget(**{**OmegaConf.to_container(cfg.budget, resolve=True), "ratio": float(ev.ratio)})
            comp = Compressor(instantiate(cfg.policy), budget)
            for row in evaluation_speed(
                loaded, items, comp, int(ev.max_seqs), int(cfg.repeats), hf_loop=ev.hf_loop, warmup=warmup
            ):
                rows.add("evaluation", row)
            log.info("evaluation done")
        write_tables(rows, tables, header)
    print(tables.read_text())
    return tables


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    try:
        run_bench(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (BudgetError, ModelNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
