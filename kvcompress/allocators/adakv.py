"""Ada-KV: per layer, one top-k over every (head, token) score, with a safeguard floor per head."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.allocators.base import Allocator, clamp_counts, keep_top


@dataclass
class AdaKVAllocator(Allocator):
    """Each layer gets the uniform share ``C × H``; each head first keeps ``alpha × C`` of its best tokens (the
    safeguard), and the rest of the layer's budget goes to the highest scores across the layer's heads."""

    alpha: float = 0.2
    name = "adakv"

    def allocate(self, ranks, lengths, floor, target, block_size, depth=None) -> torch.Tensor:
        L, S, H, N = ranks.shape
        C = target.double() / (L * H)  # [S]
        safe = clamp_counts((self.alpha * C)[None, :, None].expand(L, S, H), floor, lengths)
        forced = keep_top(ranks, safe)  # each head's safeguard tokens
        boosted = ranks.masked_fill(forced, float("inf")).reshape(L, S, H * N)
        layer_budget = torch.ceil(C * H).long()[None].expand(L, S)
        chosen = keep_top(boosted, torch.maximum(layer_budget, safe.sum(-1))).view(L, S, H, N)
        return clamp_counts(chosen.sum(-1).double(), floor, lengths)
