"""H2O: heavy hitters by attention accumulated over every query seen, per kv head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcompress.cache.paged import HeadView, PagedKVCache
from kvcompress.cache.step import PrefillObservation
from kvcompress.policies.base import Policy, group_sum


@dataclass
class H2OPolicy(Policy):
    """Score = Σ over every prompt query and decode step of p, summed over the GQA group. The recent window is
    the budget's protected window. ``normalize`` divides by the number of queries that could see the key, which
    removes H2O's bias towards old tokens."""

    normalize: bool = False
    window: ClassVar[int] = -1
    decode_power: ClassVar[int] = 1

    def observe_prefill(self, cache: PagedKVCache, obs: PrefillObservation) -> None:
        view = cache.view(obs.layer, [obs.seq_id], with_kv=False)
        probs = obs.window_probs[..., : view.valid.shape[-1]].float()
        cache.set_scores(view, view.scores + group_sum(probs, view.valid.shape[1]))

    def rank(self, view: HeadView, seen: torch.Tensor) -> torch.Tensor:
        if not self.normalize:
            return view.scores
        return view.scores / (seen[:, None, None] - view.positions).clamp_min(1)
