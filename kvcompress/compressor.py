"""Glue between a policy (scorer), an allocator and a budget, acting on a :class:`PagedKVCache`.

The compressor tells each forward which attention statistics the policy needs, and on :meth:`compress` ranks
every slot, protects the recent window and sinks, asks the allocator for per-head counts and evicts everything
else, freeing whole blocks back to the pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvcompress.allocators import Allocator, build_allocator
from kvcompress.allocators.base import keep_top
from kvcompress.budget import Budget
from kvcompress.cache.paged import PagedKVCache
from kvcompress.cache.step import ForwardStep
from kvcompress.policies.base import Policy

_BIG = 1e30


@dataclass
class Compressor:
    policy: Policy
    budget: Budget = field(default_factory=Budget)
    allocator: Allocator | None = None
    compress_s: float = field(default=0.0, init=False)
    n_compressions: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        allowed = type(self.policy).allocations
        if allowed is not None and self.budget.allocation not in allowed:
            raise ValueError(
                f"policy {type(self.policy).__name__} does not compose with budget.allocation="
                f"{self.budget.allocation!r}: it supports {', '.join(allowed)}"
            )
        if self.allocator is None:
            self.allocator = build_allocator(self.budget.allocation)

    @property
    def active(self) -> bool:
        return self.policy.evicts and self.budget.compresses

    # ------------------------------------------------------------------ forward hooks
    def observe_window(self, prompt_len: int) -> int:
        """Trailing prompt queries whose attention the policy wants (-1 = all, 0 = none)."""
        return self.policy.window if self.active else 0

    def configure_step(self, step: ForwardStep, observe_window: int) -> None:
        """Ask the attention of this forward for the statistics the policy needs."""
        if not self.active:
            return
        cache = step.cache
        if observe_window:
            step.obs_window, step.obs_power = observe_window, self.policy.window_power
            step.on_prefill = lambda obs: self.policy.observe_prefill(cache, obs)
        if step.is_decode:
            step.decode_power = self.policy.decode_power
            if self.policy.wants_decode_probs:
                step.on_decode = lambda obs: self.policy.observe_decode(cache, obs)

    def due(self, decode_steps: int) -> bool:
        every = self.budget.compress_every
        return self.active and every > 0 and decode_steps % every == 0

    # ------------------------------------------------------------------ compression
    @torch.no_grad()
    def compress(self, cache: PagedKVCache, seq_ids: list[int]) -> int:
        """Evict down to the budget for ``seq_ids``; returns the number of blocks freed."""
        if not self.active or not seq_ids:
            return 0
        t0 = time.perf_counter()
        seen = cache.seen[seq_ids].to(cache.device)  # [S]
        for s in seen.tolist():
            self.budget.check(int(s), self.policy.sinks)
        views = [cache.view(layer, seq_ids, with_kv=self.policy.needs_kv) for layer in range(cache.num_layers)]
        N = max(v.valid.shape[-1] for v in views)
        if N == 0:
            return 0
        n_sinks = self.budget.n_sinks + self.policy.sinks
        ranks = []
        for v in views:
            r = self.policy.rank(v, seen).float().nan_to_num(nan=-_BIG, posinf=_BIG, neginf=-_BIG).clamp(-_BIG, _BIG)
            protected = (v.positions >= (seen[:, None, None] - self.budget.protected_window)) | (v.positions < n_sinks)
            r = torch.where(protected, torch.inf, r).masked_fill(~v.valid, -torch.inf)
            ranks.append(torch.nn.functional.pad(r, (0, N - r.shape[-1]), value=-torch.inf))
        ranks_t = torch.stack(ranks)  # [L, S, H, N]
        lengths = torch.stack([v.lengths for v in views])  # [L, S, H]
        floor = torch.isposinf(ranks_t).sum(-1)
        H = cache.num_kv_heads
        target = torch.tensor(
            [self.budget.per_head_target(int(s)) * cache.num_layers * H for s in seen.tolist()],
            dtype=torch.float64,
            device=cache.device,
        )
        counts = self.allocator.allocate(ranks_t, lengths, floor, target, cache.block_size)
        keep = keep_top(ranks_t, counts)
        freed = 0
        for layer, v in enumerate(views):
            freed += cache.evict(layer, seq_ids, keep[layer, ..., : v.valid.shape[-1]])
        self.compress_s += time.perf_counter() - t0
        self.n_compressions += 1
        return freed
