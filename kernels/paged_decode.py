"""Paged decode attention over the per-head KV cache, with fused attention-score accumulation.

``paged_decode`` attends one new query token per sequence to every slot a kv head holds. The Triton
path is split-K flash-decoding:

1. ``_decode_split_kernel`` -- grid ``(num_seqs, num_kv_heads, num_splits)``. A program loads the whole
   GQA group of query heads as one ``[GROUP_PAD >= 16, D]`` tile (so ``tl.dot`` applies to a single
   decode token), walks its own contiguous range of logical slots tile by tile through the block table
   with an online softmax, and either writes the final output (one split) or a partial
   ``(acc, max, sum)`` triple. Each head cuts *its own* length into ``num_splits`` ranges of whole key
   tiles (:func:`_split_range`), so heads of different lengths (a per-head compressed cache) are all
   spread over every split, and the grid depends only on ``num_splits``, not on the lengths: a CUDA
   graph captured once replays over any lengths up to the pool's capacity.
2. ``_decode_merge_kernel`` -- grid ``(num_seqs, num_q_heads)``: merges the splits by log-sum-exp.
3. Score accumulation (``score_out``): the split kernel also stores its log2-domain logits to a small
   fp32 scratch ``[B, H_q, max_len]``. Once the final lse of every query head is known, each program of
   grid ``(seq, kv_head, split)`` re-reads the logits of *its own* slot range, turns them into final
   probabilities ``exp2(logit - lse)``, sums ``p**power`` over the group and adds it to
   ``score_out[slot]``. Slot ranges are disjoint across programs, so no atomics are needed. With one split
   this happens at the end of the split kernel itself (same launch); with several it is the small
   ``_decode_scores_kernel`` launched after the merge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    LOG2E_JIT,
    MIN_DOT,
    add_bias,
    check_cache,
    check_slot_bias,
    check_slot_term,
    check_tables,
    finish_rows,
    gather_blocks,
    gather_logical,
    group_size,
    load_tile,
    max_length,
    mm,
    next_pow2,
    online_softmax_step,
    pick_num_splits,
    prob_power,
    row_lse,
    slot_coords,
    strided_slots,
    term_rows,
    upcast_tiles,
)
from .backend import use_triton

__all__ = ["paged_decode", "paged_decode_torch", "paged_decode_triton"]


def _check_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    score_out: torch.Tensor | None,
    score_power: int,
    slot_bias: torch.Tensor | None = None,
    slot_term: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Validate shapes; return (block_size, group_size)."""
    block_size, head_dim = check_cache(k_cache, v_cache)
    check_slot_bias(slot_bias, k_cache)
    if q.dim() != 3 or q.shape[-1] != head_dim:
        raise ValueError(f"q must be [B, H_q, {head_dim}], got {tuple(q.shape)}")
    check_slot_term(slot_term, slot_bias, q)
    check_tables(block_tables, lengths)
    if block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"q has {q.shape[0]} sequences but block_tables has {block_tables.shape[0]}")
    group = group_size(q.shape[1], block_tables.shape[1])
    if score_out is not None:
        if score_out.dtype != torch.float32 or score_out.numel() != k_cache.shape[0] * block_size:
            raise ValueError("score_out must be float32 with one entry per slot ([num_blocks, block_size])")
        if not score_out.is_contiguous():
            raise ValueError("score_out must be contiguous (it is indexed by flat slot id)")
    if score_power not in (1, 2):
        raise ValueError(f"score_power must be 1 or 2, got {score_power}")
    return block_size, group


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------------


