"""One experiment run: model x policy x budget x task x seed, evaluated into a run directory.

:func:`run_experiment` is what ``experiments/run.py`` calls with the composed Hydra config. It builds the task's
samples and their prompts, checks every prompt against the model context and the budget before generating
anything, then evaluates the samples not yet in ``predictions.jsonl`` (see :mod:`kvcompress.experiment.records`)
together through one :class:`~kvcompress.engine.Engine` (``engine.max_seqs`` at a time), writing each sample's
record as it finishes, and finally writes ``summary.json``. With ``fidelity=true`` it then teacher-forces the full
cache's answer to each sample through the run's cache (:mod:`kvcompress.experiment.fidelity`) into
``fidelity.jsonl``, resumed like the predictions, and adds the means to the summary.

Modes (docs/EXPERIMENTS.md, "Prompts and modes"): ``query_aware`` prefills context + question, compresses, decodes.
``query_agnostic`` prefills and compresses each distinct context once (samples sharing a ``context_id``),
forks the compressed context per question, prefills the question without letting the policy observe it, decodes
and releases the fork.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from kvcompress.budget import Budget
from kvcompress.cache.paged import MemoryStats
from kvcompress.compressor import Compressor
from kvcompress.engine import Engine, peak_tokens
from kvcompress.experiment.fidelity import answers_by_sample, fidelity_row
from kvcompress.experiment.prompts import ExperimentError, Prompt, bind_tokenizer, build_prompt, check_fits
from kvcompress.experiment.records import (
    FIDELITY,
    PREDICTIONS,
    SUMMARY,
    BaselineStore,
    PredictionsLog,
    finished_summary,
    read_records,
    write_json_atomic,
)
from kvcompress.generate import MODES, as_request
from kvcompress.model import LoadedModel, load_model
from kvcompress.model_runner import paged_attention
from kvcompress.policies.base import Policy
from kvcompress.sequence import RequestOutput
from kvcompress.tasks.base import Sample
from kvcompress.tasks.metrics import score
from kvcompress.tasks.registry import TASKS, build_task

log = logging.getLogger(__name__)

# task config keys that are not constructor arguments of the task class
TASK_RUN_KEYS = ("name", "mode", "max_new_tokens")
# friendlier config names for constructor arguments (``task.path`` -> ``data_dir`` of LongBench, ...)
TASK_ALIASES = {"path": "data_dir", "subset": "subsets"}
# test hook: SIGKILL this process after N predictions were written (simulates a crash for resume tests)
KILL_AFTER_ENV = "KVCOMPRESS_TEST_KILL_AFTER"


@dataclass
class RunContext:
    """What the runner needs besides the config: where to write and what the sweep calls things."""

    run_dir: Path
    policy_name: str
    baselines_dir: Path | None = None
    progress: bool = True


@dataclass
class Item:
    """A sample with its prompt ids."""

    sample: Sample
    prompt: Prompt
    max_new_tokens: int


def file_sha1(path: str | None) -> str | None:
    """The SHA-1 of a file's bytes (None for no path or a missing file)."""
    file = Path(str(path)).expanduser() if path else None
    return hashlib.sha1(file.read_bytes()).hexdigest() if file is not None and file.is_file() else None


def fingerprint(cfg: DictConfig) -> str:
    """Hash of everything that changes a run's predictions (the logger and bookkeeping paths do not)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    for key in ("logger", "baselines_dir", "progress", "threads", "engine", "fidelity"):
        data.pop(key, None)
    budget = data.get("budget") or {}
    later = (
        "allocator_args",
        "protected_fraction",
        "summary_slots",
        "summary_kmeans",
        "summary_fit",
        "summary_spread",
        "summary_shared_value",
        "summary_offset",
        "summary_sketch",
        "summary_max_ratio",
        "summary_layers",
    )
    for key in later:  # fields added later: left unset (or 0), older runs keep their hash
        if budget.get(key) in (None, {}, 0):
            budget.pop(key, None)
    if budget.get("summary_fit_value", True) is True:  # added later, default true
        budget.pop("summary_fit_value", None)
    if budget.get("summary_sketch_tails", "uniform") == "uniform":  # added later, default uniform
        budget.pop("summary_sketch_tails", None)
    if budget.get("summary_offset"):  # a file: its content decides the predictions, not its name alone
        budget["summary_offset_sha1"] = file_sha1(budget["summary_offset"])
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def baseline_key(cfg: DictConfig) -> str:
    """Key under which a full-cache score is shared: model, task config (mode included) and seed."""
    data = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "seed": cfg.seed,
    }
    digest = hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{cfg.task.name}-{model_name(cfg)}-s{cfg.seed}-{digest}"


def model_name(cfg: DictConfig) -> str:
    """The model's short name in outputs: ``model.name`` or the last component of its path."""
    return str(cfg.model.get("name") or Path(str(cfg.model.name_or_path)).name)


