"""End-to-end greedy generation speed: HF ``generate`` (sdpa, ``DynamicCache``) against kvcompress's ``generate``
on the paged cache, uncompressed and compressed, for one real prompt.

This is the "uncompressed paged within 10% of HF dense" target measured as a user sees it: prefill plus
``new_tokens`` decode steps, same prompt, same number of tokens (EOS is ignored on both sides). The uncompressed
paged run must produce HF's tokens; a mismatch raises, since a faster wrong answer is not a speed-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvcompress.bench.latency import summarize
from kvcompress.compressor import Compressor
from kvcompress.experiment.prompts import build_prompt
from kvcompress.generate import generate
from kvcompress.tasks.registry import build_task

T = TypeVar("T")


def task_prompt(tokenizer: PreTrainedTokenizerBase, tokens: int, task: str = "niah_single") -> list[int]:
    """Token ids of one deterministic task prompt of about ``tokens`` tokens."""
    sample = build_task(task, tokenizer=tokenizer, n_samples=1, target_tokens=tokens).samples()[0]
    return build_prompt(tokenizer, sample).ids


@torch.no_grad()
def _hf(model: PreTrainedModel, ids: list[int], new_tokens: int) -> list[int]:
    x = torch.tensor([ids], device=model.device)
    out = model.generate(
        x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


def time_systems(systems: dict[str, Callable[[], T]], repeats: int) -> tuple[dict[str, list[float]], dict[str, T]]:
    """Run every system ``repeats`` times, rotating which goes first each round so drift hits all alike; returns
    each system's wall times and its last output."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    outputs: dict[str, T] = {}
    names = list(systems)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            t0 = time.perf_counter()
            outputs[name] = systems[name]()
            times[name].append(time.perf_counter() - t0)
    return times, outputs


def generation_speed(
    model: PreTrainedModel,
    ids: list[int],
    new_tokens: int = 64,
    repeats: int = 3,
    compressors: dict[str, Callable[[], Compressor]] | None = None,
) -> list[dict]:
    """One row per system (``hf_dense``, ``paged``, then each of ``compressors``: label -> factory), with the
    wall time of prefill + ``new_tokens`` greedy steps over ``repeats`` interleaved runs (median/min/max/std),
    generated tokens/s at the median, and the ratio to HF's median."""
    systems: dict[str, Callable[[], list[int]]] = {
        "hf_dense": lambda: _hf(model, ids, new_tokens),
        "paged": lambda: generate(model, [ids], None, new_tokens)[0].tokens,
    }
    for label, make in (compressors or {}).items():
        systems[label] = lambda make=make: generate(model, [ids], make(), new_tokens)[0].tokens
    times, tokens = time_systems(systems, repeats)
    if tokens["paged"] != tokens["hf_dense"]:
        raise RuntimeError(
            f"the uncompressed paged generation differs from HF's: {tokens['paged'][:16]} vs "
            f"{tokens['hf_dense'][:16]} (first 16 tokens)"
        )
    hf = summarize(times["hf_dense"])["median"]
    rows = []
    for name, ts in times.items():
        stats = summarize(ts)
        rows.append(
            {
                "system": name,
                "prompt_tokens": len(ids),
                "new_tokens": new_tokens,
                "repeats": repeats,
                **{f"wall_s_{k}": v for k, v in stats.items()},
                "tokens_per_s": new_tokens / stats["median"],
                "ratio_vs_hf": stats["median"] / hf,
                "same_tokens_as_hf": tokens[name] == tokens["hf_dense"],
            }
        )
    return rows