def decode_probs_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    max_len: int | None = None,
    layout: tuple[int, int, int] | None = None,
    slot_bias: torch.Tensor | None = None,
    slot_term: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities of one decode query per sequence over each head's logical slots, in fp32.

    ``q``: ``[B, H_q, D]``. Returns ``probs`` ``[B, H_kv, G, M]`` (G query heads per kv head, M = longest head;
    zero past a head's length, all zero for a length-0 head) and ``valid`` ``[B, H_kv, M]`` (slot < length).
    Shared by the reference decode and by scorers that need raw probabilities (TOVA). ``max_len`` saves a host
    sync when the caller already knows ``lengths.max()``; ``layout`` (see :func:`paged_decode`) reads the keys as a
    view of the pool instead of gathering them; ``slot_bias`` and ``slot_term`` are :func:`paged_decode`'s.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = block_tables.shape[1]
    max_len = max_length(lengths) if max_len is None else max_len
    valid = torch.arange(max_len, device=lengths.device) < lengths.unsqueeze(-1).long()
    keys = _slots(k_cache, block_tables, valid, max_len, False, layout).float()
    qg = q.float().view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    logits = torch.matmul(qg, keys.transpose(-1, -2)) * scale  # [B, H_kv, G, M]
    if slot_bias is not None:
        logits = logits + _bias_rows(slot_bias, slot_term, block_tables, valid, max_len, layout)
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a length-0 head has an all -inf row
    return probs, valid


def paged_decode_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    *,
    score_out: torch.Tensor | None = None,
    score_power: int = 2,
    num_splits: int | None = None,
    max_len: int | None = None,
    min_len: int | None = None,
    layout: tuple[int, int, int] | None = None,
    slot_bias: torch.Tensor | None = None,
    slot_term: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch reference of :func:`paged_decode` (gathers each head's slots, softmax in fp32).

    Without score accumulation the output comes from torch's fused attention (no probability tensor). With
    ``min_len == max_len`` no head is padded, so nothing is masked or zeroed. ``num_splits`` is accepted for
    signature parity and ignored (the reference does not split).
    """
    del num_splits
    block_size, _ = _check_args(
        q, k_cache, v_cache, block_tables, lengths, score_out, score_power, slot_bias, slot_term
    )
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = block_tables.shape[1]
    max_len = max_length(lengths) if max_len is None else max_len
    if max_len == 0:
        return torch.zeros_like(q)
    padded = min_len is None or min_len != max_len
    layout = None if padded else layout
    if score_out is None:
        valid = None if layout is not None else torch.arange(max_len, device=lengths.device) < lengths[..., None].long()
        keys = _slots(k_cache, block_tables, valid, max_len, padded, layout).float()
        values = _slots(v_cache, block_tables, valid, max_len, padded, layout).float()
        qg = q.float().view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
        mask = valid[:, :, None, :] if padded else None
        if slot_bias is not None:  # a float mask is added to the logits: the bias, -inf past a head's length
            bias = _bias_rows(slot_bias, slot_term, block_tables, valid, max_len, layout)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale)
        if padded:  # a length-0 head masks every key: its softmax is NaN, its output 0 by contract
            out = out.masked_fill((lengths == 0)[:, :, None, None], 0.0)
        return out.reshape(batch, num_q_heads, head_dim).to(q.dtype)
    probs, valid = decode_probs_torch(q, k_cache, block_tables, lengths, scale, max_len, layout, slot_bias, slot_term)
    values = _slots(v_cache, block_tables, valid, max_len, padded, layout).float()
    out = torch.matmul(probs, values)  # [B, H_kv, G, D]
    contrib = probs.pow(score_power).sum(dim=2)  # [B, Hkv, M]: summed over the group's query heads
    blocks, offsets, _ = gather_logical(block_tables, lengths, block_size, max_len)
    slots = blocks * block_size + offsets  # padded slots point at block 0 and add an exact 0 (p is 0 there)
    score_out.view(-1).index_add_(0, slots.reshape(-1), contrib.reshape(-1))
    return out.reshape(batch, num_q_heads, head_dim).to(q.dtype)


def _bias_rows(
    slot_bias: torch.Tensor,
    slot_term: torch.Tensor | None,
    block_tables: torch.Tensor,
    valid: torch.Tensor | None,
    max_len: int,
    layout: tuple[int, int, int] | None,
) -> torch.Tensor:
    """Each head's slot biases ``[B, H_kv, 1, max_len]``, broadcast over the group's query heads, or with a
    ``slot_term`` ``[B, H_q]`` each query head's ``[B, H_kv, G, max_len]`` (entries past a head's length are
    whatever the pool holds: the caller masks them)."""
    bias = _slots(slot_bias[..., None], block_tables, valid, max_len, False, layout)[..., 0][:, :, None]
    term = None if slot_term is None else slot_term.view(bias.shape[0], bias.shape[1], -1, 1)
    return term_rows(bias, term)


def _slots(
    pool: torch.Tensor,
    block_tables: torch.Tensor,
    valid: torch.Tensor | None,
    max_len: int,
    zero_invalid: bool,
    layout: tuple[int, int, int] | None,
) -> torch.Tensor:
    """Each head's logical slots ``[B, H_kv, max_len, D]``: a view of the pool when ``layout`` says they are
    contiguous runs (never padded then; ``valid`` may be None), else a gathered copy."""
    if layout is not None:
        return strided_slots(pool, layout, block_tables.shape[0], block_tables.shape[1], max_len)
    return gather_blocks(pool, block_tables, valid, pool.shape[1], max_len, zero_invalid=zero_invalid)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _split_range(length, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Logical slots ``[start, end)`` of split ``split`` of a head holding ``length`` slots: the length cut into
    ``NUM_SPLITS`` ranges of whole ``BLOCK_N`` tiles (trailing splits of a short head are empty)."""
    chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    return start, tl.minimum(start + chunk, length)


@triton.jit
def _accumulate_scores(
    logit_ptr,
    lse,
    row_mask,
    start,
    end,
    bt_row_ptr,
    score_ptr,
    stride_lh,
    BLOCK_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    POWER: tl.constexpr,
):
    """Add ``sum_g exp2(logit[g, j] - lse[g])**POWER`` to ``score[slot(j)]`` for slots ``start <= j < end``.

    ``logit_ptr`` points at scratch ``[b, h*G, 0]`` (rows ``stride_lh`` apart); ``lse`` is ``[GROUP_PAD]``.
    The caller owns the slot range exclusively, so a plain read-modify-write is race free.
    """
    rows = tl.arange(0, GROUP_PAD)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        valid = row_mask[:, None] & mask_n[None, :]
        logit = tl.load(logit_ptr + rows[:, None] * stride_lh + offs_n[None, :], mask=valid, other=float("-inf"))
        contrib = tl.sum(prob_power(logit, lse[:, None], valid, POWER), 0)
        blk, off = slot_coords(bt_row_ptr, offs_n, mask_n, BLOCK_SIZE)
        sptr = score_ptr + blk * BLOCK_SIZE + off
        tl.store(sptr, tl.load(sptr, mask=mask_n, other=0.0) + contrib, mask=mask_n)


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    len_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    logit_ptr,
    score_ptr,
    bias_ptr,
    term_ptr,
    qk_scale,
    scratch_len,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_vb,
    stride_vs,
    stride_btb,
    stride_bth,
    stride_lb,
    G: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    ACCUM: tl.constexpr,
    POWER: tl.constexpr,
    UPCAST: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_TERM: tl.constexpr,
):
    """One (seq, kv_head, split): online softmax over the split's slots (:func:`_split_range`).

    Outputs: NUM_SPLITS == 1 -> ``out`` [B, H_q, D] directly; else partials ``part_acc`` [B, H_q, S, D]
    (unnormalised) and ``part_ml`` [B, H_q, S, 2] (running max, running sum; log2 domain).
    With ACCUM, logits go to scratch [B, H_q, scratch_len] (and, for one split, scores are added here).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    length = tl.load(len_ptr + b * stride_lb + h)
    start, end = _split_range(length, split, NUM_SPLITS, BLOCK_N)

    rows = tl.arange(0, GROUP_PAD)
    row_mask = rows < G
    hq = h * G + rows
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qb + hq[:, None] * stride_qh + offs_d[None, :],
        mask=row_mask[:, None] & mask_d[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    term = tl.zeros([GROUP_PAD], tl.float32)
    if HAS_TERM:  # [B, H_q] contiguous, natural log to the kernel's log2
        term = tl.load(term_ptr + b * num_kv_heads * G + hq, mask=row_mask, other=0.0) * LOG2E_JIT
    bt_row_ptr = bt_ptr + b * stride_btb + h * stride_bth
    # scratch row of query head hq: ((b * H_q) + hq) * scratch_len, in int64 (B*H_q*len may exceed 2**31)
    logit_base = logit_ptr + (b.to(tl.int64) * num_kv_heads * G + h * G) * scratch_len

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        blk, off = slot_coords(bt_row_ptr, offs_n, mask_n, BLOCK_SIZE)
        k = load_tile(k_ptr, blk, off, offs_d, mask_n, mask_d, stride_kb, stride_ks, UPCAST)
        v = load_tile(v_ptr, blk, off, offs_d, mask_n, mask_d, stride_vb, stride_vs, UPCAST)
        qk = mm(q, tl.trans(k), UPCAST) * qk_scale
        if HAS_BIAS:
            qk = add_bias(qk, bias_ptr, blk, off, mask_n, term, BLOCK_SIZE, HAS_TERM)
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        if ACCUM:
            tl.store(
                logit_base + rows[:, None] * scratch_len + offs_n[None, :], qk, mask=row_mask[:, None] & mask_n[None, :]
            )
        m_i, l_i, acc = online_softmax_step(qk, m_i, l_i, acc, v, UPCAST)

    if NUM_SPLITS == 1:
        out, lse = finish_rows(m_i, l_i, acc)
        tl.store(
            out_ptr + b * stride_ob + hq[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_mask[:, None] & mask_d[None, :],
        )
        if ACCUM:
            tl.debug_barrier()  # logits stored above by other threads of this program must be visible
            _accumulate_scores(
                logit_base,
                lse,
                row_mask,
                0,
                length,
                bt_row_ptr,
                score_ptr,
                scratch_len,
                BLOCK_SIZE,
                GROUP_PAD,
                BLOCK_N,
                POWER,
            )
    else:
        part = (b * num_kv_heads * G + hq) * NUM_SPLITS + split  # [B, H_q, S] flattened
        tl.store(
            part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_mask[:, None] & mask_d[None, :]
        )
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_mask)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_mask)


@triton.jit
def _decode_merge_kernel(
    part_acc_ptr,
    part_ml_ptr,
    out_ptr,
    lse_ptr,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    ACCUM: tl.constexpr,
):
    """Merge split partials of one (seq, q_head) by log-sum-exp; write out (and the final lse if ACCUM)."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    num_q_heads = tl.num_programs(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    mask_s = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    part = (b * num_q_heads + hq) * NUM_SPLITS + offs_s
    m = tl.load(part_ml_ptr + part * 2, mask=mask_s, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + part * 2 + 1, mask=mask_s, other=0.0)
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0
    )
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_safe))
    l_tot = tl.sum(l_s * w, 0)
    acc_tot = tl.sum(acc * w[:, None], 0)
    has = l_tot > 0.0
    out = acc_tot / tl.where(has, l_tot, 1.0)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)
    if ACCUM:
        lse = row_lse(m_safe, l_tot)
        tl.store(lse_ptr + b * num_q_heads + hq, lse)