def task_kwargs(cfg: DictConfig, tokenizer: Any) -> dict[str, Any]:
    """Constructor arguments of the configured task class, from ``cfg.task`` plus tokenizer and seed."""
    name = str(cfg.task.name)
    if name not in TASKS:
        raise ExperimentError(f"unknown task.name {name!r}; accepted: {', '.join(sorted(TASKS))}")
    accepted = set(inspect.signature(TASKS[name]).parameters)
    given = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k not in TASK_RUN_KEYS}
    kwargs: dict[str, Any] = {}
    for key, value in given.items():
        target = key if key in accepted else TASK_ALIASES.get(key, key)
        if target in accepted:
            kwargs[target] = value
        elif key != "n_samples":  # n_samples is applied by the runner for tasks without it
            raise ExperimentError(f"task {name!r} has no option {key!r}; it accepts: {', '.join(sorted(accepted))}")
    for key, value in (("tokenizer", tokenizer), ("seed", cfg.seed)):
        if key in accepted:
            kwargs[key] = value
    return kwargs


def load_samples(cfg: DictConfig, tokenizer: Any) -> list[Sample]:
    """The task's samples, capped at ``task.n_samples`` when the task class does not take that option."""
    kwargs = task_kwargs(cfg, tokenizer)
    try:
        task = build_task(str(cfg.task.name), **kwargs)
    except TypeError as err:  # e.g. a required option left unset
        raise ExperimentError(f"task {cfg.task.name!r}: {err}") from err
    samples = task.samples()
    n = cfg.task.get("n_samples")
    if n is not None and "n_samples" not in kwargs:
        samples = samples[: int(n)]
    if not samples:
        raise ExperimentError(f"task {cfg.task.name!r} produced no samples")
    return samples


def build_compressor(policy: Policy, cfg: DictConfig) -> Compressor:
    """A compressor for ``policy`` under ``cfg.budget`` (budget and composition errors name the fix)."""
    budget = Budget(**OmegaConf.to_container(cfg.budget, resolve=True))
    try:
        return Compressor(policy, budget)
    except ValueError as err:
        raise ExperimentError(str(err)) from err


def prepare(samples: list[Sample], cfg: DictConfig, loaded: LoadedModel, comp: Compressor) -> list[Item]:
    """Prompts for every sample, checked against the model context and the budget before any generation."""
    max_positions = int(loaded.model.config.max_position_embeddings)
    override = cfg.task.get("max_new_tokens")
    items = []
    for sample in samples:
        prompt = build_prompt(loaded.tokenizer, sample)
        new_tokens = int(override) if override is not None else sample.max_new_tokens
        check_fits(prompt, new_tokens, max_positions, sample.sample_id)
        if comp.active:
            comp.budget.check(prompt.compressed_len(cfg.task.mode), comp.policy.sinks)
        items.append(Item(sample, prompt, new_tokens))
    return items


