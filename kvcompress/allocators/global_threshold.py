"""KV-Compress's global allocation: one threshold over every head of every layer, evicting whole blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.allocators.base import Allocator
from kvcompress.budget import RATIO_TOLERANCE

NORMALIZE = ("none", "sum", "max")


def normalize_heads(ranks: torch.Tensor, how: str) -> torch.Tensor:
    """Divide each head's finite ranks (``[..., N]``; ``±inf`` protected / invalid slots untouched) by the head's
    total (``"sum"``) or largest (``"max"``) absolute finite rank, so heads are compared by the share of their
    own score mass a token holds rather than by raw scale. Absolute values keep the divisor positive, so a head's
    own order never changes (attention scores are >= 0, where this is the plain sum / max); an all-zero head is
    left as is."""
    if how == "none":
        return ranks
    finite = torch.isfinite(ranks)
    mass = ranks.abs().masked_fill(~finite, 0.0).double()
    scale = mass.sum(-1, keepdim=True) if how == "sum" else mass.amax(-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(finite, ranks.double() / scale, ranks.double())


@dataclass
class GlobalAllocator(Allocator):
    """Evict, per sequence, the cheapest whole blocks across all (layer, head) pairs until the budget is met.

    Giving up ``j`` blocks of a head evicts its ``j × block_size`` lowest-ranked tokens; the block metric of that
    eviction is the rank of the largest evicted token (KV-Compress). Because a head's block metrics rise with j,
    taking the globally cheapest units yields a prefix per head, so every kept count differs from the length by
    a multiple of ``block_size`` and each evicted unit frees exactly one block. The kept total may fall below the
    target by up to ``block_size - 1`` tokens (the last unit is whole).

    The defaults are KV-Compress exactly. ``floor`` (alpha, Ada-KV's safeguard) makes every head keep at least
    ``ceil(alpha × target / (L × H))`` tokens: a head only gives up blocks above that. ``cap`` (beta, 0 = none) is
    the ceiling: every head gives up whole blocks until it keeps at most ``ceil(beta × target / (L × H))`` tokens
    (never below its protected tokens or the floor), and the budget this frees goes to the other heads by the
    global threshold. It stops a few heads that attend to nearly every token (a copying head's reconstruction
    attention) from taking most of the budget at high ratios. ``floor_from`` (0 = always) applies the floor only to
    sequences compressed at least that much (``depth``: tokens seen over the per-head target), so one config can
    hold heads up where the threshold starves them (at 16x on ~4k tokens a few copying heads take most of the
    budget) and leave lighter compression to the threshold alone. ``floor_layers`` (0 = every layer) applies the
    floor to the first that many layers only, where the generated tokens read the context as an average of it
    rather than look a fact up (docs/RESULTS.md, "Which layers lose a multikey binding at 4k"; held at their
    uniform share, those layers brought back none of seven 4k answers the query-aware preset loses at 8x: "A
    floor in the first layers, and a summary slot there"). ``normalize`` (see :func:`normalize_heads`) rescales
    each head's scores before the global comparison.
    """

    floor: float = 0.0
    floor_from: float = 0.0
    floor_layers: int = 0
    cap: float = 0.0
    normalize: str = "none"
    name = "global"

    def __post_init__(self) -> None:
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(
                f"global allocator floor must be in [0, 1] (a share of the uniform share), got {self.floor}"
            )
        if self.floor_from != 0.0 and (self.floor_from < 1.0 or self.floor == 0.0):
            raise ValueError(
                "global allocator floor_from must be 0 (the floor at every ratio) or a ratio >= 1, and it needs a "
                f"floor > 0; got floor_from={self.floor_from}, floor={self.floor}"
            )
        if self.floor_layers < 0 or (self.floor_layers and self.floor == 0.0):
            raise ValueError(
                "global allocator floor_layers must be 0 (the floor in every layer) or a number of leading layers, "
                f"and it needs a floor > 0; got floor_layers={self.floor_layers}, floor={self.floor}"
            )
        if self.cap != 0.0 and self.cap < max(self.floor, 1.0):
            raise ValueError(
                f"global allocator cap must be 0 (none) or at least 1 and the floor ({self.floor}), as a multiple of "
                f"the uniform share; got {self.cap}"
            )
        if self.normalize not in NORMALIZE:
            raise ValueError(
                f"global allocator normalize must be one of {', '.join(NORMALIZE)}; got {self.normalize!r}"
            )

    def allocate(self, ranks, lengths, floor, target, block_size, depth=None) -> torch.Tensor:
        L, S, H, N = ranks.shape
        heads = normalize_heads(ranks, self.normalize).permute(1, 0, 2, 3).reshape(S, L * H, N)
        lens = lengths.permute(1, 0, 2).reshape(S, L * H).long()
        keep_min = floor.permute(1, 0, 2).reshape(S, L * H).long()
        if self.floor > 0:
            share = torch.ceil(self.floor * target.double() / (L * H)).long()  # [S]
            if self.floor_from:
                if depth is None:
                    raise ValueError("global allocator floor_from needs each sequence's depth (the Compressor's)")
                share = torch.where(depth * (1 + RATIO_TOLERANCE) >= self.floor_from, share, 0)
            share = share[:, None].expand(S, L * H)
            if self.floor_layers:
                leading = torch.arange(L * H, device=ranks.device) // H < self.floor_layers  # heads are layer-major
                share = torch.where(leading, share, 0)
            keep_min = torch.maximum(keep_min, share)
        evictable = (lens - keep_min).clamp_min(0)
        units = evictable // block_size  # blocks each head may give up
        J = max(int(units.max()), 1)
        asc = heads.sort(-1).values  # -inf (invalid) first; shift past them to index the head's real tokens
        pad = N - lens  # number of -inf slots at the front of each sorted row
        j = torch.arange(1, J + 1, device=ranks.device)
        idx = (pad[..., None] + j * block_size - 1).clamp(max=N - 1)
        cost = asc.gather(-1, idx)  # [S, L*H, J]
        cost = cost.masked_fill(j > units[..., None], float("inf"))
        need = torch.ceil((lens.sum(-1) - target.double()).clamp_min(0) / block_size).long()  # blocks to evict [S]
        if self.cap > 0:  # the blocks above the ceiling go first, whatever their rank
            ceiling = torch.ceil(self.cap * target.double() / (L * H)).long()  # [S]
            forced = torch.minimum(torch.ceil((lens - ceiling[:, None]).clamp_min(0) / block_size).long(), units)
            cost = cost.masked_fill(j <= forced[..., None], float("-inf"))
            need = torch.maximum(need, forced.sum(-1))
        flat = cost.reshape(S, -1)
        # a stable sort of the row-major [head, j] costs orders equal costs of one head by j: prefixes stay prefixes
        order = torch.argsort(flat, dim=-1, stable=True)
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        take = torch.arange(flat.shape[-1], device=ranks.device) < need.clamp(max=flat.shape[-1])[:, None]
        chosen.scatter_(-1, order, take & ~torch.isposinf(flat.gather(-1, order)))
        evicted_blocks = chosen.view(S, L * H, J).sum(-1)
        counts = lens - evicted_blocks * block_size
        return counts.view(S, L, H).permute(1, 0, 2)