@triton.jit
def _decode_scores_kernel(
    logit_ptr,
    lse_ptr,
    bt_ptr,
    len_ptr,
    score_ptr,
    scratch_len,
    stride_btb,
    stride_bth,
    stride_lb,
    G: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    POWER: tl.constexpr,
):
    """Score finalize for split-K: program (seq, kv_head, split) owns the same slot range as in pass 1."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    length = tl.load(len_ptr + b * stride_lb + h)
    start, end = _split_range(length, split, NUM_SPLITS, BLOCK_N)
    rows = tl.arange(0, GROUP_PAD)
    row_mask = rows < G
    lse = tl.load(lse_ptr + b * num_kv_heads * G + h * G + rows, mask=row_mask, other=float("-inf"))
    logit_base = logit_ptr + (b.to(tl.int64) * num_kv_heads * G + h * G) * scratch_len
    _accumulate_scores(
        logit_base,
        lse,
        row_mask,
        start,
        end,
        bt_ptr + b * stride_btb + h * stride_bth,
        score_ptr,
        scratch_len,
        BLOCK_SIZE,
        GROUP_PAD,
        BLOCK_N,
        POWER,
    )


def _decode_block_n(head_dim: int) -> int:
    return 64 if head_dim <= 128 else 32


def paged_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    *,
    score_out: torch.Tensor | None = None,
    score_power: int = 2,
    num_splits: int | None = None,
    max_len: int | None = None,
    min_len: int | None = None,
    layout: tuple[int, int, int] | None = None,
    slot_bias: torch.Tensor | None = None,
    slot_term: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton implementation of :func:`paged_decode` (split-K flash-decoding + fused score accumulation).

    ``min_len`` and ``layout`` are accepted for signature parity and ignored (loads past a head's length are
    masked anyway, and the kernel reads blocks in place whatever their order)."""
    del min_len, layout
    block_size, group = _check_args(
        q, k_cache, v_cache, block_tables, lengths, score_out, score_power, slot_bias, slot_term
    )
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = block_tables.shape[1]
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if batch == 0 or num_q_heads == 0:
        return out
    block_tables = block_tables.contiguous()
    lengths = lengths.contiguous()
    q_in = q if q.stride(-1) == 1 else q.contiguous()

    max_len = max_length(lengths) if max_len is None else max_len
    block_n = _decode_block_n(head_dim)
    if num_splits is None:
        num_splits = pick_num_splits(batch, num_kv_heads, max_len, q.device, block_n)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    # Each split covers a whole number of key tiles of its head: more splits than the longest head has tiles
    # would only be empty.
    num_splits = max(1, min(num_splits, triton.cdiv(max_len, block_n)))

    accum = score_out is not None
    scratch_len = max(max_len, 1)
    logits = torch.empty((batch, num_q_heads, scratch_len) if accum else (1,), device=q.device, dtype=torch.float32)
    if num_splits > 1:
        part_acc = torch.empty((batch, num_q_heads, num_splits, head_dim), device=q.device, dtype=torch.float32)
        part_ml = torch.empty((batch, num_q_heads, num_splits, 2), device=q.device, dtype=torch.float32)
    else:
        part_acc = part_ml = logits  # unused
    score = score_out if accum else logits  # dummy pointer when not accumulating

    group_pad = max(MIN_DOT, next_pow2(group))
    block_d = max(MIN_DOT, next_pow2(head_dim))
    upcast = upcast_tiles(k_cache.dtype)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q_in,
        k_cache,
        v_cache,
        block_tables,
        lengths,
        out,
        part_acc,
        part_ml,
        logits,
        score,
        logits if slot_bias is None else slot_bias,  # dummy pointer without a bias
        logits if slot_term is None else slot_term,
        scale * LOG2E,
        scratch_len,
        q_in.stride(0),
        q_in.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        block_tables.stride(0),
        block_tables.stride(1),
        lengths.stride(0),
        G=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        BLOCK_SIZE=block_size,
        NUM_SPLITS=num_splits,
        ACCUM=accum,
        POWER=score_power,
        UPCAST=upcast,
        HAS_BIAS=slot_bias is not None,
        HAS_TERM=slot_term is not None,
        num_warps=4,
    )
    if num_splits > 1:
        lse = torch.empty((batch, num_q_heads), device=q.device, dtype=torch.float32) if accum else logits
        _decode_merge_kernel[(batch, num_q_heads)](
            part_acc,
            part_ml,
            out,
            lse,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            NUM_SPLITS=num_splits,
            SPLITS_PAD=max(2, next_pow2(num_splits)),
            ACCUM=accum,
            num_warps=4,
        )
        if accum:
            _decode_scores_kernel[(batch, num_kv_heads, num_splits)](
                logits,
                lse,
                block_tables,
                lengths,
                score,
                scratch_len,
                block_tables.stride(0),
                block_tables.stride(1),
                lengths.stride(0),
                G=group,
                GROUP_PAD=group_pad,
                BLOCK_N=block_n,
                BLOCK_SIZE=block_size,
                NUM_SPLITS=num_splits,
                POWER=score_power,
                num_warps=4,
            )
    return out


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    *,
    score_out: torch.Tensor | None = None,
    score_power: int = 2,
    num_splits: int | None = None,
    max_len: int | None = None,
    min_len: int | None = None,
    layout: tuple[int, int, int] | None = None,
    slot_bias: torch.Tensor | None = None,
    slot_term: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one new token per sequence over the paged, per-head KV cache.

    Args:
        q: ``[B, H_q, D]`` query of the new token (RoPE applied). Every slot ``< lengths[b, h]`` is visible
            (all cached tokens precede the query), so no position mask is needed.
        k_cache, v_cache: ``[num_blocks, block_size, D]`` shared pool (fp32/fp16/bf16).
        block_tables: ``[B, H_kv, max_blocks]`` int32; entries past a head's length are never read.
        lengths: ``[B, H_kv]`` int32 tokens held per head (heads differ; 0 gives a zero output).
        scale: softmax scale (usually ``D**-0.5``).
        score_out: optional float32 ``[num_blocks, block_size]`` (e.g. ``slot_score``); receives, per valid
            slot, ``sum over the group's query heads of p**score_power`` (p = final softmax probability).
        score_power: 1 or 2 (L1/L2 accumulation).
        num_splits: split-K factor; None picks it from the max length and the SM count.
        max_len: ``lengths.max()`` when the caller knows it (the engine keeps lengths on the host); None reads it
            from ``lengths``, which costs a host sync.
        min_len: ``lengths.min()`` when known: equal to ``max_len``, the torch reference skips all padding work.
        layout: ``(first, seq_stride, head_stride)`` when the caller knows that head (b, h) holds its slots in one
            contiguous run from flat slot ``first + b * seq_stride + h * head_stride`` (the cache's
            ``StepPlan.layout``): the torch reference then reads them as a view of the pool, with no gather.
        slot_bias: optional float32 ``[num_blocks, block_size]``, added to every slot's logit (natural log):
            ``log(n)`` makes one slot weigh as ``n`` copies of itself, which is how a summary slot stands in for
            the ``n`` tokens it replaces (the cache's ``slot_bias``); None adds nothing and loads nothing.
        slot_term: optional contiguous float32 ``[B, H_q]`` (natural log), added by each query head to the logit of
            every slot whose ``slot_bias`` is positive: a summary slot's weight that depends on the query, such as
            the sketch of what its members' keys spread over (:mod:`kvcompress.cache.sketch`). Needs ``slot_bias``.

    Returns:
        ``[B, H_q, D]`` in ``q.dtype``.
    """
    impl = paged_decode_triton if use_triton(q.device) else paged_decode_torch
    return impl(
        q,
        k_cache,
        v_cache,
        block_tables,
        lengths,
        scale,
        score_out=score_out,
        score_power=score_power,
        num_splits=num_splits,
        max_len=max_len,
        min_len=min_len,
        layout=layout,
        slot_bias=slot_bias,
        slot_term=slot_term,
    )


def decode_kv_bytes(lengths: torch.Tensor, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V a decode step must read (the memory-bound lower bound used by the benchmark)."""
    return int(lengths.sum().item()) * 2 * head_dim * torch.empty((), dtype=dtype).element_size()
