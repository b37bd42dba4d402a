"""PyramidKV layer budgets: linearly decreasing with depth, uniform across the heads of a layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.allocators.base import Allocator, clamp_counts


@dataclass
class PyramidAllocator(Allocator):
    """Per-head average budget C and kept window w give ``min = (C - w) / beta``, ``max = 2 (C - w) - min``;
    layer l keeps ``w + max - (max - min) * l / (L - 1)`` per head, so the layers sum to the uniform total.
    Falls back to uniform where ``C <= w``."""

    beta: float = 20.0
    name = "pyramid"

    def allocate(self, ranks, lengths, floor, target, block_size, depth=None) -> torch.Tensor:
        L, S, H = lengths.shape
        C = target.double() / (L * H)  # [S]
        w = floor.amax(dim=(0, 2)).double()  # [S]
        lo = (C - w).clamp_min(0) / self.beta
        hi = 2 * (C - w).clamp_min(0) - lo
        depth = torch.arange(L, dtype=torch.float64, device=lengths.device)[:, None] / max(L - 1, 1)
        per_layer = w[None] + hi[None] - (hi - lo)[None] * depth  # [L, S]
        per_layer = torch.where((C > w)[None], per_layer, C[None].expand(L, S))
        return clamp_counts(torch.ceil(per_layer)[..., None].expand(L, S, H), floor, lengths)
