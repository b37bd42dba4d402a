"""The paged, per-head KV cache.

A physical block holds ``block_size`` tokens of **one KV head of one layer**. Every (layer, sequence, kv_head)
owns a block table and a length, so heads keep different numbers of tokens and evicted memory returns to one
shared pool that every layer draws from.

Storage, on the model's device (one pool for all layers)::

    k_cache, v_cache : [num_blocks + 1, block_size, head_dim]   model dtype
    slot_pos         : [num_blocks + 1, block_size] int32       original token position (RoPE was applied at write)
    slot_score       : [num_blocks + 1, block_size] float32     policy score, accumulated by the scorers
    slot_bias        : [num_blocks + 1, block_size] float32     logit bias, log(tokens a summary slot stands for);
                                                                0 for a plain token; only with ``summaries=True``
                                                                (:mod:`kvcompress.cache.summary`)
    slot_sketch      : [num_layers, max_seqs, num_kv_heads, r, head_dim] float32   per head, the rank-r sketch of
                                                                the keys its summary slot folded; only with
                                                                ``sketch_rank=r`` (:mod:`kvcompress.cache.sketch`,
                                                                read with ``sketch_tails``)

The extra last block is never handed out: padded entries of a gathered view point at it, so a masked scatter
(:meth:`set_scores`) can write every entry without a boolean index, which would read a count back to the host.

Bookkeeping, on the **host** (numpy), as in vLLM's block manager::

    block_tables    : [num_layers, max_seqs, num_kv_heads, max_blocks_per_head] int32, -1 where unallocated
    lengths         : [num_layers, max_seqs, num_kv_heads] int64   tokens held by the head
    num_blocks_held : same shape, blocks allocated to the head (== ceil(length / block_size) outside a step)
    seen            : [max_seqs] int64   tokens the sequence has seen = the next token's true position

Keeping it on the host means a decode step never reads a device value to decide where tokens go:
:meth:`plan_step` allocates blocks, computes every layer's write slots and the post-step block tables and lengths
in numpy, and uploads them once per step (:class:`~kvcompress.cache.step.StepPlan`). Only compression, which
decides on device what to keep, reads its keep mask back once per call.

Logical slot ``j`` of a head lives at physical block ``block_tables[l, s, h, j // block_size]``, offset
``j % block_size``. Eviction compacts a head by moving its surviving tail tokens into the holes left by
evicted ones (so slot order stops being position order; positions travel with the slot) and then returns
the now-empty trailing blocks to the pool. This is the scheme of Cloudflare's KV-Compress (docs/DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from kvcompress_kernels import compact, gather_logical, write_kv

from kvcompress.cache.step import StepPlan

_NUMPY_DTYPES = {torch.long: np.int64, torch.int32: np.int32}
# added to a hidden slot's position (see PagedKVCache.rewound): past any real query's, so causality hides the slot;
# int32 positions leave room for 2**30 real ones
HIDDEN = 1 << 30


def _runs(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``counts[i]`` items of each group i laid end to end: each item's group and its rank inside the group."""
    group = np.repeat(np.arange(counts.size), counts)
    return group, np.arange(group.size) - (np.cumsum(counts) - counts)[group]


class PoolExhaustedError(RuntimeError):
    """Raised by :meth:`PagedKVCache.plan_step` when the pool lacks the blocks a step needs. Nothing was changed."""

    def __init__(self, needed: int, free: int, total: int) -> None:
        super().__init__(
            f"KV block pool exhausted: this step needs {needed} more blocks but only {free} of {total} are free. "
            "Raise the pool size (num_blocks), compress harder, or run fewer sequences at once."
        )
        self.needed, self.free, self.total = needed, free, total


