"""Varlen paged prefill attention over the per-head KV cache, with an observation-window score.

``paged_prefill`` runs the packed new tokens of several sequences against everything their kv heads hold
(cached prefix + the new tokens, already written to the cache). Slot order is not position order after
compaction, so causality is decided per slot by ``slot_pos <= q_pos``.

Triton path:

1. ``_prefill_kernel`` -- grid ``(query tiles, num_kv_heads)``. A tile packs ``BLOCK_Q`` query tokens x the
   ``G`` query heads of one GQA group into ``BLOCK_M = BLOCK_Q * G (padded)`` rows, so every K/V tile is
   loaded once per group. It walks all ``lengths[b, h]`` slots in key tiles with an online softmax (no
   T x T matrix), skipping a key tile outright when every slot in it is in the future of every query of
   the tile. The tile -> sequence map is a binary search over ``cu_seqlens_q`` (no host sync).
   With ``obs_window > 0`` it also stores each row's final log-sum-exp.
2. ``_obs_kernel`` -- grid ``(num_seqs, num_kv_heads, key tiles)``. A program owns one key tile of one
   head (so no atomics), loads it once, and loops over the group's query heads and the window queries,
   recomputing ``p = exp2(q.k * scale - lse)`` from the stored lse and reducing ``p**obs_power`` over the window
   queries: summed (``obs_reduce="sum"``) or their maximum (``"max"``, KVzip's score).

``obs_exclude = (lo, hi)`` leaves the keys at positions ``[lo, hi)`` out of the observation only: each observed
query's probabilities are renormalised over the other keys it sees, and those slots score 0. That is how kvpress's
KVzip scores the context, with the chat template's prefix after its attention sinks out of each reconstruction
query's softmax. The attention output still sees every key. The Triton path keeps a second running log-sum-exp
over the kept keys in ``_prefill_kernel`` and stores it instead of the full one.

The kernels and the reference calls keep their hand layout (one line per argument group): ``# fmt: off`` below.
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
    bias_tile,
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
    online_lse_step,
    online_softmax_step,
    prob_power,
    row_lse,
    slot_coords,
    term_rows,
    upcast_tiles,
)
from .backend import use_triton

__all__ = ["paged_prefill", "paged_prefill_torch", "paged_prefill_triton"]

OBS_REDUCTIONS = ("sum", "max")  # how the window queries' p**power are combined per slot
_REF_QUERY_CHUNK = 512  # the torch reference bounds its logits to [H_q, 512, len] per step


def _check_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    q_pos: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    obs_window: int,
    obs_power: int,
    obs_reduce: str,
    obs_exclude: tuple[int, int],
    slot_bias: torch.Tensor | None = None,
    slot_term: torch.Tensor | None = None,
) -> tuple[int, int]:
    """Validate shapes; return (block_size, group_size)."""
    block_size, head_dim = check_cache(k_cache, v_cache)
    check_slot_bias(slot_bias, k_cache)
    if q.dim() != 3 or q.shape[-1] != head_dim:
        raise ValueError(f"q must be [T_total, H_q, {head_dim}], got {tuple(q.shape)}")
    check_slot_term(slot_term, slot_bias, q)
    if slot_pos.shape != k_cache.shape[:2] or slot_pos.dtype != torch.int32 or not slot_pos.is_contiguous():
        raise ValueError(f"slot_pos must be contiguous int32 {tuple(k_cache.shape[:2])}")
    check_tables(block_tables, lengths)
    if cu_seqlens_q.shape != (block_tables.shape[0] + 1,) or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(f"cu_seqlens_q must be int32 [{block_tables.shape[0] + 1}]")
    if q_pos.shape != (q.shape[0],) or q_pos.dtype != torch.int32:
        raise ValueError(f"q_pos must be int32 [{q.shape[0]}]")
    if obs_window < 0 or obs_power not in (1, 2):
        raise ValueError(f"need obs_window >= 0 and obs_power in (1, 2), got {obs_window}, {obs_power}")
    if obs_reduce not in OBS_REDUCTIONS:
        raise ValueError(f"obs_reduce must be one of {OBS_REDUCTIONS}, got {obs_reduce!r}")
    if len(obs_exclude) != 2 or not 0 <= obs_exclude[0] <= obs_exclude[1]:
        raise ValueError(f"obs_exclude must be a position range (lo, hi) with 0 <= lo <= hi, got {obs_exclude!r}")
    return block_size, group_size(q.shape[1], block_tables.shape[1])


# fmt: off
# ----------------------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------------------


def paged_prefill_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    q_pos: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    *,
    obs_window: int = 0,
    obs_power: int = 1,
    obs_reduce: str = "sum",
    obs_exclude: tuple[int, int] = (0, 0),
    max_len: int | None = None,
    slot_bias: torch.Tensor | None = None,
    slot_term: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch reference of :func:`paged_prefill`: per sequence, gather the heads' slots (a block at a time) and
    run torch's fused attention with the causal-by-position mask over chunks of at most 512 queries (memory
    ``O(H_q * 512 * len)``); only the observation-window queries get explicit fp32 probabilities, and those
    probabilities give the window's output too (an observed reconstruction, KVzip's, is one matmul more than a
    prefill instead of a second attention)."""
    block_size, group = _check_args(q, k_cache, v_cache, slot_pos, block_tables, lengths, q_pos, cu_seqlens_q,
                                    obs_window, obs_power, obs_reduce, obs_exclude, slot_bias, slot_term)
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_seqs, num_kv_heads = lengths.shape
    out = torch.zeros_like(q)
    max_len = max_length(lengths) if max_len is None else max_len
    obs = q.new_zeros((num_seqs, num_q_heads, max_len), dtype=torch.float32) if obs_window > 0 else None
    cu = cu_seqlens_q.tolist()
    for b in range(num_seqs):
        t0, t1 = cu[b], cu[b + 1]
        seq_len = max_length(lengths[b])
        if t1 == t0 or seq_len == 0:
            continue
        blocks, offsets, valid = gather_logical(block_tables[b], lengths[b], block_size, seq_len)  # [Hkv, M]
        # invalid slots are zeroed by gather_blocks, so NaN garbage in the pool cannot leak through the mask
        keys = gather_blocks(k_cache, block_tables[b : b + 1], valid[None], block_size, seq_len)[0].float()
        values = gather_blocks(v_cache, block_tables[b : b + 1], valid[None], block_size, seq_len)[0].float()
        kpos = slot_pos[blocks, offsets]  # [Hkv, M]
        kbias = slot_bias[blocks, offsets] if slot_bias is not None else None  # [Hkv, M]
        excluded = (kpos >= obs_exclude[0]) & (kpos < obs_exclude[1])  # [Hkv, M], out of the observation only
        k_g = keys[:, None].expand(-1, group, -1, -1)  # [Hkv, G, M, D]: a view, one copy per kv head
        v_g = values[:, None].expand(-1, group, -1, -1)
        window_start = max(t0, t1 - obs_window)
        # a fresh sequence (this forward holds all its tokens, slots in position order) is plain causal attention:
        # torch's fused kernel runs it without building a mask; only the window rows are then recomputed below
        fresh = bool((lengths[b] == t1 - t0).all()) and torch.equal(kpos, q_pos[t0:t1].to(kpos)[None].expand_as(kpos))
        if fresh:
            qa = q[t0:t1].float().view(t1 - t0, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
            oa = F.scaled_dot_product_attention(qa, k_g, v_g, is_causal=True, scale=scale)
            out[t0:t1] = oa.permute(2, 0, 1, 3).reshape(t1 - t0, num_q_heads, head_dim).to(q.dtype)
        for c0 in range(window_start if fresh else t0, t1, _REF_QUERY_CHUNK):
            c1 = min(c0 + _REF_QUERY_CHUNK, t1)
            qc = q[c0:c1].float().view(c1 - c0, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [Hkv,G,t,D]
            # the slots' biases [Hkv, 1, 1, M], or with a slot_term each query's [Hkv, G, t, M] (its term added on the
            # slots with a positive bias); rows of the chunk are taken only from the second
            cbias = None
            if kbias is not None:
                cbias = term_rows(kbias[:, None, None, :], _term_chunk(slot_term, c0, c1, qc))
            per_row = slot_term is not None
            visible = valid[:, None, :] & (kpos[:, None, :] <= q_pos[c0:c1, None].to(kpos.device))  # [Hkv, t, M]
            # rows c0 + w0 .. c1 are observed: their probabilities are computed anyway and give their output too
            w0 = min(max(window_start - c0, 0), c1 - c0) if obs is not None else c1 - c0
            if not fresh and w0 > 0:
                mask = visible[:, None, :w0]
                if cbias is not None:  # a float mask is added to the logits
                    mask = (cbias[:, :, :w0] if per_row else cbias).masked_fill(~mask, float("-inf"))
                oc = F.scaled_dot_product_attention(qc[:, :, :w0], k_g, v_g, attn_mask=mask, scale=scale)
                out[c0 : c0 + w0] = oc.permute(2, 0, 1, 3).reshape(w0, num_q_heads, head_dim).to(q.dtype)
            if w0 == c1 - c0:
                continue
            logits = torch.matmul(qc[:, :, w0:] * scale, keys.transpose(-1, -2)[:, None])  # [Hkv, G, w, M]
            if cbias is not None:
                logits += cbias[:, :, w0:] if per_row else cbias
            probs = torch.softmax(logits.masked_fill_(~visible[:, None, w0:], float("-inf")), dim=-1).nan_to_num_(0.0)
            if not fresh:
                oc = torch.matmul(probs, values[:, None])  # [Hkv, G, w, D]
                out[c0 + w0 : c1] = oc.permute(2, 0, 1, 3).reshape(c1 - c0 - w0, num_q_heads, head_dim).to(q.dtype)
            if obs_exclude[1] > obs_exclude[0]:  # renormalise each observed query over the keys it keeps
                probs = torch.softmax(logits.masked_fill_(excluded[:, None, None], float("-inf")), -1).nan_to_num_(0)
            if obs_power != 1:
                probs = probs.pow_(obs_power)
            win = (probs.amax(dim=2) if obs_reduce == "max" else probs.sum(dim=2)).reshape(num_q_heads, seq_len)
            row = obs[b, :, :seq_len]
            row.copy_(torch.maximum(row, win) if obs_reduce == "max" else row + win)
    return out, obs


def _term_chunk(slot_term: torch.Tensor | None, c0: int, c1: int, qc: torch.Tensor) -> torch.Tensor | None:
    """Rows ``c0:c1`` of ``slot_term`` ``[T, H_q]`` as ``[H_kv, G, c1 - c0, 1]``, the layout of ``qc``'s logits."""
    if slot_term is None:
        return None
    return slot_term[c0:c1].view(c1 - c0, qc.shape[0], qc.shape[1]).permute(1, 2, 0)[..., None]


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _find_seq(cu_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Sequence owning query tile ``tile``: sequence b's tiles start at ``cu[b] // BLOCK_Q + b`` (an upper
    bound on the tiles of the sequences before it), so a binary search over that monotone key finds it."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        key = tl.load(cu_ptr + mid) // BLOCK_Q + mid
        if key <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, bt_ptr, len_ptr, qpos_ptr, cu_ptr, out_ptr, lse_ptr, bias_ptr, term_ptr,
    qk_scale, num_seqs, ex_lo, ex_hi,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_vb, stride_vs,
    stride_btb, stride_bth, stride_lb,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    STORE_LSE: tl.constexpr, EXCLUDE: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_TERM: tl.constexpr,
):
    """One (query tile, kv_head). Row r of the tile is query token ``r // G`` of the tile, head ``r % G``
    of the group. Writes ``out`` [T, H_q, D] and, if STORE_LSE, ``lse`` [T, H_q] (log2 domain): with EXCLUDE,
    the log-sum-exp over the keys outside positions ``[ex_lo, ex_hi)``, which is what the observation divides by."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    num_q_heads = tl.num_programs(1) * G
    b = _find_seq(cu_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    local = tile - (q_start // BLOCK_Q + b)  # index of this tile inside sequence b
    if local * BLOCK_Q < q_len:
        rows = tl.arange(0, BLOCK_M)
        tok = local * BLOCK_Q + rows // G
        row_mask = (rows < BLOCK_Q * G) & (tok < q_len)
        t = (q_start + tok).to(tl.int64)
        hq = h * G + rows % G
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        qmask = row_mask[:, None] & mask_d[None, :]
        q = tl.load(q_ptr + t[:, None] * stride_qt + hq[:, None] * stride_qh + offs_d[None, :], mask=qmask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        qpos = tl.load(qpos_ptr + t, mask=row_mask, other=-1)
        qpos_max = tl.max(qpos, 0)
        term = tl.zeros([BLOCK_M], tl.float32)
        if HAS_TERM:  # [T, H_q] contiguous, natural log to the kernel's log2
            term = tl.load(term_ptr + t * num_q_heads + hq, mask=row_mask, other=0.0) * LOG2E_JIT
        length = tl.load(len_ptr + b * stride_lb + h)
        bt_row_ptr = bt_ptr + b * stride_btb + h * stride_bth

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        m_o = tl.full([BLOCK_M], float("-inf"), tl.float32)  # EXCLUDE: the running lse over the kept keys
        l_o = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, length, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < length
            blk, off = slot_coords(bt_row_ptr, offs_n, mask_n, BLOCK_SIZE)
            kpos = tl.load(pos_ptr + blk * BLOCK_SIZE + off, mask=mask_n, other=2147483647)
            if tl.min(kpos, 0) <= qpos_max:  # otherwise every slot is in the future of every query
                k = load_tile(k_ptr, blk, off, offs_d, mask_n, mask_d, stride_kb, stride_ks, UPCAST)
                v = load_tile(v_ptr, blk, off, offs_d, mask_n, mask_d, stride_vb, stride_vs, UPCAST)
                qk = mm(q, tl.trans(k), UPCAST) * qk_scale
                if HAS_BIAS:
                    qk = add_bias(qk, bias_ptr, blk, off, mask_n, term, BLOCK_SIZE, HAS_TERM)
                visible = mask_n[None, :] & (kpos[None, :] <= qpos[:, None])
                qk = tl.where(visible, qk, float("-inf"))
                m_i, l_i, acc = online_softmax_step(qk, m_i, l_i, acc, v, UPCAST)
                if EXCLUDE:
                    kept = (kpos < ex_lo) | (kpos >= ex_hi)
                    m_o, l_o = online_lse_step(tl.where(kept[None, :], qk, float("-inf")), m_o, l_o)

        out, lse = finish_rows(m_i, l_i, acc)
        if EXCLUDE:
            lse = row_lse(m_o, l_o)
        tl.store(out_ptr + t[:, None] * stride_ot + hq[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=qmask)
        if STORE_LSE:
            tl.store(lse_ptr + t * num_q_heads + hq, lse, mask=row_mask)


@triton.jit
def _obs_kernel(
    q_ptr, k_ptr, pos_ptr, bt_ptr, len_ptr, qpos_ptr, cu_ptr, lse_ptr, obs_ptr, bias_ptr, term_ptr,
    qk_scale, obs_window, obs_len, ex_lo, ex_hi,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_btb, stride_bth, stride_lb,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_SIZE: tl.constexpr, POWER: tl.constexpr, REDUCE_MAX: tl.constexpr,
    UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_TERM: tl.constexpr,
):
    """Observation scores of one key tile of one (seq, kv_head): for each query head g of the group,
    ``obs[b, h*G+g, j] = sum (REDUCE_MAX: max) over the last obs_window queries of p**POWER`` (``obs`` is
    [B, H_q, obs_len]; p >= 0, so a max starting from 0 is exact). Slots at positions ``[ex_lo, ex_hi)`` score 0;
    ``lse`` was taken over the other keys, so ``p`` is renormalised over them."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    n0 = tl.program_id(2) * BLOCK_N
    num_q_heads = tl.num_programs(1) * G
    length = tl.load(len_ptr + b * stride_lb + h)
    if n0 < length:
        q_end = tl.load(cu_ptr + b + 1)
        w_start = tl.maximum(tl.load(cu_ptr + b), q_end - obs_window)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < length
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        blk, off = slot_coords(bt_ptr + b * stride_btb + h * stride_bth, offs_n, mask_n, BLOCK_SIZE)
        kpos = tl.load(pos_ptr + blk * BLOCK_SIZE + off, mask=mask_n, other=2147483647)
        kept = mask_n & ((kpos < ex_lo) | (kpos >= ex_hi))
        k = load_tile(k_ptr, blk, off, offs_d, mask_n, mask_d, stride_kb, stride_ks, UPCAST)
        kt = tl.trans(k)
        kbias = tl.zeros([BLOCK_N], tl.float32)
        if HAS_BIAS:
            kbias = bias_tile(bias_ptr, blk, off, mask_n, BLOCK_SIZE)
        for g in range(G):
            hq = h * G + g
            score = tl.zeros([BLOCK_N], tl.float32)
            for w0 in range(w_start, q_end, BLOCK_W):
                t = w0 + tl.arange(0, BLOCK_W)
                mask_t = t < q_end
                t64 = t.to(tl.int64)
                q = tl.load(q_ptr + t64[:, None] * stride_qt + hq * stride_qh + offs_d[None, :],
                            mask=mask_t[:, None] & mask_d[None, :], other=0.0)
                qpos = tl.load(qpos_ptr + t64, mask=mask_t, other=-1)
                lse = tl.load(lse_ptr + t64 * num_q_heads + hq, mask=mask_t, other=float("-inf"))
                qk = mm(q, kt, UPCAST) * qk_scale + kbias[None, :]
                if HAS_TERM:  # [T, H_q] contiguous, natural log to the kernel's log2
                    term = tl.load(term_ptr + t64 * num_q_heads + hq, mask=mask_t, other=0.0) * LOG2E_JIT
                    qk += tl.where(kbias[None, :] > 0, term[:, None], 0.0)
                visible = mask_t[:, None] & kept[None, :] & (kpos[None, :] <= qpos[:, None])
                pp = prob_power(qk, lse[:, None], visible, POWER)
                if REDUCE_MAX:
                    score = tl.maximum(score, tl.max(pp, 0))
                else:
                    score += tl.sum(pp, 0)
            obs_row = obs_ptr + (b.to(tl.int64) * num_q_heads + hq) * obs_len
            tl.store(obs_row + offs_n, score, mask=mask_n)


def _prefill_tiles(group: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M rows = BLOCK_Q tokens x G heads padded to a power of two, BLOCK_Q, BLOCK_N keys per tile)."""
    block_m = max(64, next_pow2(group))
    return block_m, block_m // group, 64 if head_dim <= 64 else 32


def paged_prefill_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    q_pos: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    *,
    obs_window: int = 0,
    obs_power: int = 1,
    obs_reduce: str = "sum",
    obs_exclude: tuple[int, int] = (0, 0),
    max_len: int | None = None,
    slot_bias: torch.Tensor | None = None,
    slot_term: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton implementation of :func:`paged_prefill`."""
    block_size, group = _check_args(q, k_cache, v_cache, slot_pos, block_tables, lengths, q_pos, cu_seqlens_q,
                                    obs_window, obs_power, obs_reduce, obs_exclude, slot_bias, slot_term)
    total, num_q_heads, head_dim = q.shape
    num_seqs, num_kv_heads = lengths.shape
    block_tables = block_tables.contiguous()
    lengths = lengths.contiguous()
    q_pos = q_pos.contiguous()
    cu_seqlens_q = cu_seqlens_q.contiguous()
    q_in = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.zeros((total, num_q_heads, head_dim), device=q.device, dtype=q.dtype)
    if obs_window <= 0:
        max_len = 0
    elif max_len is None:
        max_len = max_length(lengths)
    obs = torch.zeros((num_seqs, num_q_heads, max_len), device=q.device, dtype=torch.float32) if obs_window else None
    if total == 0 or num_seqs == 0:
        return out, obs

    block_m, block_q, block_n = _prefill_tiles(group, head_dim)
    block_d = max(MIN_DOT, next_pow2(head_dim))
    upcast = upcast_tiles(k_cache.dtype)
    lse = torch.empty((total, num_q_heads), device=q.device, dtype=torch.float32) if obs is not None else out
    num_tiles = total // block_q + num_seqs
    _prefill_kernel[(num_tiles, num_kv_heads)](
        q_in, k_cache, v_cache, slot_pos, block_tables, lengths, q_pos, cu_seqlens_q, out, lse,
        out if slot_bias is None else slot_bias, out if slot_term is None else slot_term,
        scale * LOG2E, num_seqs, obs_exclude[0], obs_exclude[1],
        q_in.stride(0), q_in.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0), block_tables.stride(1), lengths.stride(0),
        G=group, BLOCK_M=block_m, BLOCK_Q=block_q, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n,
        BLOCK_SIZE=block_size, STORE_LSE=obs is not None, EXCLUDE=obs is not None and obs_exclude[1] > obs_exclude[0],
        UPCAST=upcast, HAS_BIAS=slot_bias is not None, HAS_TERM=slot_term is not None, num_warps=4,
    )
    if obs is not None and max_len > 0:
        _obs_kernel[(num_seqs, num_kv_heads, triton.cdiv(max_len, block_n))](
            q_in, k_cache, slot_pos, block_tables, lengths, q_pos, cu_seqlens_q, lse, obs,
            obs if slot_bias is None else slot_bias, obs if slot_term is None else slot_term,
            scale * LOG2E, min(obs_window, total), max_len, obs_exclude[0], obs_exclude[1],
            q_in.stride(0), q_in.stride(1), k_cache.stride(0), k_cache.stride(1),
            block_tables.stride(0), block_tables.stride(1), lengths.stride(0),
            G=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_W=MIN_DOT,
            BLOCK_SIZE=block_size, POWER=obs_power, REDUCE_MAX=obs_reduce == "max", UPCAST=upcast,
            HAS_BIAS=slot_bias is not None, HAS_TERM=slot_term is not None, num_warps=4,
        )
    return out, obs


