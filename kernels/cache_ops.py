"""Data movement on the paged KV pool: scatter new tokens (``write_kv``) and move slots (``compact``).

Slots are addressed by flat id ``block * block_size + offset`` (int64, so pools past 2**31 elements
work). ``compact`` is the data half of eviction: the cache decides which surviving tail slots move into
which holes; this op copies K, V, position and score from ``src_slots`` to ``dst_slots``. Both take the
pool's optional ``slot_bias`` (summary slots' logit biases): ``write_kv`` zeroes it at the written slots (a
recycled slot may have held a summary) and ``compact`` moves it with the rest, in the same launch. The two sets
must be disjoint (a slot is never both read and written), which makes the copy order irrelevant.

Both Triton kernels use a grid of ``cdiv(N, BLOCK_T)`` programs, each moving ``BLOCK_T`` rows of K and V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_cache, check_slot_bias, next_pow2
from .backend import use_triton

__all__ = ["compact", "compact_torch", "compact_triton", "write_kv", "write_kv_torch", "write_kv_triton"]

_BLOCK_T = 16


def _check_meta(k_cache: torch.Tensor, slot_pos: torch.Tensor, slot_score: torch.Tensor) -> tuple[int, int]:
    """Validate the pool's metadata tensors; return (block_size, head_dim)."""
    block_size, head_dim = k_cache.shape[1], k_cache.shape[2]
    if slot_pos.shape != k_cache.shape[:2] or slot_pos.dtype != torch.int32 or not slot_pos.is_contiguous():
        raise ValueError(f"slot_pos must be contiguous int32 {tuple(k_cache.shape[:2])}")
    if slot_score.shape != k_cache.shape[:2] or slot_score.dtype != torch.float32 or not slot_score.is_contiguous():
        raise ValueError(f"slot_score must be contiguous float32 {tuple(k_cache.shape[:2])}")
    return block_size, head_dim


def _check_write(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_score: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    slot_bias: torch.Tensor | None,
) -> tuple[int, int]:
    check_cache(k_cache, v_cache)
    check_slot_bias(slot_bias, k_cache)
    block_size, head_dim = _check_meta(k_cache, slot_pos, slot_score)
    n = slots.shape[0]
    if slots.dim() != 1 or slots.dtype != torch.int64:
        raise ValueError("slots must be int64 [N]")
    if k.shape != (n, head_dim) or v.shape != (n, head_dim):
        raise ValueError(f"k and v must be [{n}, {head_dim}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if pos.shape != (n,):
        raise ValueError(f"pos must be [{n}]")
    return block_size, head_dim


def _check_compact(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_score: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    slot_bias: torch.Tensor | None,
) -> tuple[int, int]:
    check_cache(k_cache, v_cache)
    check_slot_bias(slot_bias, k_cache)
    block_size, head_dim = _check_meta(k_cache, slot_pos, slot_score)
    if src_slots.dim() != 1 or src_slots.shape != dst_slots.shape:
        raise ValueError("src_slots and dst_slots must both be [M]")
    if src_slots.dtype != torch.int64 or dst_slots.dtype != torch.int64:
        raise ValueError("src_slots and dst_slots must be int64")
    return block_size, head_dim


# ----------------------------------------------------------------------------------------------------------
# PyTorch references
# ----------------------------------------------------------------------------------------------------------


def write_kv_torch(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_score: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    slot_bias: torch.Tensor | None = None,
) -> None:
    """PyTorch reference of :func:`write_kv` (indexed assignment on flat views)."""
    _, head_dim = _check_write(k_cache, v_cache, slot_pos, slot_score, slots, k, v, pos, slot_bias)
    # flat views and index_copy_: one row copy per slot, several times cheaper on CPU than (block, offset) indexing
    k_cache.view(-1, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))
    slot_pos.view(-1).index_copy_(0, slots, pos.to(torch.int32))
    slot_score.view(-1).index_fill_(0, slots, 0.0)
    if slot_bias is not None:
        slot_bias.view(-1).index_fill_(0, slots, 0.0)