def eos_ids(loaded: LoadedModel) -> list[int]:
    """Token ids that end generation: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids = {loaded.tokenizer.eos_token_id}
    gen_eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def memory_fields(before: MemoryStats, after: MemoryStats) -> dict[str, Any]:
    """Per-sample cache accounting: when decoding began (prompt compressed) and at the end of decoding."""
    return {
        "tokens_seen": before.tokens_seen,
        "tokens_kept": before.tokens_kept,
        "dense_bytes": before.dense_bytes,
        "logical_compression": before.logical_compression,
        "physical_compression": before.physical_compression,
        "kv_bytes": before.allocated_bytes,
        "kv_bytes_end": after.allocated_bytes,
    }


def evaluate(
    loaded: LoadedModel,
    comp: Compressor,
    items: list[Item],
    mode: str,
    engine_cfg: dict[str, Any],
    forced: dict[str, list[int]] | None = None,
) -> Iterator[dict[str, Any]]:
    """Evaluate ``items`` together through one :class:`Engine` (batched up to ``engine_cfg["max_seqs"]``);
    yields one record per sample as soon as it finishes, in finishing order.

    Query-agnostic samples that share a context share one prefill of it (``share_prefix`` = the context id), and
    the compressed context is forked per question. With ``forced`` (sample id -> answer tokens) each sample
    teacher-forces its answer instead of generating, and the records are fidelity records (:func:`fidelity_record`).
    """
    eos = eos_ids(loaded)
    requests = [
        as_request(
            it.sample.sample_id,
            it.prompt.context_ids,
            it.prompt.question_ids,
            mode,
            len(forced[it.sample.sample_id]) if forced else it.max_new_tokens,
            eos,
            suffix=it.prompt.suffix_ids,
            share_prefix=it.sample.context_id if mode == "query_agnostic" else None,
            forced_ids=forced[it.sample.sample_id] if forced else (),
        )
        for it in items
    ]
    active = comp if comp.active else None
    longest = max(peak_tokens(r, active) for r in requests)
    engine = Engine(loaded.model, active, max_tokens_per_head=longest, **engine_cfg)
    for request in requests:
        engine.add_request(request)
    by_id = {it.sample.sample_id: it for it in items}
    with paged_attention(loaded.model):
        while engine.has_unfinished:
            for out in engine.step():
                it = by_id[out.request_id]
                yield fidelity_record(it, out) if forced else record(loaded, it, out)


def record(loaded: LoadedModel, it: Item, out: RequestOutput) -> dict[str, Any]:
    """The ``predictions.jsonl`` line of one finished sample."""
    prediction = loaded.tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
    s = it.sample
    assert out.memory is not None and out.memory_end is not None
    return {
        "sample_id": s.sample_id,
        "task": s.task,
        "context_id": s.context_id,
        "prediction": prediction,
        "answers": s.answers,
        "metric": s.metric,
        "score": score(s.metric, prediction, s.answers, s),
        "prompt_tokens": len(it.prompt),
        "context_tokens": len(it.prompt.context_ids),
        "new_tokens": len(out.tokens),
        "output_ids": list(out.tokens),
        **memory_fields(out.memory, out.memory_end),
        "prefill_s": out.prefill_s,
        "decode_s": out.decode_s,
        "compress_s": out.compress_s,
        "reconstruct_s": out.reconstruct_s,
        "time_s": out.prefill_s + out.decode_s + out.compress_s + out.reconstruct_s,
    }


def fidelity_record(it: Item, out: RequestOutput) -> dict[str, Any]:
    """The ``fidelity.jsonl`` line of one sample whose full-cache answer was teacher-forced."""
    return {"sample_id": it.sample.sample_id, "task": it.sample.task, **fidelity_row(out)}


def full_answers(cfg: DictConfig, ctx: RunContext, tokenizer: Any) -> tuple[dict[str, list[int]], Path]:
    """The answer tokens of the full-cache run recorded under this run's baseline key, and its run directory.
    Raises ``ExperimentError`` when there is none."""
    key = baseline_key(cfg)
    source = BaselineStore(ctx.baselines_dir).source(key) if ctx.baselines_dir is not None else None
    if source is None or not (source / PREDICTIONS).exists():
        raise ExperimentError(
            f"fidelity=true forces the full cache's answers through this run's cache, but baselines_dir="
            f"{ctx.baselines_dir} records no full-cache run of this model, task, mode and seed (key {key}); run "
            "policy=full with the same task settings first (with fidelity=true it also records its own answer NLL)"
        )
    return answers_by_sample(read_records(source), tokenizer), source


def answer_fidelity(
    cfg: DictConfig,
    ctx: RunContext,
    loaded: LoadedModel,
    comp: Compressor,
    items: list[Item],
    records: list[dict[str, Any]],
    full: tuple[dict[str, list[int]], Path] | None,
) -> dict[str, Any]:
    """Force the full cache's answer to every sample (an empty answer is skipped) through this run's cache,
    appending to ``fidelity.jsonl`` as samples finish (a rerun resumes); returns the summary's fidelity fields: the
    means of ``answer_nll``, ``answer_match`` and ``answer_worst`` over ``answer_n`` samples, and
    ``answer_nll_full``, the full cache's own mean NLL, when its run recorded one. ``full`` is
    :func:`full_answers` for a compressed run; None takes this uncompressed run's own ``records``."""
    forced, source = full if full is not None else (answers_by_sample(records, loaded.tokenizer), None)
    missing = sorted({it.sample.sample_id for it in items} - forced.keys())
    if missing:
        raise ExperimentError(f"the full-cache run has no prediction for {len(missing)} samples ({missing[0]}, ...)")
    done = PredictionsLog(ctx.run_dir, fingerprint(cfg), FIDELITY)
    pending = [it for it in items if forced[it.sample.sample_id] and it.sample.sample_id not in done]
    if pending:
        engine_cfg = OmegaConf.to_container(cfg.engine, resolve=True) if "engine" in cfg else {}
        bar = tqdm(total=len(pending), desc="fidelity", disable=not ctx.progress)
        for rec in evaluate(loaded, comp, pending, str(cfg.task.mode), engine_cfg, forced):
            done.append(rec)
            bar.update(1)
        bar.close()
    rows = [done.records[it.sample.sample_id] for it in items if it.sample.sample_id in done]
    fields = {f"answer_{k}": sum(r[k] for r in rows) / len(rows) if rows else None for k in ("nll", "match", "worst")}
    full_run = finished_summary(source) if source is not None else None  # the full cache's run, when compressed
    fields["answer_nll_full"] = (full_run or {}).get("answer_nll") if source is not None else fields["answer_nll"]
    return {**fields, "answer_n": len(rows)}


