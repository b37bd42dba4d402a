"""TOVA: keep the tokens the current (last) query attends to most, averaged over all heads of a layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcompress.cache.paged import PagedKVCache
from kvcompress.cache.step import DecodeObservation, PrefillObservation
from kvcompress.policies.base import Policy


def _layer_mean_by_position(cache: PagedKVCache, layer: int, seq_ids: list[int], probs: torch.Tensor) -> None:
    """Average ``probs`` ``[S, H_q, L]`` over every query head by token position and store it in each head's slots,
    so every head of the layer ranks tokens identically (one kept set per layer)."""
    view = cache.view(layer, seq_ids, with_kv=False)
    S, H, L = view.valid.shape
    g = probs.shape[1] // H
    p = probs[..., :L].float().view(S, H, g, L).sum(2)  # [S, H, L]
    seen = int(cache.seen[seq_ids].max()) + 1
    pos = view.positions.clamp(0, seen - 1)
    by_pos = torch.zeros(S, seen, device=p.device).scatter_add_(1, pos.reshape(S, -1), (p * view.valid).reshape(S, -1))
    heads_holding = torch.zeros(S, seen, device=p.device).scatter_add_(
        1, pos.reshape(S, -1), view.valid.float().reshape(S, -1)
    )
    mean = by_pos / (heads_holding * g).clamp_min(1)
    cache.set_scores(view, mean.gather(1, pos.reshape(S, -1)).view(S, H, L))


@dataclass
class TOVAPolicy(Policy):
    """Scores are overwritten (not accumulated) by the latest query's attention, head-averaged per layer."""

    window: ClassVar[int] = 1
    wants_decode_probs: ClassVar[bool] = True
    allocations: ClassVar[tuple[str, ...]] = ("uniform", "pyramid")

    def observe_prefill(self, cache: PagedKVCache, obs: PrefillObservation) -> None:
        _layer_mean_by_position(cache, obs.layer, [obs.seq_id], obs.window_probs)

    def observe_decode(self, cache: PagedKVCache, obs: DecodeObservation) -> None:
        _layer_mean_by_position(cache, obs.layer, obs.seq_ids, obs.probs)
