"""Decode latency vs context length: HF dense (sdpa + ``DynamicCache``) against the paged cache, full and compressed.

One decode step (one new token for each of ``batch`` sequences) is timed at each context length for three systems
side by side in one process:

* ``hf_dense``: the model with sdpa attention and a transformers ``DynamicCache`` holding ``context`` tokens;
* ``paged``: the engine's :class:`~kvcompress.model_runner.ModelRunner` decode forward (no compressor), ``context``
  tokens per head;
* ``paged_x{ratio}``: the paged cache holding ``context // ratio`` tokens per head, i.e. what a cache compressed
  ``ratio``-fold holds, while its ``seen`` count still says ``context`` tokens were seen, so new tokens get their
  real RoPE positions. The kept positions are an evenly spaced subset of ``range(context)`` (see
  :func:`kept_positions`), the same for every layer and head.

Prefilling 8k tokens is too slow on CPU and decode cost does not depend on what the cache holds, so every cache is
filled directly with random K/V of the model dtype. HF and the paged cache both store keys after RoPE, so the HF
cache and the paged caches are given the *same* tensors and are then the same caches: the first step of each paged
system is checked against HF dense on identical contents (logits within ``atol`` in fp32, same argmax).

The caches are not reset between repeats: every system grows by ``1 + repeats * (warmup + steps)`` tokens over the
run (the check step, then the timed and untimed steps), the same for all three, which is small next to the context.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from kvcompress.model_runner import ModelRunner, make_cache, model_kv_geometry

LayerKV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each [batch, num_kv_heads, tokens, head_dim]


class Decoder(Protocol):
    """A system under test: one call of :meth:`step` decodes one token for every sequence."""

    name: str
    kept: int  # tokens per kv head at the start
    kv_bytes: int  # bytes of the K/V storage at the start

    def step(self) -> torch.Tensor:
        """Decode one token per sequence (greedy); returns the step's logits ``[batch, vocab]`` in fp32."""
        ...


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and sample standard deviation (0 for a single value) of ``values``."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def kept_positions(context: int, ratio: float) -> torch.Tensor:
    """Positions ``[context // ratio]`` (int64) kept by the compressed system: evenly spaced over ``range(context)``."""
    kept = max(int(context // ratio), 1)
    return torch.arange(kept) * context // kept


def random_kv(model: PreTrainedModel, batch: int, context: int, seed: int) -> list[LayerKV]:
    """Random K/V of the model dtype and device, per layer ``[batch, num_kv_heads, context, head_dim]``."""
    layers, heads, head_dim = model_kv_geometry(model)
    param = next(model.parameters())
    gen = torch.Generator(device=param.device).manual_seed(seed)
    shape = (batch, heads, context, head_dim)

    def draw() -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=param.device, dtype=param.dtype)

    return [(draw(), draw()) for _ in range(layers)]


def select_tokens(kv: list[LayerKV], positions: torch.Tensor) -> list[LayerKV]:
    """The tokens at ``positions`` ``[n]`` of every layer: ``[batch, heads, n, head_dim]`` copies."""
    idx = positions.to(kv[0][0].device)
    return [(k[:, :, idx], v[:, :, idx]) for k, v in kv]


@contextlib.contextmanager
def attn_implementation(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Run the block with ``model``'s attention set to ``name`` (e.g. ``"sdpa"``), restoring it afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@dataclass
class HFDecoder:
    """The model with its own attention over a ``DynamicCache``; ``position`` is the next token's RoPE position."""

    name: str
    model: PreTrainedModel
    cache: DynamicCache
    position: int
    tokens: torch.Tensor  # [batch, 1] next input ids
    kept: int
    kv_bytes: int

    @classmethod
    def build(cls, name: str, model: PreTrainedModel, kv: list[LayerKV], position: int, token: int) -> HFDecoder:
        """A ``DynamicCache`` holding ``kv`` (per layer ``[batch, heads, tokens, head_dim]``, post-RoPE keys)."""
        cache = DynamicCache(config=model.config)
        for layer, (k, v) in enumerate(kv):
            cache.update(k, v, layer)
        batch, _, kept, _ = kv[0][0].shape
        kv_bytes = sum(k.nbytes + v.nbytes for k, v in kv)
        tokens = torch.full((batch, 1), token, dtype=torch.long, device=kv[0][0].device)
        return cls(name, model, cache, position, tokens, kept, kv_bytes)

    def step(self) -> torch.Tensor:
        positions = torch.full_like(self.tokens, self.position)
        out = self.model(input_ids=self.tokens, past_key_values=self.cache, position_ids=positions, use_cache=True)
        self.position += 1
        logits = out.logits[:, -1].float()
        self.tokens = logits.argmax(-1, keepdim=True)
        return logits


@dataclass
class PagedDecoder:
    """The engine's model runner (no compressor) over sequences ``seq_ids`` filled directly with K/V: a decode step
    is exactly the forward an :class:`~kvcompress.engine.Engine` decode step runs, without the prefill."""

    name: str
    runner: ModelRunner
    seq_ids: list[int]
    tokens: list[int]  # next input id per sequence
    kept: int
    kv_bytes: int

    @classmethod
    def build(
        cls,
        name: str,
        model: PreTrainedModel,
        kv: list[LayerKV],
        positions: torch.Tensor,
        seen: int,
        token: int,
        extra_tokens: int,
        block_size: int = 16,
    ) -> PagedDecoder:
        """A paged cache whose heads hold ``kv`` (per layer ``[batch, heads, n, head_dim]``) at ``positions`` ``[n]``.

        Each sequence is recorded as having seen ``seen`` tokens (the next token's position). The pool holds
        ``n + extra_tokens`` tokens per head (block-rounded) for every sequence.
        """
        batch, heads, kept, head_dim = kv[0][0].shape
        cache = make_cache(model, batch, kept + extra_tokens, block_size=block_size)
        seq_ids = [cache.add_sequence() for _ in range(batch)]
        plan = cache.plan_step(seq_ids, [kept] * batch)
        # [batch * kept]: the kept subset, not 0..n-1
        plan.slot_positions = positions.to(cache.device, torch.int32).repeat(batch).repeat_interleave(heads)
        pack = lambda t: t.transpose(1, 2).reshape(batch * kept, heads, head_dim)  # [B, H, n, D] -> [B*n, H, D]
        for layer, (k, v) in enumerate(kv):
            cache.write(layer, plan, pack(k), pack(v))
        cache.seen[seq_ids] = seen
        kv_bytes = cache.memory(seq_ids).allocated_bytes
        return cls(name, ModelRunner(model, cache), seq_ids, [token] * batch, kept, kv_bytes)

    def step(self) -> torch.Tensor:
        logits = self.runner.forward(self.seq_ids, [[t] for t in self.tokens])
        self.tokens = ModelRunner.sample(logits)
        return logits


def check_same_logits(name: str, context: int, ref: torch.Tensor, got: torch.Tensor, atol: float) -> None:
    """Raise ``RuntimeError`` unless ``got`` matches ``ref`` (``[batch, vocab]``): max-abs within ``atol`` and the
    same argmax wherever HF's top two logits are further apart than the observed difference."""
    diff = float((got - ref).abs().max())
    top2 = ref.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > diff
    flipped = bool(((got.argmax(-1) != ref.argmax(-1)) & decided).any())
    if diff > atol or flipped:
        raise RuntimeError(
            f"decode_latency sanity check failed at context {context}: {name} and hf_dense disagree on identical "
            f"K/V (max |logit diff| = {diff:.3g}, tolerance {atol:g}; argmax differs: {flipped}). "
            "The paged attention or the cache filling is wrong; the timings would not compare like with like."
        )


def time_steps(decoder: Decoder, steps: int, warmup: int) -> float:
    """Milliseconds per step: the mean over ``steps`` timed steps, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        decoder.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        decoder.step()
    return (time.perf_counter() - t0) * 1e3 / steps


def build_systems(
    model: PreTrainedModel, context: int, ratio: float, batch: int, extra_tokens: int, atol: float, seed: int
) -> list[Decoder]:
    """The three systems at one context, each checked once against HF dense (that check is their first step)."""
    token = 0
    kv = random_kv(model, batch, context, seed)
    pos = kept_positions(context, ratio)
    hf = HFDecoder.build("hf_dense", model, kv, context, token)
    paged = PagedDecoder.build("paged", model, kv, torch.arange(context), context, token, extra_tokens)
    check_same_logits("paged", context, hf.step(), paged.step(), atol)
    subset = select_tokens(kv, pos)
    del kv
    compressed = PagedDecoder.build(f"paged_x{ratio:g}", model, subset, pos, context, token, extra_tokens)
    reference = HFDecoder.build("hf_dense_subset", model, subset, context, token)
    check_same_logits(compressed.name, context, reference.step(), compressed.step(), atol)
    return [hf, paged, compressed]


@torch.no_grad()
def decode_latency(
    model: PreTrainedModel,
    contexts: list[int],
    ratio: float = 8.0,
    steps: int = 16,
    repeats: int = 5,
    batch: int = 1,
    warmup: int = 2,
    atol: float = 1e-3,
    seed: int = 0,
) -> list[dict]:
    """Wall time of one decode step at each context length for ``hf_dense``, ``paged`` and ``paged_x{ratio}``.

    Within each repeat the three systems run back to back (the starting system rotates between repeats), each
    timing ``steps`` steps after ``warmup`` untimed ones. Returns one row per (context, system) with
    ``step_ms_median/min/max/std`` over repeats (each repeat's figure is its mean step time), ``kv_bytes`` at the
    start (HF: its K/V tensors; paged: ``cache.memory().allocated_bytes``) and ``ratio_vs_hf`` (this system's median
    over hf_dense's). ``atol`` bounds the fp32 logit difference of the sanity check (other dtypes: argmax only).
    Set ``torch.set_num_threads`` before calling for stable CPU figures.
    """
    extra_tokens = 1 + repeats * (warmup + steps)
    fp32 = next(model.parameters()).dtype == torch.float32
    rows: list[dict] = []
    with attn_implementation(model, "sdpa"):
        for context in contexts:
            systems = build_systems(model, context, ratio, batch, extra_tokens, atol if fp32 else float("inf"), seed)
            times: dict[str, list[float]] = {s.name: [] for s in systems}
            for r in range(repeats):
                for system in systems[r % len(systems) :] + systems[: r % len(systems)]:
                    times[system.name].append(time_steps(system, steps, warmup))
            hf_median = statistics.median(times[systems[0].name])
            for system in systems:
                stats = summarize(times[system.name])
                rows.append(
                    {
                        "system": system.name,
                        "context": context,
                        "kept_tokens_per_head": system.kept,
                        "batch": batch,
                        "steps": steps,
                        "repeats": repeats,
                        **{f"step_ms_{k}": v for k, v in stats.items()},
                        "kv_bytes": system.kv_bytes,
                        "ratio_vs_hf": stats["median"] / hf_median,
                    }
                )
            del systems
    return rows