def _kill_hook() -> Callable[[int], None]:
    limit = os.environ.get(KILL_AFTER_ENV)

    def check(written: int) -> None:
        if limit is not None and written >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)

    return check


def summarize(
    cfg: DictConfig,
    ctx: RunContext,
    loaded: LoadedModel,
    records: list[dict[str, Any]],
    wall_s: float,
    compressed: bool,
) -> dict[str, Any]:
    """The ``summary.json`` content (the keys docs/EXPERIMENTS.md "Outputs" promises first) from the records.

    ``compression_ratio`` is the nominal ratio the cache was held to: ``budget.ratio``, or 1 when nothing was
    compressed (``policy=full``); ``budget_ratio`` always holds the configured value.
    """
    n = len(records)
    total = {
        k: sum(r[k] for r in records)
        for k in (
            "tokens_seen",
            "tokens_kept",
            "dense_bytes",
            "kv_bytes",
            "new_tokens",
            "prompt_tokens",
            "prefill_s",
            "decode_s",
            "reconstruct_s",
            "time_s",
        )
    }
    per_task: dict[str, dict[str, float]] = {}
    for r in records:
        entry = per_task.setdefault(r["task"], {"score": 0.0, "n_samples": 0})
        entry["score"] += r["score"]
        entry["n_samples"] += 1
    for entry in per_task.values():
        entry["score"] /= entry["n_samples"]
    mean_score = sum(r["score"] for r in records) / n
    return {
        "model": model_name(cfg),
        "policy": ctx.policy_name,
        "task": str(cfg.task.name),
        "mode": str(cfg.task.mode),
        "compression_ratio": float(cfg.budget.ratio) if compressed else 1.0,
        "logical_compression": total["tokens_seen"] / max(total["tokens_kept"], 1),
        "physical_compression": total["dense_bytes"] / max(total["kv_bytes"], 1),
        "score": mean_score,
        "n_samples": n,
        "kv_bytes_allocated_peak": max(r["kv_bytes_end"] for r in records),
        "wall_s": wall_s,
        "allocation": str(cfg.budget.allocation),
        "allocator_args": dict(OmegaConf.to_container(cfg.budget, resolve=True).get("allocator_args") or {}),
        "budget_ratio": float(cfg.budget.ratio),
        "max_cache_tokens": cfg.budget.max_cache_tokens,
        "protected_window": int(cfg.budget.protected_window),
        "protected_fraction": cfg.budget.get("protected_fraction"),
        "summary_slots": int(cfg.budget.get("summary_slots") or 0),
        "summary_kmeans": int(cfg.budget.get("summary_kmeans") or 0),
        "summary_fit": int(cfg.budget.get("summary_fit") or 0),
        "summary_fit_value": bool(cfg.budget.get("summary_fit_value", True)),
        "summary_spread": bool(cfg.budget.get("summary_spread") or False),
        "summary_shared_value": bool(cfg.budget.get("summary_shared_value") or False),
        "summary_offset": cfg.budget.get("summary_offset"),
        "summary_offset_sha1": file_sha1(cfg.budget.get("summary_offset")),
        "summary_sketch": int(cfg.budget.get("summary_sketch") or 0),
        "summary_sketch_tails": cfg.budget.get("summary_sketch_tails", "uniform"),
        "summary_max_ratio": cfg.budget.get("summary_max_ratio"),
        "summary_layers": cfg.budget.get("summary_layers"),
        "seed": int(cfg.seed),
        "per_task": per_task,
        "kv_bytes_mean": total["kv_bytes"] / n,
        "prompt_tokens_mean": total["prompt_tokens"] / n,
        "tokens_per_s": total["new_tokens"] / max(total["decode_s"], 1e-9),
        "prefill_tokens_per_s": total["prompt_tokens"] / max(total["prefill_s"], 1e-9),
        "samples_s": total["time_s"],
        "reconstruct_s": total["reconstruct_s"],
        "model_path": str(loaded.path),
        "policy_params": OmegaConf.to_container(cfg.policy, resolve=True),
        "config_hash": fingerprint(cfg),
        "full_cache_score": None,
        "score_pct_of_full": None,
        "complete": True,
    }