def paged_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    block_tables: torch.Tensor,
    lengths: torch.Tensor,
    q_pos: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    *,
    obs_window: int = 0,
    obs_power: int = 1,
    obs_reduce: str = "sum",
    obs_exclude: tuple[int, int] = (0, 0),
    max_len: int | None = None,
    slot_bias: torch.Tensor | None = None,
    slot_term: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal varlen prefill attention over the paged, per-head KV cache.

    Args:
        q: ``[T_total, H_q, D]`` new tokens of all sequences, packed (RoPE applied).
        k_cache, v_cache: ``[num_blocks, block_size, D]`` pool; the new tokens' K/V are already written.
        slot_pos: ``[num_blocks, block_size]`` int32 original position of every slot (causal mask source,
            because compaction breaks slot order == position order).
        block_tables: ``[B, H_kv, max_blocks]`` int32; lengths: ``[B, H_kv]`` int32 (include new tokens).
        q_pos: ``[T_total]`` int32 true positions of the queries.
        cu_seqlens_q: ``[B + 1]`` int32 offsets of each sequence's queries in ``q``.
        scale: softmax scale.
        obs_window: if > 0, also return the observation scores of the last ``obs_window`` queries of each
            sequence (``>= `` its query count means all of them, H2O-style).
        obs_power: 1 or 2, the power applied to each probability before reducing.
        obs_reduce: ``"sum"`` over the window queries (H2O, SnapKV, LFU) or ``"max"`` (KVzip).
        obs_exclude: ``(lo, hi)``: keys at positions ``[lo, hi)`` are left out of the observation (scored 0, and
            each observed query renormalised over its other keys); the output still attends to them.
        max_len: ``lengths.max()`` when the caller knows it; None reads it from ``lengths`` (a host sync).
        slot_bias: optional float32 ``[num_blocks, block_size]`` logit bias per slot (natural log), as in
            :func:`kvcompress_kernels.paged_decode`; the observation's probabilities include it. The new tokens'
            slots must hold 0 (the cache zeroes a slot's bias when it writes it): the torch reference runs a fresh
            sequence as plain causal attention.
        slot_term: optional contiguous float32 ``[T_total, H_q]`` (natural log) each query adds to the logit of
            every slot with a positive ``slot_bias``, as in :func:`kvcompress_kernels.paged_decode`; the
            observation's probabilities include it.

    Returns:
        ``(out, obs)``: ``out`` ``[T_total, H_q, D]`` in ``q.dtype``; ``obs`` ``[B, H_q, max_len]`` float32
        (``max_len = lengths.max()``, slot ``j`` of the query head's kv head, 0 past its length) or None.
        A query sees slot j of its kv head iff ``j < lengths[b, h]`` and ``slot_pos <= q_pos``.
    """
    impl = paged_prefill_triton if use_triton(q.device) else paged_prefill_torch
    return impl(q, k_cache, v_cache, slot_pos, block_tables, lengths, q_pos, cu_seqlens_q, scale,
                obs_window=obs_window, obs_power=obs_power, obs_reduce=obs_reduce, obs_exclude=obs_exclude,
                max_len=max_len, slot_bias=slot_bias, slot_term=slot_term)