@dataclass
class MemoryStats:
    """Memory accounting of the sequences in a cache (docs/DESIGN.md, "The cache").

    ``logical_compression`` is tokens seen / tokens kept summed over every (layer, head) of the sequences;
    ``physical_compression`` is the bytes a dense cache of the same sequences would hold / the bytes of the
    blocks allocated to them, including per-slot metadata (position, score) and block-table entries.
    """

    tokens_seen: int
    tokens_kept: int
    blocks_allocated: int
    allocated_bytes: int
    dense_bytes: int
    kept_per_head: torch.Tensor  # [num_layers, n_seqs, num_kv_heads] int64, on the CPU

    @property
    def logical_compression(self) -> float:
        return self.tokens_seen / max(self.tokens_kept, 1)

    @property
    def physical_compression(self) -> float:
        return self.dense_bytes / max(self.allocated_bytes, 1)


@dataclass
class HeadView:
    """Per-head contents of one layer for a set of sequences, padded to the longest head, on the cache device.

    All tensors are ``[n_seqs, num_kv_heads, max_len, ...]``; ``valid`` marks real slots (index < length).
    ``slots`` holds flat physical slot ids (block * block_size + offset); padded entries point into the cache's
    scratch block, so scattering through ``slots`` never touches a real slot.
    """

    layer: int
    seq_ids: list[int]
    keys: torch.Tensor  # [S, H, L, D]
    values: torch.Tensor  # [S, H, L, D]
    positions: torch.Tensor  # [S, H, L] int64
    scores: torch.Tensor  # [S, H, L] float32
    valid: torch.Tensor  # [S, H, L] bool
    slots: torch.Tensor  # [S, H, L] int64
    lengths: torch.Tensor  # [S, H] int64