def run_experiment(cfg: DictConfig, ctx: RunContext, policy: Policy) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate every sample not yet in ``predictions.jsonl`` and write ``summary.json``.

    Returns the summary and the per-sample records (in task order).
    """
    t_start = time.perf_counter()
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # a missing ??? value fails before any work
    if cfg.task.mode not in MODES:
        raise ExperimentError(f"task.mode must be one of {', '.join(MODES)}, got {cfg.task.mode!r}")
    comp = build_compressor(policy, cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model.name_or_path, cfg.model.dtype, cfg.model.device)
    bind_tokenizer(policy, loaded.tokenizer)
    items = prepare(load_samples(cfg, loaded.tokenizer), cfg, loaded, comp)
    ids = [it.sample.sample_id for it in items]
    if len(set(ids)) != len(ids):
        raise ExperimentError(f"task {cfg.task.name!r} yields duplicate sample ids; cannot resume safely")

    # a compressed run's fidelity forces the full-cache run's answers: read (or miss) them before generating
    full = full_answers(cfg, ctx, loaded.tokenizer) if cfg.get("fidelity") and comp.active else None
    preds = PredictionsLog(ctx.run_dir, fingerprint(cfg))
    pending = [it for it in items if it.sample.sample_id not in preds]
    if len(pending) < len(items):
        log.info("resuming: %d of %d samples already in %s", len(items) - len(pending), len(items), preds.path)
    if pending:
        kill_check = _kill_hook()
        bar = tqdm(total=len(pending), desc=f"{ctx.policy_name} x{cfg.budget.ratio:g}", disable=not ctx.progress)
        engine_cfg = OmegaConf.to_container(cfg.engine, resolve=True) if "engine" in cfg else {}
        for written, rec in enumerate(evaluate(loaded, comp, pending, str(cfg.task.mode), engine_cfg), 1):
            preds.append(rec)
            bar.update(1)
            bar.set_postfix(score=f"{rec['score']:.0f}", cr=f"{rec['logical_compression']:.1f}")
            kill_check(written)
        bar.close()

    records = preds.ordered(ids)
    fidelity = answer_fidelity(cfg, ctx, loaded, comp, items, records, full) if cfg.get("fidelity") else {}
    summary = summarize(cfg, ctx, loaded, records, time.perf_counter() - t_start, comp.active)
    summary.update(fidelity)
    summary["n_resumed"] = len(items) - len(pending)
    attach_baseline(summary, cfg, ctx, uncompressed=not comp.active)
    write_json_atomic(ctx.run_dir / SUMMARY, summary)
    return summary, records


def attach_baseline(summary: dict[str, Any], cfg: DictConfig, ctx: RunContext, uncompressed: bool) -> None:
    """Fill ``full_cache_score``: this run's own score when uncompressed (and record it), else the stored one."""
    store = BaselineStore(ctx.baselines_dir) if ctx.baselines_dir is not None else None
    key = baseline_key(cfg)
    if uncompressed:
        full = summary["score"]
        if store is not None:
            store.put(key, full, str(ctx.run_dir))
    else:
        full = store.get(key) if store is not None else None
    summary["full_cache_score"] = full
    summary["baseline_key"] = key
    if full:
        summary["score_pct_of_full"] = 100.0 * summary["score"] / full


def summary_line(summary: dict[str, Any]) -> str:
    """One human-readable line describing a finished run."""
    full = summary.get("full_cache_score")
    vs_full = f" ({summary['score_pct_of_full']:.0f}% of full {full:.1f})" if summary.get("score_pct_of_full") else ""
    nll, nll_full = summary.get("answer_nll"), summary.get("answer_nll_full")
    fidelity = f", answer NLL {nll:.3f}" if nll is not None else ""
    fidelity += f" (full {nll_full:.3f})" if nll is not None and nll_full is not None else ""
    return (
        f"{summary['policy']} x{summary['compression_ratio']:g} [{summary['allocation']}, {summary['mode']}] "
        f"on {summary['task']}/{summary['model']}: compression logical {summary['logical_compression']:.2f}x "
        f"physical {summary['physical_compression']:.2f}x, score {summary['score']:.1f}{vs_full} "
        f"over {summary['n_samples']} samples{fidelity}, {summary['wall_s']:.1f} s"
    )


__all__ = [
    "ExperimentError",
    "RunContext",
    "baseline_key",
    "fingerprint",
    "run_experiment",
    "summary_line",
]
