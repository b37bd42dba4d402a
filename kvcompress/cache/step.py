"""What one forward pass over the paged cache needs to know, beyond the model's own inputs.

The model runs with ``use_cache=False`` and our attention function (see :mod:`kvcompress.attention`) receives a
:class:`ForwardStep` through the attention kwargs, exactly as transformers' own continuous-batching path hands
its paged cache to ``paged|sdpa``. The step says which cache sequences the packed tokens belong to, and which
attention statistics the active policy wants recorded while attention is computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvcompress.cache.paged import PagedKVCache


@dataclass
class PrefillObservation:
    """Attention statistics of one layer after a prefill (chunk) of one sequence.

    ``window_probs``: ``[1, H_q, L]`` = Σ over the last ``window`` queries of p(q, h, slot)**power, aligned with the
    logical slots of the kv head that query head h reads (zero past a head's length); None if no window was asked.
    ``queries``: the window queries, ``[1, H_q, w, D]`` (post-RoPE).
    """

    layer: int
    seq_id: int
    window: int
    window_start: int  # position of the first window query
    window_probs: torch.Tensor | None
    queries: torch.Tensor
    rope_theta: float = 10000.0


@dataclass
class DecodeObservation:
    """Attention probabilities of one decode step of one layer: ``probs`` ``[B, H_q, L]`` over logical slots."""

    layer: int
    seq_ids: list[int]
    probs: torch.Tensor


@dataclass
class ForwardStep:
    """A forward pass of packed tokens: ``cu_seqlens`` ``[B + 1]`` splits ``positions`` ``[T_total]`` by sequence."""

    cache: PagedKVCache
    seq_ids: list[int]
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    obs_window: int = 0  # last-w prompt queries whose attention is recorded; -1 = every query
    obs_power: int = 1
    decode_power: int = 0  # 0: no decode accumulation; 1 or 2: slot_score += Σ_group p**power (fused)
    on_prefill: Callable[[PrefillObservation], None] | None = None
    on_decode: Callable[[DecodeObservation], None] | None = None
    counts: list[int] = field(init=False)
    slots: torch.Tensor | None = field(init=False, default=None)  # [num_layers, T_total, H]: where to append

    def __post_init__(self) -> None:
        self.counts = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def append_slots(self, layer: int) -> torch.Tensor:
        """Slots ``[T_total, H]`` of this step's new tokens in ``layer``, planned for every layer on first use
        (before any layer is written, which :meth:`PagedKVCache.append_slots` requires)."""
        if self.slots is None:
            self.slots = self.cache.append_slots(self.seq_ids, self.cu_seqlens)
        return self.slots[layer]

    @property
    def is_decode(self) -> bool:
        return all(c == 1 for c in self.counts)
