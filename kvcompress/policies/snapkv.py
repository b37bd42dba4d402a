"""SnapKV: attention of the last ``window`` prompt queries, pooled along keys, computed once at prefill."""

from __future__ import annotations

from dataclasses import dataclass

from kvcompress.cache.paged import PagedKVCache
from kvcompress.cache.step import PrefillObservation
from kvcompress.policies.base import Policy, check_pool_kernel, window_scores


@dataclass
class SnapKVPolicy(Policy):
    """Score = pool_k(mean over the window of p), summed over the GQA group. The window itself is kept through the
    budget's protected window (keep ``budget.protected_window >= window`` for the paper's behaviour)."""

    window: int = 32
    kernel: int = 7
    pooling: str = "avg"

    def __post_init__(self) -> None:
        check_pool_kernel(self.kernel, f"{type(self).__name__} policy.kernel")

    def observe_prefill(self, cache: PagedKVCache, obs: PrefillObservation) -> None:
        view, pooled = window_scores(cache, obs, self.kernel, self.pooling)
        cache.set_scores(view, pooled / max(obs.window, 1))
