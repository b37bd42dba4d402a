"""The paged, per-head KV cache.

A physical block holds ``block_size`` tokens of **one KV head of one layer**. Every (layer, sequence, kv_head)
owns a block table and a length, so heads keep different numbers of tokens and evicted memory returns to one
shared pool that every layer draws from.

Storage (one pool for all layers)::

    k_cache, v_cache : [num_blocks, block_size, head_dim]   model dtype
    slot_pos         : [num_blocks, block_size] int32       original token position (RoPE was applied at write)
    slot_score       : [num_blocks, block_size] float32     policy score, accumulated by the scorers

Bookkeeping::

    block_tables : [num_layers, max_seqs, num_kv_heads, max_blocks_per_head] int32, -1 where unallocated
    lengths      : [num_layers, max_seqs, num_kv_heads] int32   tokens held by the head
    num_blocks_held : same shape, blocks allocated to the head (== ceil(length / block_size) outside a step)
    seen         : [max_seqs] int64   tokens the sequence has seen = the next token's true position

Logical slot ``j`` of a head lives at physical block ``block_tables[l, s, h, j // block_size]``, offset
``j % block_size``. Eviction compacts a head by moving its surviving tail tokens into the holes left by
evicted ones (so slot order stops being position order; positions travel with the slot) and then returns
the now-empty trailing blocks to the pool. This is the scheme of Cloudflare's KV-Compress.

Writes are two-phase so a full pool never leaves a half-updated cache: :meth:`reserve` allocates every block a
forward step will need across all layers (or raises :class:`PoolExhaustedError` having changed nothing), then
:meth:`append` writes each layer into blocks that are guaranteed to exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kvcompress_kernels import compact, gather_logical, write_kv


class PoolExhaustedError(RuntimeError):
    """Raised by :meth:`PagedKVCache.reserve` when the pool lacks the blocks a step needs. Nothing was changed."""

    def __init__(self, needed: int, free: int, total: int) -> None:
        super().__init__(
            f"KV block pool exhausted: this step needs {needed} more blocks but only {free} of {total} are free. "
            "Raise the pool size (num_blocks), compress harder, or run fewer sequences at once."
        )
        self.needed, self.free, self.total = needed, free, total


@dataclass
class MemoryStats:
    """Memory accounting of the sequences in a cache (design.md section 1).

    ``logical_compression`` is tokens seen / tokens kept summed over every (layer, head) of the sequences;
    ``physical_compression`` is the bytes a dense cache of the same sequences would hold / the bytes of the
    blocks allocated to them, including per-slot metadata (position, score) and block-table entries.
    """

    tokens_seen: int
    tokens_kept: int
    blocks_allocated: int
    allocated_bytes: int
    dense_bytes: int
    kept_per_head: torch.Tensor  # [num_layers, n_seqs, num_kv_heads] int

    @property
    def logical_compression(self) -> float:
        return self.tokens_seen / max(self.tokens_kept, 1)

    @property
    def physical_compression(self) -> float:
        return self.dense_bytes / max(self.allocated_bytes, 1)


@dataclass
class HeadView:
    """Per-head contents of one layer for a set of sequences, padded to the longest head.

    All tensors are ``[n_seqs, num_kv_heads, max_len, ...]``; ``valid`` marks real slots (index < length).
    ``slots`` holds flat physical slot ids (block * block_size + offset), 0 where invalid.
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
    ) -> None:
        if num_blocks <= 0 or block_size <= 0 or max_seqs <= 0:
            raise ValueError(
                f"num_blocks ({num_blocks}), block_size ({block_size}) and max_seqs ({max_seqs}) must be positive"
            )
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_blocks, self.block_size, self.max_seqs = num_blocks, block_size, max_seqs
        self.max_blocks_per_head = -(-max_tokens_per_head // block_size)
        self.dtype, self.device = dtype, torch.device(device)
        shape = (num_blocks, block_size)
        self.k_cache = torch.zeros(*shape, head_dim, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(*shape, head_dim, dtype=dtype, device=self.device)
        self.slot_pos = torch.zeros(shape, dtype=torch.int32, device=self.device)
        self.slot_score = torch.zeros(shape, dtype=torch.float32, device=self.device)
        table_shape = (num_layers, max_seqs, num_kv_heads)
        self.block_tables = torch.full(
            (*table_shape, self.max_blocks_per_head), -1, dtype=torch.int32, device=self.device
        )
        self.lengths = torch.zeros(table_shape, dtype=torch.int32, device=self.device)
        self.num_blocks_held = torch.zeros(table_shape, dtype=torch.int32, device=self.device)
        self.seen = torch.zeros(max_seqs, dtype=torch.int64)
        self._free = torch.arange(num_blocks - 1, -1, -1, dtype=torch.int32)  # a stack; top = _free[_num_free - 1]
        self._num_free = num_blocks
        self._live: set[int] = set()
        self.peak_blocks = 0

    # ------------------------------------------------------------------ sizes
    @property
    def block_bytes(self) -> int:
        """Bytes of one block: K and V plus the per-slot position (int32) and score (float32)."""
        elt = self.k_cache.element_size()
        return self.block_size * (2 * self.head_dim * elt + 4 + 4)

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

    # ------------------------------------------------------------------ sequences
    def add_sequence(self) -> int:
        """Claim a free sequence slot and return its id."""
        for s in range(self.max_seqs):
            if s not in self._live:
                self._live.add(s)
                return s
        raise RuntimeError(f"all {self.max_seqs} sequence slots of the cache are in use; release one first")

    def release(self, seq_id: int) -> None:
        """Free every block of a sequence and make its slot reusable."""
        self._check_live([seq_id])
        held = self.num_blocks_held[:, seq_id]  # [L, H]
        ids = self.block_tables[:, seq_id][torch.arange(self.max_blocks_per_head, device=self.device) < held[..., None]]
        self._push_free(ids)
        self.block_tables[:, seq_id] = -1
        self.lengths[:, seq_id] = 0
        self.num_blocks_held[:, seq_id] = 0
        self.seen[seq_id] = 0
        self._live.discard(seq_id)

    def fork(self, seq_id: int) -> int:
        """Copy every head of ``seq_id`` (contents, positions, scores) into fresh blocks of a new sequence.

        Used to let several questions share one compressed context (query-agnostic mode) without recomputing it.
        """
        self._check_live([seq_id])
        held = self.num_blocks_held[:, seq_id]  # [L, H]
        total = int(held.sum())
        if total > self._num_free:
            raise PoolExhaustedError(total, self._num_free, self.num_blocks)
        new = self.add_sequence()
        used = torch.arange(self.max_blocks_per_head, device=self.device) < held[..., None]  # [L, H, MB]
        src = self.block_tables[:, seq_id][used].long()
        dst = self._pop_free(total)
        for pool in (self.k_cache, self.v_cache, self.slot_pos, self.slot_score):
            pool[dst.long()] = pool[src]
        self.block_tables[:, new][used] = dst  # basic indexing: a view, written in place
        self.lengths[:, new] = self.lengths[:, seq_id]
        self.num_blocks_held[:, new] = held
        self.seen[new] = self.seen[seq_id]
        return new

    def _check_live(self, seq_ids: list[int]) -> None:
        dead = [s for s in seq_ids if s not in self._live]
        if dead:
            raise KeyError(f"sequence ids {dead} are not live in this cache (live: {sorted(self._live)})")

    # ------------------------------------------------------------------ pool
    def _pop_free(self, n: int) -> torch.Tensor:
        ids = self._free[self._num_free - n : self._num_free].flip(0).to(self.device)
        self._num_free -= n
        self.peak_blocks = max(self.peak_blocks, self.num_used_blocks)
        return ids

    def _push_free(self, ids: torch.Tensor) -> None:
        n = ids.numel()
        self._free[self._num_free : self._num_free + n] = ids.to("cpu", torch.int32)
        self._num_free += n

    # ------------------------------------------------------------------ writes
    def blocks_needed(self, seq_ids: list[int], num_new: list[int]) -> int:
        """Blocks that :meth:`reserve` would allocate for ``num_new[i]`` more tokens per head of ``seq_ids[i]``."""
        return int(self._need(seq_ids, num_new).sum())

    def _need(self, seq_ids: list[int], num_new: list[int]) -> torch.Tensor:
        sid = torch.as_tensor(seq_ids, device=self.device)
        new = torch.as_tensor(num_new, device=self.device, dtype=torch.int32)[None, :, None]
        want = (self.lengths[:, sid] + new + self.block_size - 1) // self.block_size
        return (want - self.num_blocks_held[:, sid]).clamp_min(0)  # [L, B, H]

    def reserve(self, seq_ids: list[int], num_new: list[int]) -> None:
        """Allocate, for every layer and head, the blocks that ``num_new`` more tokens per sequence need.

        Raises :class:`PoolExhaustedError` before changing anything when the pool is too small, and a
        ``ValueError`` when a head would outgrow its block table.
        """
        self._check_live(seq_ids)
        sid = torch.as_tensor(seq_ids, device=self.device)
        need = self._need(seq_ids, num_new)
        total = int(need.sum())
        held = self.num_blocks_held[:, sid]
        if int((held + need).max()) > self.max_blocks_per_head:
            raise ValueError(
                f"a head would hold more than max_tokens_per_head={self.max_blocks_per_head * self.block_size} "
                "tokens; create the cache with a larger max_tokens_per_head"
            )
        if total > self._num_free:
            raise PoolExhaustedError(total, self._num_free, self.num_blocks)
        if total == 0:
            return
        ids = self._pop_free(total)
        flat_need = need.reshape(-1)
        head = torch.repeat_interleave(torch.arange(flat_need.numel(), device=self.device), flat_need)
        first = torch.cumsum(flat_need, 0) - flat_need
        offset = torch.arange(total, device=self.device) - first[head]
        L, B, H = need.shape
        li, bi, hi = head // (B * H), (head // H) % B, head % H
        logical = held.reshape(-1)[head] + offset
        self.block_tables[li, sid[bi], hi, logical.long()] = ids
        self.num_blocks_held[:, sid] = held + need

    def _slot(
        self, layer: int | torch.Tensor, seq: torch.Tensor, head: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """Flat physical slot ids (block * block_size + offset) of logical slot ``index`` of (``layer``, ``seq``,
        ``head``); tensor arguments broadcast against each other."""
        block = self.block_tables[layer, seq, head, (index // self.block_size).long()].long()
        return block * self.block_size + index % self.block_size

    def append_slots(self, seq_ids: list[int], cu_seqlens: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Physical slots where :meth:`append` writes the packed new tokens of ``seq_ids``: ``[num_layers, T_total,
        H]`` for every layer at once (one vectorised plan per forward step, so the per-layer write is a single
        scatter; call it before any layer of the step is written), or ``[T_total, H]`` for one ``layer``."""
        sid = torch.as_tensor(seq_ids, device=self.device)
        cu = cu_seqlens.to(self.device, torch.int64)
        counts = cu[1:] - cu[:-1]
        tok_seq = torch.repeat_interleave(torch.arange(len(seq_ids), device=self.device), counts)  # [T]
        rank = torch.arange(int(cu[-1]), device=self.device) - cu[:-1][tok_seq]
        layers = torch.arange(self.num_layers) if layer is None else torch.tensor([layer])
        layers = layers.to(self.device)
        index = self.lengths[layers][:, sid].long()[:, tok_seq] + rank[None, :, None]  # [L', T, H]
        held = self.num_blocks_held[layers][:, sid].long()[:, tok_seq]
        if bool((index // self.block_size >= held).any()):
            raise RuntimeError("append() without reserve(): a token would land in an unallocated block")
        heads = torch.arange(self.num_kv_heads, device=self.device)[None, None, :]
        slots = self._slot(layers[:, None, None], sid[tok_seq][None, :, None], heads, index)  # [L', T, H]
        return slots if layer is None else slots[0]

    def append(
        self,
        layer: int,
        seq_ids: list[int],
        cu_seqlens: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor | None = None,
    ) -> None:
        """Write packed new tokens of one layer at the end of each head; blocks must be reserved.

        ``keys``/``values``: ``[T_total, H, D]`` (post-RoPE), ``positions``: ``[T_total]``, ``cu_seqlens``:
        ``[B + 1]`` offsets of each sequence's tokens. ``slots`` ``[T_total, H]``: this layer's row of
        :meth:`append_slots`, computed before any layer of the step was written (recomputed when None). The length
        of every head of every sequence grows by that sequence's token count; scores of the new slots start at 0.
        """
        if slots is None:
            slots = self.append_slots(seq_ids, cu_seqlens, layer)
        sid = torch.as_tensor(seq_ids, device=self.device)
        counts = (cu_seqlens[1:] - cu_seqlens[:-1]).to(self.device, torch.int32)
        H, D = self.num_kv_heads, self.head_dim
        write_kv(
            self.k_cache,
            self.v_cache,
            self.slot_pos,
            self.slot_score,
            slots.reshape(-1),
            keys.reshape(-1, D).to(self.dtype),
            values.reshape(-1, D).to(self.dtype),
            positions.to(self.device, torch.int32)[:, None].expand(-1, H).reshape(-1),
        )
        self.lengths[layer, sid] += counts[:, None]

    def advance(self, seq_ids: list[int], num_new: list[int]) -> None:
        """Record that the sequences have seen ``num_new`` more tokens (call once per forward step)."""
        for s, n in zip(seq_ids, num_new, strict=True):
            self.seen[s] += n

    # ------------------------------------------------------------------ reads
    def view(self, layer: int, seq_ids: list[int], with_kv: bool = True) -> HeadView:
        """Gather one layer's heads of ``seq_ids`` into padded dense tensors (see :class:`HeadView`)."""
        sid = torch.as_tensor(seq_ids, device=self.device)
        lengths = self.lengths[layer, sid].long()  # [S, H]
        max_len = int(lengths.max()) if lengths.numel() else 0
        blocks, offsets, valid = gather_logical(self.block_tables[layer, sid], lengths, self.block_size, max_len)
        slots = torch.where(valid, blocks * self.block_size + offsets, 0)  # [S, H, L]
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
        """Store ``scores`` (``[S, H, L]``, aligned with ``view``) into the valid slots of the view."""
        self.slot_score.view(-1)[view.slots[view.valid]] = scores[view.valid].float()

    # ------------------------------------------------------------------ eviction
    def evict(self, layer: int, seq_ids: list[int], keep: torch.Tensor) -> int:
        """Keep only the slots where ``keep`` (``[S, H, L]`` over logical slots, L ≥ max length) is True.

        Tail survivors move into the holes left by evicted slots; whole trailing blocks return to the pool.
        Returns the number of blocks freed.
        """
        sid = torch.as_tensor(seq_ids, device=self.device)
        lengths = self.lengths[layer, sid].long()  # [S, H]
        L = keep.shape[-1]
        idx = torch.arange(L, device=self.device)
        keep = keep.to(self.device) & (idx < lengths[..., None])
        new_len = keep.sum(-1)  # [S, H]
        hole = ~keep & (idx < new_len[..., None])
        mover = keep & (idx >= new_len[..., None])
        # nonzero() is row-major and each head has as many holes as movers, so the k-th hole pairs with the k-th mover.
        h_rows, m_rows = hole.nonzero(), mover.nonzero()
        if h_rows.numel():
            dst = self._slot(layer, sid[h_rows[:, 0]], h_rows[:, 1], h_rows[:, 2])
            src = self._slot(layer, sid[m_rows[:, 0]], m_rows[:, 1], m_rows[:, 2])
            compact(self.k_cache, self.v_cache, self.slot_pos, self.slot_score, src, dst)
        held = self.num_blocks_held[layer, sid].long()
        new_held = (new_len + self.block_size - 1) // self.block_size
        mb = torch.arange(self.max_blocks_per_head, device=self.device)
        freed = (mb >= new_held[..., None]) & (mb < held[..., None])  # [S, H, MB]
        bt = self.block_tables[layer, sid]
        self._push_free(bt[freed])
        bt[freed] = -1
        self.block_tables[layer, sid] = bt
        self.num_blocks_held[layer, sid] = new_held.to(torch.int32)
        self.lengths[layer, sid] = new_len.to(torch.int32)
        return int(freed.sum())

    # ------------------------------------------------------------------ accounting
    def memory(self, seq_ids: list[int] | None = None) -> MemoryStats:
        """Memory accounting for ``seq_ids`` (default: every live sequence)."""
        seq_ids = sorted(self._live) if seq_ids is None else seq_ids
        sid = torch.as_tensor(seq_ids, dtype=torch.long, device=self.device)
        kept = self.lengths[:, sid].long()
        blocks = int(self.num_blocks_held[:, sid].sum())
        seen = int(self.seen[sid.cpu()].sum()) * self.num_layers * self.num_kv_heads
        elt = self.k_cache.element_size()
        return MemoryStats(
            tokens_seen=seen,
            tokens_kept=int(kept.sum()),
            blocks_allocated=blocks,
            allocated_bytes=blocks * (self.block_bytes + 4),  # + one int32 block-table entry per block
            dense_bytes=seen * 2 * self.head_dim * elt,
            kept_per_head=kept.cpu(),
        )