def compact_torch(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_score: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    slot_bias: torch.Tensor | None = None,
) -> None:
    """PyTorch reference of :func:`compact` (gather from src, then scatter to dst)."""
    block_size, _ = _check_compact(k_cache, v_cache, slot_pos, slot_score, src_slots, dst_slots, slot_bias)
    sb, so = src_slots // block_size, src_slots % block_size
    db, do = dst_slots // block_size, dst_slots % block_size
    k_cache[db, do] = k_cache[sb, so]
    v_cache[db, do] = v_cache[sb, so]
    slot_pos.view(-1)[dst_slots] = slot_pos.view(-1)[src_slots]
    slot_score.view(-1)[dst_slots] = slot_score.view(-1)[src_slots]
    if slot_bias is not None:
        slot_bias.view(-1)[dst_slots] = slot_bias.view(-1)[src_slots]


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _move_rows(dst_ptr, dst_b, dst_o, dst_sb, dst_ss, src_ptr, src_b, src_o, src_sb, src_ss, offs_d, mask_t, mask_d):
    """Copy ``[BLOCK_T, BLOCK_D]`` rows between (block, offset)-addressed tensors, casting to dst dtype."""
    mask = mask_t[:, None] & mask_d[None, :]
    rows = tl.load(src_ptr + src_b[:, None] * src_sb + src_o[:, None] * src_ss + offs_d[None, :], mask=mask)
    tl.store(
        dst_ptr + dst_b[:, None] * dst_sb + dst_o[:, None] * dst_ss + offs_d[None, :],
        rows.to(dst_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _write_kv_kernel(
    k_cache_ptr,
    v_cache_ptr,
    pos_cache_ptr,
    score_ptr,
    bias_ptr,
    slots_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    n,
    stride_kcb,
    stride_kcs,
    stride_vcb,
    stride_vcs,
    stride_k,
    stride_v,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Rows ``[pid*BLOCK_T, +BLOCK_T)`` of ``k``/``v``/``pos`` go to flat slots ``slots[...]``; score (and bias,
    with ``HAS_BIAS``) = 0."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    slot = tl.load(slots_ptr + offs_t, mask=mask_t, other=0)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    row = offs_t.to(tl.int64)
    zero = tl.zeros_like(row)
    _move_rows(k_cache_ptr, blk, off, stride_kcb, stride_kcs, k_ptr, row, zero, stride_k, 0, offs_d, mask_t, mask_d)
    _move_rows(v_cache_ptr, blk, off, stride_vcb, stride_vcs, v_ptr, row, zero, stride_v, 0, offs_d, mask_t, mask_d)
    tl.store(pos_cache_ptr + slot, tl.load(pos_ptr + offs_t, mask=mask_t).to(tl.int32), mask=mask_t)
    tl.store(score_ptr + slot, tl.zeros([BLOCK_T], tl.float32), mask=mask_t)
    if HAS_BIAS:
        tl.store(bias_ptr + slot, tl.zeros([BLOCK_T], tl.float32), mask=mask_t)


@triton.jit
def _compact_kernel(
    k_cache_ptr,
    v_cache_ptr,
    pos_cache_ptr,
    score_ptr,
    bias_ptr,
    src_ptr,
    dst_ptr,
    n,
    stride_kcb,
    stride_kcs,
    stride_vcb,
    stride_vcs,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Move rows ``src_slots[i] -> dst_slots[i]`` for ``i`` in this program's range (K, V, pos, score, and bias
    with ``HAS_BIAS``)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < n
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    src = tl.load(src_ptr + offs_t, mask=mask_t, other=0)
    dst = tl.load(dst_ptr + offs_t, mask=mask_t, other=0)
    sb = src // BLOCK_SIZE
    so = src % BLOCK_SIZE
    db = dst // BLOCK_SIZE
    do = dst % BLOCK_SIZE
    _move_rows(
        k_cache_ptr, db, do, stride_kcb, stride_kcs, k_cache_ptr, sb, so, stride_kcb, stride_kcs, offs_d, mask_t, mask_d
    )
    _move_rows(
        v_cache_ptr, db, do, stride_vcb, stride_vcs, v_cache_ptr, sb, so, stride_vcb, stride_vcs, offs_d, mask_t, mask_d
    )
    tl.store(pos_cache_ptr + dst, tl.load(pos_cache_ptr + src, mask=mask_t), mask=mask_t)
    tl.store(score_ptr + dst, tl.load(score_ptr + src, mask=mask_t), mask=mask_t)
    if HAS_BIAS:
        tl.store(bias_ptr + dst, tl.load(bias_ptr + src, mask=mask_t), mask=mask_t)


def write_kv_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_score: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    slot_bias: torch.Tensor | None = None,
) -> None:
    """Triton implementation of :func:`write_kv`."""
    block_size, head_dim = _check_write(k_cache, v_cache, slot_pos, slot_score, slots, k, v, pos, slot_bias)
    n = slots.shape[0]
    if n == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _write_kv_kernel[(triton.cdiv(n, _BLOCK_T),)](
        k_cache,
        v_cache,
        slot_pos,
        slot_score,
        slot_score if slot_bias is None else slot_bias,  # dummy pointer without a bias
        slots.contiguous(),
        k,
        v,
        pos.contiguous(),
        n,
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        k.stride(0),
        v.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim),
        BLOCK_T=_BLOCK_T,
        BLOCK_SIZE=block_size,
        HAS_BIAS=slot_bias is not None,
    )


def compact_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_score: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    slot_bias: torch.Tensor | None = None,
) -> None:
    """Triton implementation of :func:`compact`."""
    block_size, head_dim = _check_compact(k_cache, v_cache, slot_pos, slot_score, src_slots, dst_slots, slot_bias)
    n = src_slots.shape[0]
    if n == 0:
        return
    _compact_kernel[(triton.cdiv(n, _BLOCK_T),)](
        k_cache,
        v_cache,
        slot_pos,
        slot_score,
        slot_score if slot_bias is None else slot_bias,  # dummy pointer without a bias
        src_slots.contiguous(),
        dst_slots.contiguous(),
        n,
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim),
        BLOCK_T=_BLOCK_T,
        BLOCK_SIZE=block_size,
        HAS_BIAS=slot_bias is not None,
    )


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_score: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    slot_bias: torch.Tensor | None = None,
) -> None:
    """Scatter ``N`` new tokens (of any layers/heads: the slot ids say where) into the pool, in place.

    Args:
        k_cache, v_cache: ``[num_blocks, block_size, D]`` pool.
        slot_pos: ``[num_blocks, block_size]`` int32; slot_score: ``[num_blocks, block_size]`` float32.
        slots: ``[N]`` int64 flat slot ids (``block * block_size + offset``), distinct.
        k, v: ``[N, D]`` rows to store (cast to the pool dtype).
        pos: ``[N]`` int32 token positions; the slots' scores are reset to 0 (new tokens start unscored).
        slot_bias: optional float32 ``[num_blocks, block_size]`` logit biases of summary slots; reset to 0 at
            the written slots (a new token stands for itself). None touches nothing.
    """
    impl = write_kv_triton if use_triton(k_cache.device) else write_kv_torch
    impl(k_cache, v_cache, slot_pos, slot_score, slots, k, v, pos, slot_bias)


def compact(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_score: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    slot_bias: torch.Tensor | None = None,
) -> None:
    """Copy K, V, position and score of flat slots ``src_slots[i]`` to ``dst_slots[i]``, in place.

    Args:
        k_cache, v_cache, slot_pos, slot_score: the pool (see :func:`write_kv`).
        src_slots, dst_slots: ``[M]`` int64 flat slot ids; the two sets must be disjoint.
        slot_bias: optional float32 ``[num_blocks, block_size]``, moved with the rest; None touches nothing.
    """
    impl = compact_triton if use_triton(k_cache.device) else compact_torch
    impl(k_cache, v_cache, slot_pos, slot_score, src_slots, dst_slots, slot_bias)
