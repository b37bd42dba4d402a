"""What one forward pass over the paged cache needs to know, beyond the model's own inputs.

The model runs with ``use_cache=False`` and our attention function (see :mod:`kvcompress.attention`) receives a
:class:`ForwardStep` through the attention kwargs, exactly as transformers' own continuous-batching path hands
its paged cache to ``paged|sdpa``. The step carries

* the :class:`StepPlan`: the device metadata of the forward (write slots, block tables, lengths, positions),
  built by :meth:`~kvcompress.cache.paged.PagedKVCache.plan_step` once for every layer, so no layer computes or
  reads back anything to find where its keys go;
* what the active policy wants recorded while attention is computed, and the :class:`Observer` (the
  compressor) that receives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from kvcompress.cache.paged import PagedKVCache


@dataclass
class StepPlan:
    """Device metadata of one forward of ``B`` sequences and ``T`` packed tokens, for all ``L`` layers.

    ``slots`` ``[L, T, H]`` int64: where each layer writes each new token's key of each kv head.
    ``block_tables`` ``[L, B, H, cols]`` int32 and ``lengths`` ``[L, B, H]`` int32: the post-step tables the
    kernels read (``cols`` = most blocks any head of the batch holds). ``positions`` ``[T]`` int64 and
    ``cu_seqlens`` ``[B + 1]`` int32 split the packed tokens by sequence; ``slot_positions`` ``[T * H]`` int32 is
    each written slot's position, in the order of ``slots[layer]``. ``counts``, ``starts`` (first new position
    of each sequence), ``max_len`` and ``min_len`` (longest and shortest head per layer) are host copies, so no
    kernel launch or observation needs to read a size back from the device.

    ``layout[layer]`` (decode steps on CPU) is ``(first, seq_stride, head_stride)`` when every head of the layer
    holds the same number of tokens in one contiguous run of slots starting at ``first + b * seq_stride +
    h * head_stride``: the torch reference then reads keys and values as a strided view of the pool instead of
    gathering them. None otherwise.

    ``token_seqs`` ``[T]`` int64 (a cache with summary sketches only, else None): each token's sequence id, which
    row of the cache's ``slot_sketch`` its queries read (:func:`kvcompress.cache.sketch.slot_term`); ``sketched``
    (host): some sequence of the step holds a sketch, so the attention computes the term (a CUDA graph's step always
    does: a zero sketch adds nothing).
    """

    seq_ids: list[int]
    counts: list[int]
    starts: list[int]
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    slot_positions: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    lengths: torch.Tensor
    max_len: list[int]
    min_len: list[int]
    layout: list[tuple[int, int, int] | None]
    token_seqs: torch.Tensor | None = None
    sketched: bool = False
    is_decode: bool = field(init=False)  # one token per sequence
    fresh: bool = field(init=False)  # every sequence starts at position 0: nothing was cached before this forward

    def __post_init__(self) -> None:
        # decided once per forward, not in every layer's attention call
        self.is_decode = all(c == 1 for c in self.counts)
        self.fresh = all(s == 0 for s in self.starts)


@dataclass
class PrefillObservation:
    """Attention statistics of one layer after a prefill (chunk) of one sequence.

    ``window_probs``: ``[1, H_q, L]`` = Σ (or max, with ``obs_reduce="max"``) over the last ``window`` queries of
    p(q, h, slot)**power, aligned with the logical slots of the kv head that query head h reads (zero past a head's
    length); None if no window was asked.
    ``queries``: the window queries, ``[1, H_q, w, D]`` (post-RoPE).
    ``every_query``: the forward observed every query of the chunk (``obs_window=-1``: a reconstruction pass), not
    the last ``window`` queries of a prompt.
    """

    layer: int
    seq_id: int
    window: int
    window_start: int  # position of the first window query
    window_probs: torch.Tensor | None
    queries: torch.Tensor
    rope_theta: float = 10000.0
    every_query: bool = False


@dataclass
class DecodeObservation:
    """Attention probabilities of one decode step of one layer: ``probs`` ``[B, H_q, L]`` over logical slots."""

    layer: int
    seq_ids: list[int]
    probs: torch.Tensor


class Observer(Protocol):
    """Receives the attention statistics a forward was asked to record (the compressor, for its policy)."""

    def observe_prefill(self, cache: PagedKVCache, obs: PrefillObservation) -> None: ...

    def observe_decode(self, cache: PagedKVCache, obs: DecodeObservation) -> None: ...


@dataclass
class ForwardStep:
    """One forward over the cache: its plan, plus what the attention records and for whom.

    ``obs_window``: last-w prompt queries whose attention is recorded (-1: every query; 0: none), raised to
    ``obs_power`` and reduced over those queries by ``obs_reduce`` (``"sum"``, or ``"max"`` for KVzip); keys at
    positions ``[lo, hi)`` of ``obs_exclude`` are left out of it (each query renormalised over the rest).
    ``decode_power`` 1 or 2: each decode step adds Σ_group p**power to the slot scores, fused into
    the attention kernel (0: off). ``decode_probs``: hand raw decode probabilities to the observer.
    """

    cache: PagedKVCache
    plan: StepPlan
    observer: Observer | None = None
    obs_window: int = 0
    obs_power: int = 1
    obs_reduce: str = "sum"
    obs_exclude: tuple[int, int] = (0, 0)
    decode_power: int = 0
    decode_probs: bool = False
