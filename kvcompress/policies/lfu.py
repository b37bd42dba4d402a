"""KV-Compress (Cloudflare): least-frequently-used eviction on accumulated (squared) attention.

``m(k) = Σ_{h in k's GQA group} [ maxpool_7(Σ_{q in last w prompt queries} p(q,h,k)^2) + Σ_{decode t} p(t,h,k)^2 ]``
(design.md section 2). ``L1`` uses p instead of p²; the ``avg`` forms divide by the number of queries that could
have seen the key. New tokens start at 0; decode queries keep adding (fused into the decode attention kernel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvcompress.cache.paged import HeadView, PagedKVCache
from kvcompress.cache.step import PrefillObservation
from kvcompress.policies.base import Policy, check_pool_kernel, window_scores
from kvcompress.policies.head_bias import HeadBias

METRICS = ("L2-sum", "L1-sum", "L2-avg", "L1-avg")


@dataclass
class LFUPolicy(Policy):
    """``window``: last-w prompt queries observed (-1: all prompt queries, the "full" variant); ``pool_kernel``:
    max-pool size along keys (<=1 disables); ``decode_accumulate``: keep adding decode attention; ``decay``:
    multiply existing scores by this factor at each prefill observation / compression (1 = none); ``head_bias``:
    a KV-Compress head-bias file (``.npz``, :mod:`kvcompress.policies.head_bias`) added to each head's metric."""

    metric: str = "L2-sum"
    window: int = 32
    pool_kernel: int = 7
    decode_accumulate: bool = True
    decay: float = 1.0
    head_bias: str | None = None
    _bias: HeadBias | None = field(default=None, init=False, repr=False, compare=False)
    _window_start: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"lfu metric must be one of {METRICS}, got {self.metric!r}")
        if self.window == 0:
            raise ValueError("lfu needs an observation window: window > 0, or -1 for every prompt query")
        check_pool_kernel(self.pool_kernel, "lfu policy.pool_kernel")
        power = 2 if self.metric.startswith("L2") else 1
        # instance attributes shadow the ClassVar defaults of Policy
        self.window_power = power
        self.decode_power = power if self.decode_accumulate else 0
        if self.head_bias:
            self._bias = HeadBias.load(self.head_bias)

    def observe_prefill(self, cache: PagedKVCache, obs: PrefillObservation) -> None:
        view, add = window_scores(cache, obs, self.pool_kernel, "max")
        cache.set_scores(view, view.scores * self.decay + add)
        self._window_start[obs.seq_id] = obs.window_start

    def fork(self, parent: int, child: int) -> None:
        if parent in self._window_start:
            self._window_start[child] = self._window_start[parent]

    def release(self, seq_id: int) -> None:
        self._window_start.pop(seq_id, None)

    def rank(self, view: HeadView, seen: torch.Tensor) -> torch.Tensor:
        scores = self.metric_of(view, seen)
        if self._bias is None:
            return scores
        return scores + self._bias.for_layer(view.layer, seen, scores.shape[1])[..., None]

    def metric_of(self, view: HeadView, seen: torch.Tensor) -> torch.Tensor:
        """The KV-Compress metric ``[S, H, L]`` of ``view``'s slots, before any head bias."""
        if self.metric.endswith("sum"):
            return view.scores
        # queries that could have seen key j: window queries from window_start on, then every decode query
        start = torch.tensor([self._window_start.get(s, 0) for s in view.seq_ids], device=seen.device)
        first = torch.maximum(view.positions, start[:, None, None])
        return view.scores / (seen[:, None, None] - first).clamp_min(1)
