"""Every head keeps the same number of tokens: the sequence budget split evenly over layers and heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.allocators.base import Allocator, clamp_counts


@dataclass
class UniformAllocator(Allocator):
    """``count = ceil(target / (layers × heads))`` per head, clamped to ``[protected, length]``. No block rounding:
    a head keeping k tokens holds ``ceil(k / block_size)`` blocks."""

    name = "uniform"

    def allocate(self, ranks, lengths, floor, target, block_size, depth=None) -> torch.Tensor:
        L, S, H = lengths.shape
        per_head = torch.ceil(target.double() / (L * H))
        return clamp_counts(per_head[None, :, None].expand(L, S, H), floor, lengths)
