"""Evaluation speed: one run's samples through the engine together against the same samples one at a time.

``engine_batched`` is :func:`kvcompress.experiment.runner.evaluate` with ``max_seqs`` sequences at once (what
``experiments/run.py`` does); ``engine_one_at_a_time`` is the same call with ``max_seqs=1``; ``hf_loop`` is a loop
of HF ``generate`` calls (sdpa, dense cache, uncompressed) over the same prompts, as a user without kvcompress would
evaluate. The batched and one-at-a-time runs must give the same predictions (the engine's pool never comes under
pressure), so they compare like with like: on CPU a mismatch raises. On CUDA the batch size changes which matmul
kernels run, so bf16 (or TF32) rounding can flip a greedy near-tie; there each engine row records how many
predictions match one-at-a-time's instead (``predictions_matching``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvcompress.bench.generation import time_systems
from kvcompress.bench.latency import summarize
from kvcompress.compressor import Compressor
from kvcompress.experiment.prompts import build_prompt
from kvcompress.experiment.runner import Item, eos_ids, evaluate
from kvcompress.model import LoadedModel
from kvcompress.tasks.registry import build_task


def task_items(loaded: LoadedModel, task: str, n_samples: int, tokens: int) -> list[Item]:
    """``n_samples`` deterministic samples of ``task`` at about ``tokens`` prompt tokens, with their prompts."""
    samples = build_task(task, tokenizer=loaded.tokenizer, n_samples=n_samples, target_tokens=tokens).samples()
    return [Item(s, build_prompt(loaded.tokenizer, s), s.max_new_tokens) for s in samples]


@torch.no_grad()
def _hf_loop(loaded: LoadedModel, items: list[Item]) -> list[str]:
    model, tok = loaded.model, loaded.tokenizer
    eos = eos_ids(loaded)
    out = []
    for it in items:
        x = torch.tensor([it.prompt.ids], device=model.device)
        gen = model.generate(x, max_new_tokens=it.max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
        out.append(tok.decode(gen[0, x.shape[1] :], skip_special_tokens=True).strip())
    return out


def evaluation_speed(
    loaded: LoadedModel,
    items: list[Item],
    compressor: Compressor,
    max_seqs: int,
    repeats: int = 1,
    mode: str = "query_aware",
    hf_loop: bool = True,
    warmup: int = 0,
) -> list[dict]:
    """One row per system: wall time of evaluating every item (median/min/max over interleaved repeats, after
    ``warmup`` untimed runs of each system), samples/s, the ratio of its time to one-at-a-time's, and the mean
    score."""
    engine = lambda seqs: [r["prediction"] for r in evaluate(loaded, compressor, items, mode, {"max_seqs": seqs})]
    systems: dict[str, Callable[[], list[str]]] = {
        "engine_batched": lambda: engine(max_seqs),
        "engine_one_at_a_time": lambda: engine(1),
    }
    if hf_loop:
        systems["hf_loop"] = lambda: _hf_loop(loaded, items)
    times, preds = time_systems(systems, repeats, warmup)
    reference = sorted(preds["engine_one_at_a_time"])  # the engine yields samples as they finish
    engines = ("engine_batched", "engine_one_at_a_time")
    matching = {name: sum(a == b for a, b in zip(sorted(preds[name]), reference, strict=True)) for name in engines}
    if matching["engine_batched"] != len(items) and loaded.model.device.type == "cpu":
        raise RuntimeError("batched evaluation predicted differently from one-at-a-time evaluation")
    one = summarize(times["engine_one_at_a_time"])["median"]
    rows = []
    for name, ts in times.items():
        stats = summarize(ts)
        rows.append(
            {
                "system": name,
                "n_samples": len(items),
                "prompt_tokens_mean": sum(len(it.prompt) for it in items) / len(items),
                "max_seqs": max_seqs if name == "engine_batched" else 1,
                "compressed": compressor.active and name != "hf_loop",
                "repeats": repeats,
                "warmup": warmup,
                **{f"wall_s_{k}": v for k, v in stats.items()},
                "samples_per_s": len(items) / stats["median"],
                "time_vs_one_at_a_time": stats["median"] / one,
                **({"predictions_matching": matching[name]} if name in matching else {}),
            }
        )
    return rows
