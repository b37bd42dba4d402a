"""The allocator interface: how many tokens each (layer, kv_head) of a sequence keeps.

Every allocator receives, for the sequences being compressed,

* ``ranks``   ``[L, S, H, N]`` ranking scores per logical slot: ``+inf`` for protected slots (recent window,
  sinks), ``-inf`` past the head's length;
* ``lengths`` ``[L, S, H]`` tokens each head holds, ``floor`` ``[L, S, H]`` protected tokens per head;
* ``target``  ``[S]`` tokens the whole sequence may keep, summed over layers and heads;
* ``depth``   ``[S]`` (keyword, optional) how hard each sequence is compressed: tokens seen over the per-head
  target (the budget's ratio at a first compression); an allocator whose rule changes with it needs it;

and returns keep counts ``[L, S, H]`` with ``floor <= count <= length``. The compressor keeps each head's
``count`` top-ranked slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Allocator:
    name = "base"

    def allocate(
        self,
        ranks: torch.Tensor,
        lengths: torch.Tensor,
        floor: torch.Tensor,
        target: torch.Tensor,
        block_size: int,
        depth: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


def clamp_counts(counts: torch.Tensor, floor: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Bound per-head counts to ``[floor, length]`` and make them integers."""
    return torch.minimum(torch.maximum(counts.round().long(), floor.long()), lengths.long())


def keep_top(ranks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``[..., N]`` keeping the ``counts[...]`` highest-ranked slots of each row."""
    order = torch.sort(ranks, dim=-1, descending=True, stable=True).indices
    keep_sorted = torch.arange(ranks.shape[-1], device=ranks.device) < counts[..., None]
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