class PagedKVCache:
    """A block pool plus per-(layer, sequence, kv_head) block tables; see the module docstring for layout."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        max_seqs: int = 1,
        max_tokens_per_head: int = 8192,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        summaries: bool = False,
        sketch_rank: int = 0,
        sketch_tails: str = "uniform",
    ) -> None:
        if num_blocks <= 0 or block_size <= 0 or max_seqs <= 0:
            raise ValueError(
                f"num_blocks ({num_blocks}), block_size ({block_size}) and max_seqs ({max_seqs}) must be positive"
            )
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_blocks, self.block_size, self.max_seqs = num_blocks, block_size, max_seqs
        self.max_blocks_per_head = -(-max_tokens_per_head // block_size)
        self.dtype, self.device = dtype, torch.device(device)
        shape = (num_blocks + 1, block_size)  # + the scratch block
        self.k_cache = torch.zeros(*shape, head_dim, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(*shape, head_dim, dtype=dtype, device=self.device)
        self.slot_pos = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self.slot_score = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.slot_bias = torch.zeros(shape, dtype=torch.float32, device=self.device) if summaries else None
        if sketch_rank < 0 or (sketch_rank and not summaries):
            raise ValueError(f"sketch_rank ({sketch_rank}) must be >= 0, and > 0 only with summaries=True")
        sketch_shape = (num_layers, max_seqs, num_kv_heads, sketch_rank, head_dim)
        self.slot_sketch = torch.zeros(sketch_shape, device=self.device) if sketch_rank else None
        self.sketch_tails = sketch_tails  # how a query reads the sketch (kvcompress.cache.sketch.TAILS)
        self.sketched = np.zeros(max_seqs, dtype=bool)  # host: the sequence holds a sketch (set by the fold)
        self.scratch_slot = num_blocks * block_size
        table_shape = (num_layers, max_seqs, num_kv_heads)
        self.block_tables = np.full((*table_shape, self.max_blocks_per_head), -1, dtype=np.int32)
        self.lengths = np.zeros(table_shape, dtype=np.int64)
        self.num_blocks_held = np.zeros(table_shape, dtype=np.int64)
        self.seen = np.zeros(max_seqs, dtype=np.int64)
        self._free = np.ones(num_blocks, dtype=bool)
        self._kept_for = np.full(num_blocks, -1, dtype=np.int64)  # free block reserved for this head id, -1: none
        self._num_free = num_blocks
        self.expected = np.zeros(max_seqs, dtype=np.int64)  # tokens per head each sequence is expected to reach
        self._live: set[int] = set()
        self.peak_blocks = 0

    # ------------------------------------------------------------------ sizes
    @property
    def block_bytes(self) -> int:
        """Bytes of one block: K and V plus the per-slot position (int32), score and, with summaries, bias
        (float32)."""
        elt = self.k_cache.element_size()
        return self.block_size * (2 * self.head_dim * elt + 4 + 4 + (4 if self.slot_bias is not None else 0))

    @property
    def sketch_bytes(self) -> int:
        """Bytes of one sequence's summary sketches (every layer and kv head; 0 without ``sketch_rank``)."""
        return 0 if self.slot_sketch is None else self.slot_sketch[:, 0].numel() * 4

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self._num_free

    @staticmethod
    def blocks_for(
        num_layers: int, num_kv_heads: int, tokens_per_head: int, n_seqs: int = 1, block_size: int = 16
    ) -> int:
        """Blocks a dense (uncompressed) cache of ``n_seqs`` sequences of ``tokens_per_head`` tokens needs."""
        return num_layers * num_kv_heads * n_seqs * -(-tokens_per_head // block_size)

    def upload(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """A device copy of host metadata: pinned and asynchronous on CUDA (no host sync), a plain copy on CPU."""
        host = torch.from_numpy(np.array(array, dtype=_NUMPY_DTYPES[dtype]))  # a copy: later host edits don't leak
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host

    # ------------------------------------------------------------------ sequences
    def add_sequence(self, expected_tokens: int = 0) -> int:
        """Claim a free sequence slot and return its id. ``expected_tokens`` (tokens per head the sequence is
        expected to reach, uncompressed) sizes the room its heads' first blocks leave free behind them, so that
        they grow in place (see :meth:`plan_step`)."""
        for s in range(self.max_seqs):
            if s not in self._live:
                self._live.add(s)
                self.expected[s] = expected_tokens
                return s
        raise RuntimeError(f"all {self.max_seqs} sequence slots of the cache are in use; release one first")

    @property
    def num_free_seqs(self) -> int:
        return self.max_seqs - len(self._live)

    def _held_mask(self, seq_id: int) -> np.ndarray:
        """``[L, H, max_blocks]`` bool: the block-table columns that hold a block."""
        return np.arange(self.max_blocks_per_head) < self.num_blocks_held[:, seq_id, :, None]

    def release(self, seq_id: int) -> None:
        """Free every block of a sequence and make its slot reusable."""
        self._check_live([seq_id])
        self._push_free(self.block_tables[:, seq_id][self._held_mask(seq_id)])
        heads = self._head_id(np.arange(self.num_layers)[:, None], seq_id, np.arange(self.num_kv_heads)[None, :])
        self._kept_for[np.isin(self._kept_for, heads)] = -1
        self.block_tables[:, seq_id] = -1
        self.lengths[:, seq_id] = 0
        self.num_blocks_held[:, seq_id] = 0
        self.seen[seq_id] = 0
        if self.slot_sketch is not None:  # a zero sketch adds nothing: the next sequence here starts without one
            self.slot_sketch[:, seq_id] = 0
        self.sketched[seq_id] = False
        self._live.discard(seq_id)

    def fork(self, seq_id: int, expected_tokens: int = 0) -> int:
        """Copy every head of ``seq_id`` (contents, positions, scores) into fresh blocks of a new sequence.

        Lets several questions, or several budgets, share one prefilled context without recomputing it.
        """
        self._check_live([seq_id])
        used = self._held_mask(seq_id)
        total = int(used.sum())
        if total > self._num_free:
            raise PoolExhaustedError(total, self._num_free, self.num_blocks)
        if not self.num_free_seqs:
            raise RuntimeError(f"all {self.max_seqs} sequence slots of the cache are in use; release one first")
        new = self.add_sequence(expected_tokens)
        src = self.block_tables[:, seq_id][used]
        dst = self._pop_free(total)
        src_d, dst_d = self.upload(src, torch.long), self.upload(dst, torch.long)
        for pool in (self.k_cache, self.v_cache, self.slot_pos, self.slot_score, self.slot_bias):
            if pool is not None:
                pool[dst_d] = pool[src_d]
        if self.slot_sketch is not None:
            self.slot_sketch[:, new] = self.slot_sketch[:, seq_id]
        self.sketched[new] = self.sketched[seq_id]
        self.block_tables[:, new][used] = dst
        self.lengths[:, new] = self.lengths[:, seq_id]
        self.num_blocks_held[:, new] = self.num_blocks_held[:, seq_id]
        self.seen[new] = self.seen[seq_id]
        return new

    def _check_live(self, seq_ids: list[int]) -> None:
        dead = [s for s in seq_ids if s not in self._live]
        if dead:
            raise KeyError(f"sequence ids {dead} are not live in this cache (live: {sorted(self._live)})")

    # ------------------------------------------------------------------ pool
    # The pool is a free bitmap. A free block may be *kept for* one head (``_kept_for``): the room left behind a
    # head's run so that it grows in place. Kept blocks stay free (they count in ``num_free_blocks`` and go to
    # anyone once the unkept ones run out); they only come last. Contiguous heads let the torch reference read a
    # step's keys as a strided view of the pool instead of gathering them (``StepPlan.layout``).
    def _head_id(self, layer, seq, head):  # noqa: ANN001, ANN202 (numpy ints or arrays, broadcast)
        return (layer * self.max_seqs + seq) * self.num_kv_heads + head

    def _pop_free(self, n: int) -> np.ndarray:
        """``n`` free blocks, lowest ids first, blocks kept for no head before kept ones."""
        ids = np.flatnonzero(self._free & (self._kept_for < 0))[:n]
        if ids.size < n:
            ids = np.concatenate([ids, np.flatnonzero(self._free & (self._kept_for >= 0))[: n - ids.size]])
        self._take(ids)
        return ids

    def _take(self, ids: np.ndarray) -> None:
        self._free[ids] = False
        self._kept_for[ids] = -1
        self._num_free -= ids.size
        self.peak_blocks = max(self.peak_blocks, self.num_used_blocks)

    def _push_free(self, ids: np.ndarray, kept_for: np.ndarray | int = -1) -> None:
        ids = ids.reshape(-1)
        self._free[ids] = True
        self._kept_for[ids] = kept_for
        self._num_free += ids.size

    def _allocate(self, sid: np.ndarray, need: np.ndarray, held: np.ndarray) -> None:
        """Append ``need[l, b, h]`` blocks to each head of sequences ``sid`` (``held``: blocks they hold now).

        A head grows in place when the blocks right after its last one are free and not kept for another head.
        The others get fresh runs of the lowest free blocks, each followed by the room its sequence is expected to
        grow into (kept for it), as long as the unkept free blocks cover every run and its room; else plain lowest
        free blocks.
        """
        li, bi, hi = np.nonzero(need)
        n, h_held, seq = need[li, bi, hi], held[li, bi, hi], sid[bi]
        me = self._head_id(li, seq, hi)
        owner, offset = _runs(n)  # the head each new block goes to, and its rank among that head's new blocks
        last = self.block_tables[li, seq, hi, np.maximum(h_held - 1, 0)].astype(np.int64)
        want = last[owner] + 1 + offset
        cand = np.minimum(want, self.num_blocks - 1)
        kept = self._kept_for[cand]
        fits = (want < self.num_blocks) & self._free[cand] & ((kept < 0) | (kept == me[owner]))
        in_place = (h_held > 0) & (np.bincount(owner, weights=~fits, minlength=n.size) == 0)
        blocks = np.where(in_place[owner], cand, -1)
        self._take(blocks[in_place[owner]])
        fresh = ~in_place[owner]
        if fresh.any():
            fresh_n = n * ~in_place
            room = np.maximum(-(-self.expected[seq] // self.block_size) - h_held - n, 0) * ~in_place
            unkept = np.flatnonzero(self._free & (self._kept_for < 0))
            if unkept.size >= fresh_n.sum() + room.sum():
                span = fresh_n + room
                run = np.cumsum(span) - span  # each fresh head's run starts here in ``unkept``
                blocks[fresh] = unkept[(run[owner] + offset)[fresh]]
                self._take(blocks[fresh])
                k, k_rank = _runs(room)
                self._kept_for[unkept[run[k] + n[k] + k_rank]] = me[k]
            else:
                blocks[fresh] = self._pop_free(int(fresh.sum()))
        self.block_tables[li[owner], seq[owner], hi[owner], h_held[owner] + offset] = blocks

    # ------------------------------------------------------------------ writes
    def _need(self, sid: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Blocks each (layer, sequence, head) must gain for ``counts`` more tokens: ``[L, B, H]``."""
        want = -(-(self.lengths[:, sid] + counts[None, :, None]) // self.block_size)
        return np.maximum(want - self.num_blocks_held[:, sid], 0)

    def blocks_needed(self, seq_ids: list[int], num_new: list[int]) -> int:
        """Blocks that :meth:`plan_step` would allocate for ``num_new[i]`` more tokens per head of ``seq_ids[i]``."""
        return int(self._need(np.asarray(seq_ids, dtype=np.int64), np.asarray(num_new, dtype=np.int64)).sum())

    def plan_step(self, seq_ids: list[int], num_new: list[int]) -> StepPlan:
        """Reserve blocks for a forward of ``num_new[i]`` packed tokens of each sequence, on every layer, and build
        the step's device metadata (write slots, block tables, lengths, positions) once for all layers.

        The host bookkeeping moves to the post-step state (lengths and ``seen`` grow) before the forward runs;
        the forward then writes each layer's keys through :meth:`write`. Raises :class:`PoolExhaustedError` (or a
        ``ValueError`` when a head would outgrow its block table) before changing anything.
        """
        self._check_live(seq_ids)
        sid = np.asarray(seq_ids, dtype=np.int64)
        counts = np.asarray(num_new, dtype=np.int64)
        need = self._need(sid, counts)  # [L, B, H]
        held = self.num_blocks_held[:, sid]
        if need.size and int((held + need).max()) > self.max_blocks_per_head:
            raise ValueError(
                f"a head would hold more than max_tokens_per_head={self.max_blocks_per_head * self.block_size} "
                "tokens; create the cache with a larger max_tokens_per_head"
            )
        total = int(need.sum())
        if total > self._num_free:
            raise PoolExhaustedError(total, self._num_free, self.num_blocks)
        L, B, H = need.shape
        if total:
            self._allocate(sid, need, held)
            self.num_blocks_held[:, sid] = held + need

        cu = np.concatenate([[0], np.cumsum(counts)])
        tok_seq, rank = _runs(counts)  # [T]: each new token's sequence, and its rank among that sequence's tokens
        index = self.lengths[:, sid][:, tok_seq] + rank[None, :, None]  # [L, T, H] logical slot of each new token
        layers, heads = np.arange(L)[:, None, None], np.arange(H)[None, None, :]
        block = self.block_tables[layers, sid[tok_seq][None, :, None], heads, index // self.block_size]
        slots = block.astype(np.int64) * self.block_size + index % self.block_size
        positions = self.seen[sid][tok_seq] + rank
        starts = self.seen[sid].copy()
        self.lengths[:, sid] += counts[None, :, None]
        self.seen[sid] += counts
        lengths = self.lengths[:, sid]
        cols = max(int(self.num_blocks_held[:, sid].max()), 1)
        tables = self.block_tables[:, sid, :, :cols]
        max_len, min_len = lengths.reshape(L, -1).max(1), lengths.reshape(L, -1).min(1)
        decode_on_cpu = self.device.type == "cpu" and bool((counts == 1).all())
        layout = self._layout(tables, max_len == min_len) if decode_on_cpu else [None] * L
        pos_d = self.upload(positions, torch.long)
        return StepPlan(
            seq_ids=list(seq_ids),
            counts=counts.tolist(),
            starts=starts.tolist(),
            cu_seqlens=self.upload(cu, torch.int32),
            positions=pos_d,
            slot_positions=self.upload(np.repeat(positions, H), torch.int32),
            slots=self.upload(slots, torch.long),
            block_tables=self.upload(tables, torch.int32),
            lengths=self.upload(lengths, torch.int32),
            max_len=max_len.tolist(),
            min_len=min_len.tolist(),
            layout=layout,
            token_seqs=None if self.slot_sketch is None else self.upload(sid[tok_seq], torch.long),
            sketched=bool(self.sketched[sid].any()),
        )

    def _layout(self, tables: np.ndarray, uniform: np.ndarray) -> list[tuple[int, int, int] | None]:
        """Per layer, ``(first, seq_stride, head_stride)`` in slots when each head's blocks in ``tables``
        (``[L, B, H, cols]``, post-step) are consecutive and the heads' first blocks form that grid, for layers
        whose heads all hold the same length (``uniform`` ``[L]``); else None (see :class:`StepPlan`)."""
        L, B, H, cols = tables.shape
        first = tables[..., 0].astype(np.int64)
        base = first[:, :1, :1]
        seq_stride = first[:, 1:2, :1] - base if B > 1 else np.zeros_like(base)
        head_stride = first[:, :1, 1:2] - base if H > 1 else np.zeros_like(base)
        grid = base + np.arange(B)[:, None] * seq_stride + np.arange(H) * head_stride
        ok = uniform & (first == grid).all((1, 2)) & (seq_stride >= 0).ravel() & (head_stride >= 0).ravel()
        if ok.any():  # each head's blocks are one run (entries past a head's blocks are -1)
            ok &= ((tables == first[..., None] + np.arange(cols)) | (tables < 0)).all((1, 2, 3))
        bs = self.block_size
        return [
            (int(base[i, 0, 0]) * bs, int(seq_stride[i, 0, 0]) * bs, int(head_stride[i, 0, 0]) * bs) if ok[i] else None
            for i in range(L)
        ]

    def write(self, layer: int, plan: StepPlan, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one layer's packed new tokens (``keys``/``values`` ``[T_total, H, D]``, post-RoPE) into the slots
        :meth:`plan_step` reserved; their scores (and summary biases) start at 0."""
        D = self.head_dim
        write_kv(
            self.k_cache,
            self.v_cache,
            self.slot_pos,
            self.slot_score,
            plan.slots[layer].reshape(-1),
            keys.reshape(-1, D).to(self.dtype),
            values.reshape(-1, D).to(self.dtype),
            plan.slot_positions,
            self.slot_bias,
        )

    def _slot(self, layer: np.ndarray, seq: np.ndarray, head: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Flat physical slot ids (block * block_size + offset) of logical slot ``index`` of (``layer``, ``seq``,
        ``head``); the arguments broadcast against each other."""
        block = self.block_tables[layer, seq, head, index // self.block_size].astype(np.int64)
        return block * self.block_size + index % self.block_size

    # ------------------------------------------------------------------ reads
    def view(self, layer: int, seq_ids: list[int], with_kv: bool = True) -> HeadView:
        """Gather one layer's heads of ``seq_ids`` into padded dense tensors (see :class:`HeadView`).

        Sizes come from the host bookkeeping, so a view reads nothing back from the device.
        """
        sid = np.asarray(seq_ids, dtype=np.int64)
        lengths_h = self.lengths[layer, sid]  # [S, H]
        max_len = int(lengths_h.max()) if lengths_h.size else 0
        cols = max(-(-max_len // self.block_size), 1)
        tables = self.upload(self.block_tables[layer, sid, :, :cols], torch.int32)
        lengths = self.upload(lengths_h, torch.long)
        blocks, offsets, valid = gather_logical(tables, lengths, self.block_size, max_len)
        slots = torch.where(valid, blocks * self.block_size + offsets, self.scratch_slot)  # [S, H, L]
        flat = slots.reshape(-1)
        empty = self.k_cache.new_empty(0)
        keys = self.k_cache.view(-1, self.head_dim)[flat].view(*slots.shape, self.head_dim) if with_kv else empty
        values = self.v_cache.view(-1, self.head_dim)[flat].view(*slots.shape, self.head_dim) if with_kv else empty
        return HeadView(
            layer=layer,
            seq_ids=list(seq_ids),
            keys=keys,
            values=values,
            positions=self.slot_pos.view(-1)[flat].view(slots.shape).long(),
            scores=self.slot_score.view(-1)[flat].view(slots.shape),
            valid=valid,
            slots=slots,
            lengths=lengths,
        )

    def set_scores(self, view: HeadView, scores: torch.Tensor) -> None:
        """The one way policies write scores: store ``scores`` (``[S, H, L]``, aligned with ``view``) into the view's
        slots (padded entries land in the scratch block)."""
        self.slot_score.view(-1)[view.slots.reshape(-1)] = scores.reshape(-1).float()

    # ------------------------------------------------------------------ eviction
    def evict(self, seq_ids: list[int], keep: torch.Tensor) -> int:
        """Keep only the slots where ``keep`` (``[num_layers, S, H, N]`` over logical slots) is True; slots at or
        past ``N`` are evicted.

        Tail survivors move into the holes left by evicted slots (one :func:`compact` for every layer); whole
        trailing blocks return to the pool. Reads the mask back once. Returns the number of blocks freed.
        """
        self._check_live(seq_ids)
        sid = np.asarray(seq_ids, dtype=np.int64)
        lengths = self.lengths[:, sid]  # [L, S, H]
        idx = np.arange(keep.shape[-1])
        mask = keep.cpu().numpy().astype(bool) & (idx < lengths[..., None])
        new_len = mask.sum(-1)  # [L, S, H]
        hole = ~mask & (idx < new_len[..., None])
        mover = mask & (idx >= new_len[..., None])
        # argwhere is row-major and each head has as many holes as movers, so the k-th hole pairs with the k-th mover
        h_rows, m_rows = np.argwhere(hole), np.argwhere(mover)
        if len(h_rows):
            dst = self._slot(h_rows[:, 0], sid[h_rows[:, 1]], h_rows[:, 2], h_rows[:, 3])
            src = self._slot(m_rows[:, 0], sid[m_rows[:, 1]], m_rows[:, 2], m_rows[:, 3])
            src_d, dst_d = self.upload(src, torch.long), self.upload(dst, torch.long)
            compact(self.k_cache, self.v_cache, self.slot_pos, self.slot_score, src_d, dst_d, self.slot_bias)
        return self._shrink(sid, new_len)

    def truncate(self, seq_id: int, n: int) -> int:
        """Drop the last ``n`` tokens written to ``seq_id`` from every head and rewind ``seen`` by ``n`` (a
        forward appends each head's new tokens at its tail, so they are its last ``n`` logical slots). Releases
        tokens teacher-forced only to be observed (KVzip's reconstruction); returns the number of blocks freed."""
        self._check_live([seq_id])
        sid = np.asarray([seq_id], dtype=np.int64)
        if not 0 <= n <= int(self.lengths[:, sid].min()):
            raise ValueError(f"cannot truncate {n} tokens from sequence {seq_id}: its shortest head holds fewer")
        self.seen[seq_id] -= n
        return self._shrink(sid, self.lengths[:, sid] - n)

    @contextmanager
    def rewound(self, seq_id: int, n: int, scored: tuple[int, int] | None = None) -> Iterator[None]:
        """Within the block, ``seq_id`` reads as its first ``n`` tokens: its slots at positions ``>= n`` stay cached
        but leave every query's reach (their positions move up by :data:`HIDDEN`, so causality masks them) and the
        next token written gets position ``n``. On exit the tokens written within are truncated and the hidden
        slots come back. KVzip reconstructs a long prompt chunk by chunk this way, each pass seeing the prompt only
        up to its chunk's end. ``n == seen``: nothing is hidden (plain teacher-forcing, then truncation).

        ``scored = (a, b)``: the scores written within survive only at positions in ``[a, b)``; every other slot's
        score is put back on exit. None: all stay."""
        self._check_live([seq_id])
        seen, lengths = int(self.seen[seq_id]), self.lengths[:, seq_id].copy()
        if not 0 <= n <= seen:
            raise ValueError(f"cannot rewind sequence {seq_id} to {n} tokens: it has seen {seen}")
        if scored is not None and not 0 <= scored[0] <= scored[1]:
            raise ValueError(f"rewound(scored=(a, b)) needs 0 <= a <= b, got {scored}")
        # the prompt's slots stay put within the block (truncation drops only the written tail), so the views taken
        # now still address them on exit
        before = (
            None if scored is None else [self.view(layer, [seq_id], with_kv=False) for layer in range(self.num_layers)]
        )
        hide = n < seen
        if hide:
            self._shift_positions(seq_id, n, HIDDEN)
        self.seen[seq_id] = n
        try:
            yield
        finally:
            written = self.lengths[:, seq_id] - lengths
            assert (written == written.flat[0]).all(), "a forward appends the same tokens to every head"
            self.truncate(seq_id, int(written.flat[0]))
            self.seen[seq_id] = seen
            if hide:
                self._shift_positions(seq_id, HIDDEN, -HIDDEN)
            if before is not None:
                self._restore_scores(before, scored)

    def _restore_scores(self, before: list[HeadView], scored: tuple[int, int]) -> None:
        """Write back the scores ``before`` holds (views taken on entry to :meth:`rewound`, one per layer) into their
        slots at positions outside ``scored``; the other slots keep what was written since."""
        a, b = scored
        for v in before:
            outside = v.valid & ((v.positions < a) | (v.positions >= b))
            self.set_scores(v, torch.where(outside, v.scores, self.slot_score.view(-1)[v.slots]))

    def _shift_positions(self, seq_id: int, lo: int, delta: int) -> None:
        """Add ``delta`` to the position of every slot of ``seq_id`` at position ``>= lo``, on device (padded view
        entries write the scratch block's own position back)."""
        for layer in range(self.num_layers):
            v = self.view(layer, [seq_id], with_kv=False)
            moved = torch.where(v.valid & (v.positions >= lo), v.positions + delta, v.positions)
            self.slot_pos.view(-1)[v.slots.reshape(-1)] = moved.reshape(-1).to(self.slot_pos.dtype)

    def _shrink(self, sid: np.ndarray, new_len: np.ndarray) -> int:
        """Set the lengths of sequences ``sid`` to ``new_len`` ``[L, S, H]`` (each head keeps its first slots) and
        return the now-empty trailing blocks to the pool; returns how many."""
        held = self.num_blocks_held[:, sid]
        new_held = -(-new_len // self.block_size)
        mb = np.arange(self.max_blocks_per_head)
        freed = (mb >= new_held[..., None]) & (mb < held[..., None])  # [L, S, H, MB]
        tables = self.block_tables[:, sid]
        li, si, hi, _ = np.nonzero(freed)
        self._push_free(tables[freed], kept_for=self._head_id(li, sid[si], hi))  # room to grow back into
        tables[freed] = -1
        self.block_tables[:, sid] = tables
        self.num_blocks_held[:, sid] = new_held
        self.lengths[:, sid] = new_len
        return int(freed.sum())

    # ------------------------------------------------------------------ accounting
    def memory(self, seq_ids: list[int] | None = None) -> MemoryStats:
        """Memory accounting for ``seq_ids`` (default: every live sequence), from the host bookkeeping."""
        sid = np.asarray(sorted(self._live) if seq_ids is None else seq_ids, dtype=np.int64)
        kept = self.lengths[:, sid]
        blocks = int(self.num_blocks_held[:, sid].sum())
        seen = int(self.seen[sid].sum()) * self.num_layers * self.num_kv_heads
        elt = self.k_cache.element_size()
        return MemoryStats(
            tokens_seen=seen,
            tokens_kept=int(kept.sum()),
            blocks_allocated=blocks,
            # + one int32 block-table entry per block, and each sequence's sketches (float32) where the cache has them
            allocated_bytes=blocks * (self.block_bytes + 4) + len(sid) * self.sketch_bytes,
            dense_bytes=seen * 2 * self.head_dim * elt,
            kept_per_head=torch.from_numpy(kept.copy()),
        )
