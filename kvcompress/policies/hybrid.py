"""Hybrid: two scorers fused per head, e.g. LFU's attention with KeyDiff's attention-free key diversity.

Each child ranks the head's slots; each ranking becomes within-head quantiles (``q = (mid-rank + 1) / n`` over
the head's ``n`` valid slots, ties share their mid-rank, so ``q`` is in ``(0, 1]`` whatever the scorer's scale),
combined by ``mode``:

* ``rank_fusion``: ``weight × q_a + (1 - weight) × q_b``;
* ``product``: ``q_a × q_b`` (a slot must rank well under both). Quantiles rather than raw scores, because raw
  scores have unrelated scales and signs (KeyDiff and Knorm are negative).

The cache stores one score per slot, so at most one child may *observe* attention (a prefill window, fused decode
accumulation or decode probabilities): it owns the slot scores and decides the window and its powers. The other
must score at rank time from keys, values or positions (``keydiff``, ``knorm``, ``random``, ``streaming``).

Quantiles erase each head's scale, so cross-head allocators (``global``, ``adakv``) see every head alike; pair a
hybrid with ``budget.allocation=uniform`` or ``pyramid``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.cache.paged import HeadView, PagedKVCache
from kvcompress.cache.step import DecodeObservation, PrefillObservation
from kvcompress.policies.base import Policy, finite_ranks

MODES = ("rank_fusion", "product")


def observes(policy: Policy) -> bool:
    """Whether ``policy`` writes slot scores from attention (a prefill window, decode powers or decode probs)."""
    return policy.window != 0 or policy.decode_power != 0 or policy.wants_decode_probs


def head_quantiles(ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[S, H, L]`` ranks -> within-head quantiles ``(mid-rank + 1) / n`` over the valid slots (0 elsewhere)."""
    r = finite_ranks(ranks).masked_fill(~valid, torch.inf)  # invalid slots sort last: never below a valid one
    asc = r.sort(-1).values.contiguous()
    below = torch.searchsorted(asc, r.contiguous(), side="left")
    upto = torch.searchsorted(asc, r.contiguous(), side="right")
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    q = ((below + upto - 1).double() / 2 + 1) / n
    return q.float().masked_fill(~valid, 0.0)


@dataclass
class HybridPolicy(Policy):
    """``a`` and ``b``: the two child policies (nested policy configs with ``_target_``, instantiated by Hydra);
    ``mode``: ``rank_fusion`` or ``product``; ``weight``: the share of ``a`` in ``rank_fusion``."""

    a: Policy
    b: Policy
    mode: str = "rank_fusion"
    weight: float = 0.5

    def __post_init__(self) -> None:
        for side, child in (("a", self.a), ("b", self.b)):
            if not isinstance(child, Policy):
                raise ValueError(f"hybrid policy.{side} must be a policy config with _target_, got {child!r}")
            if not child.evicts:
                raise ValueError(f"hybrid policy.{side} ({type(child).__name__}) never evicts: nothing to fuse")
        if self.mode not in MODES:
            raise ValueError(f"hybrid mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"hybrid weight must be in [0, 1] (the share of policy.a), got {self.weight}")
        observers = [c for c in (self.a, self.b) if observes(c)]
        if len(observers) > 1:
            raise ValueError(
                f"hybrid: {type(self.a).__name__} and {type(self.b).__name__} both observe attention, but the cache "
                "keeps one score per slot; make one of them a rank-time scorer (keydiff, knorm, random, streaming)"
            )
        # instance attributes shadow Policy's ClassVars; the observer (if any) owns the window and the powers
        obs = observers[0] if observers else None
        self.window = obs.window if obs else 0
        self.window_power = obs.window_power if obs else 1
        self.decode_power = obs.decode_power if obs else 0
        self.wants_decode_probs = obs.wants_decode_probs if obs else False
        self.needs_kv = self.a.needs_kv or self.b.needs_kv
        self.sinks = max(self.a.sinks, self.b.sinks)
        allowed = [c.allocations for c in (self.a, self.b) if c.allocations is not None]
        self.allocations = tuple(x for x in allowed[0] if all(x in o for o in allowed)) if allowed else None
        if self.allocations == ():
            raise ValueError(
                f"hybrid: {type(self.a).__name__} and {type(self.b).__name__} share no budget.allocation "
                f"({', '.join(allowed[0])} vs {', '.join(allowed[1])})"
            )

    def observe_prefill(self, cache: PagedKVCache, obs: PrefillObservation) -> None:
        self.a.observe_prefill(cache, obs)
        self.b.observe_prefill(cache, obs)

    def observe_decode(self, cache: PagedKVCache, obs: DecodeObservation) -> None:
        self.a.observe_decode(cache, obs)
        self.b.observe_decode(cache, obs)

    def fork(self, parent: int, child: int) -> None:
        self.a.fork(parent, child)
        self.b.fork(parent, child)

    def release(self, seq_id: int) -> None:
        self.a.release(seq_id)
        self.b.release(seq_id)

    def rank(self, view: HeadView, seen: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.a.rank(view, seen), self.b.rank(view, seen), view.valid)

    def rank_layers(self, views: list[HeadView], seen: torch.Tensor) -> list[torch.Tensor]:
        """Each side ranks every layer as it would alone (a side's cross-layer rule included), then they fuse."""
        ra, rb = self.a.rank_layers(views, seen), self.b.rank_layers(views, seen)
        return [self.fuse(a, b, v.valid) for a, b, v in zip(ra, rb, views, strict=True)]

    def fuse(self, ra: torch.Tensor, rb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The two sides' ranking scores ``[S, H, L]``, each turned to quantiles within its head, then fused."""
        qa, qb = head_quantiles(ra, valid), head_quantiles(rb, valid)
        if self.mode == "product":
            return qa * qb
        return self.weight * qa + (1 - self.weight) * qb
