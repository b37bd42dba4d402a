"""End-to-end greedy generation speed: HF ``generate`` (sdpa, ``DynamicCache``) against kvcompress's ``generate``
on the paged cache, uncompressed and compressed, for one real prompt.

This is the "uncompressed paged within 10% of HF dense" target measured as a user sees it: prefill plus
``new_tokens`` decode steps, same prompt, same number of tokens (EOS is ignored on both sides). On CUDA the paged
engine runs twice: with its decode CUDA graphs (``paged``, the default) and eagerly (``paged_eager``).

In IEEE fp32 the uncompressed paged runs must produce HF's tokens; a mismatch raises, since a faster wrong answer is
not a speed-up. In bf16/fp16 (and fp32 with TF32 matmuls) two correct implementations round differently and greedy
paths part at near-ties, so a mismatch is reported instead: the first step where the tokens differ, the largest
logit difference there, and HF's margin between its top two logits at that step (a gap of the order of that margin
is a rounding tie, not a defect).
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
from kvcompress.model import dtype_name
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


def exact_fp32(model: PreTrainedModel) -> bool:
    """Whether ``model`` computes in IEEE fp32 (fp32 weights, and on CUDA no TF32 matmuls): where the paged cache
    must reproduce HF's greedy tokens exactly."""
    tf32 = model.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return model.dtype == torch.float32 and not tf32


@torch.no_grad()
def _hf_step_logits(model: PreTrainedModel, ids: list[int], step: int) -> torch.Tensor:
    """HF's raw logits ``[vocab]`` at greedy step ``step`` (0: the token after the prompt)."""
    x = torch.tensor([ids], device=model.device)
    out = model.generate(
        x, max_new_tokens=step + 1, min_new_tokens=step + 1, do_sample=False, eos_token_id=None, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    return out.logits[step][0].float()


def divergence(
    model: PreTrainedModel, ids: list[int], ours: list[int], hf: list[int], cuda_graphs: bool | None
) -> dict | None:
    """None when ``ours`` equals HF's tokens ``hf``; else where they part: ``first_divergent_step``, the largest
    |logit difference| there (``max_abs_logit_diff``) and HF's top-2 margin there (``hf_top2_margin``)."""
    step = next((i for i, (a, b) in enumerate(zip(ours, hf, strict=True)) if a != b), None)
    if step is None:
        return None
    mine = generate(model, [ids], None, step + 1, cuda_graphs=cuda_graphs)[0].last_logits
    theirs = _hf_step_logits(model, ids, step)
    top2 = theirs.topk(2).values
    return {
        "first_divergent_step": step,
        "max_abs_logit_diff": float((mine.to(theirs.device) - theirs).abs().max()),
        "hf_top2_margin": float(top2[0] - top2[1]),
    }


def time_systems(
    systems: dict[str, Callable[[], T]], repeats: int, warmup: int = 0
) -> tuple[dict[str, list[float]], dict[str, T]]:
    """Run every system ``warmup`` times untimed (on CUDA the first run JIT-compiles the Triton kernels), then
    ``repeats`` timed times, rotating which goes first each round so drift hits all alike; returns each system's
    wall times and its last output."""
    times: dict[str, list[float]] = {name: [] for name in systems}
    outputs: dict[str, T] = {}
    names = list(systems)
    for _ in range(warmup):
        for name in names:
            systems[name]()
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
    warmup: int = 0,
) -> list[dict]:
    """One row per system (``hf_dense``, ``paged``, on CUDA ``paged_eager``, then each of ``compressors``: label ->
    factory), with the wall time of prefill + ``new_tokens`` greedy steps over ``repeats`` interleaved runs after
    ``warmup`` untimed ones (median/min/max/std), generated tokens/s at the median, and the ratio to HF's median."""
    uncompressed: dict[str, bool | None] = {"paged": None}  # system -> the engine's cuda_graphs
    if model.device.type == "cuda":
        uncompressed["paged_eager"] = False
    systems: dict[str, Callable[[], list[int]]] = {"hf_dense": lambda: _hf(model, ids, new_tokens)}
    for label, graphs in uncompressed.items():
        systems[label] = lambda graphs=graphs: generate(model, [ids], None, new_tokens, cuda_graphs=graphs)[0].tokens
    for label, make in (compressors or {}).items():
        systems[label] = lambda make=make: generate(model, [ids], make(), new_tokens)[0].tokens
    times, tokens = time_systems(systems, repeats, warmup)
    parted = {name: divergence(model, ids, tokens[name], tokens["hf_dense"], g) for name, g in uncompressed.items()}
    wrong = {name: d for name, d in parted.items() if d is not None}
    if wrong and exact_fp32(model):
        raise RuntimeError(
            f"the uncompressed paged generation differs from HF's in fp32: {wrong}; first 16 tokens: "
            + "; ".join(f"{name} {tokens[name][:16]}" for name in wrong)
            + f"; hf_dense {tokens['hf_dense'][:16]}"
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
                "warmup": warmup,
                "dtype": dtype_name(model.dtype),
                **{f"wall_s_{k}": v for k, v in stats.items()},
                "tokens_per_s": new_tokens / stats["median"],
                "ratio_vs_hf": stats["median"] / hf,
                "same_tokens_as_hf": tokens[name] == tokens["hf_dense"],
                **(parted.get(name) or {}),
            }
        )
    return rows
