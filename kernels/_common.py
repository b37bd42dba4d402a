"""Helpers shared by the paged attention kernels (Triton device functions and host-side utilities).

Cache layout (see docs/KERNELS.md): ``k_cache``/``v_cache`` are ``[num_blocks, block_size, head_dim]``; the
logical slot ``j`` of a (sequence, kv head) lives in physical block ``block_tables[s, h, j // block_size]``
at offset ``j % block_size``. Block ids are widened to int64 before they are multiplied by a stride, so
pools with more than 2**31 elements address correctly.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .backend import interpreter_enabled

LOG2E = 1.4426950408889634  # softmax is computed with exp2: exp(x) == exp2(x * log2(e))
LOG2E_JIT = tl.constexpr(LOG2E)  # the same, readable inside @triton.jit functions
MIN_DOT = 16  # smallest tl.dot tile dimension accepted by real GPUs


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def upcast_tiles(dtype: torch.dtype) -> bool:
    """Whether kernels cast loaded tiles to fp32 before ``tl.dot``.

    Always under the interpreter (it computes bf16 wrongly) and for fp32 caches (then the dot runs in
    IEEE fp32, not TF32, so fp32 results match the reference to ~1e-5). fp16/bf16 on a GPU keep their
    native dtype so the dots use tensor cores with fp32 accumulation.
    """
    return interpreter_enabled() or dtype == torch.float32


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    """Validate the pool tensors ``[num_blocks, block_size, head_dim]``; return (block_size, head_dim)."""
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache/v_cache must both be [num_blocks, block_size, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache need a unit stride on head_dim")
    return int(k_cache.shape[1]), int(k_cache.shape[2])


def check_slot_bias(slot_bias: torch.Tensor | None, k_cache: torch.Tensor) -> None:
    """``slot_bias``: None, or contiguous float32 ``[num_blocks, block_size]``, one logit bias per slot."""
    if slot_bias is None:
        return
    if slot_bias.shape != k_cache.shape[:2] or slot_bias.dtype != torch.float32 or not slot_bias.is_contiguous():
        raise ValueError(
            f"slot_bias must be None or contiguous float32 {tuple(k_cache.shape[:2])}, got "
            f"{slot_bias.dtype} {tuple(slot_bias.shape)}"
        )


def check_slot_term(slot_term: torch.Tensor | None, slot_bias: torch.Tensor | None, q: torch.Tensor) -> None:
    """``slot_term``: None, or contiguous float32 ``[T, H_q]`` (one per query row of ``q`` ``[T, H_q, D]``), a logit
    term each query adds to every slot whose ``slot_bias`` is positive (the summary slots), so it needs
    ``slot_bias``."""
    if slot_term is None:
        return
    if slot_bias is None:
        raise ValueError("slot_term is added to the logits of slots with a positive slot_bias: pass slot_bias too")
    if slot_term.shape != q.shape[:2] or slot_term.dtype != torch.float32 or not slot_term.is_contiguous():
        raise ValueError(
            f"slot_term must be None or contiguous float32 {tuple(q.shape[:2])} (one per query row and query head), "
            f"got {slot_term.dtype} {tuple(slot_term.shape)}"
        )


def term_rows(bias: torch.Tensor, term: torch.Tensor | None) -> torch.Tensor:
    """The torch references' logit bias: ``bias`` (slot biases, broadcastable to ``[..., rows, M]``) plus, on the
    slots whose bias is positive, each query row's ``term`` (``[..., rows, 1]``; None adds nothing)."""
    return bias if term is None else bias + torch.where(bias > 0, term, 0.0)


def check_tables(block_tables: torch.Tensor, lengths: torch.Tensor, num_kv_heads: int | None = None) -> None:
    """Validate ``block_tables`` ``[num_seqs, H_kv, max_blocks]`` and ``lengths`` ``[num_seqs, H_kv]`` (int32)."""
    if block_tables.dim() != 3 or block_tables.dtype != torch.int32:
        raise ValueError(
            f"block_tables must be int32 [num_seqs, num_kv_heads, max_blocks], got "
            f"{block_tables.dtype} {tuple(block_tables.shape)}"
        )
    if lengths.shape != block_tables.shape[:2] or lengths.dtype != torch.int32:
        raise ValueError(
            f"lengths must be int32 {tuple(block_tables.shape[:2])}, got {lengths.dtype} {tuple(lengths.shape)}"
        )
    if num_kv_heads is not None and block_tables.shape[1] != num_kv_heads:
        raise ValueError(f"block_tables has {block_tables.shape[1]} kv heads, expected {num_kv_heads}")


def group_size(num_q_heads: int, num_kv_heads: int) -> int:
    """GQA group size ``H_q // H_kv`` (query head ``hq`` reads kv head ``hq // group``)."""
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"H_q={num_q_heads} is not a multiple of H_kv={num_kv_heads}")
    return num_q_heads // num_kv_heads


def max_length(lengths: torch.Tensor) -> int:
    """Largest per-head length (one host sync); 0 for an empty batch."""
    return int(lengths.max().item()) if lengths.numel() else 0


def gather_logical(
    block_tables: torch.Tensor, lengths: torch.Tensor, block_size: int, max_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch helper: map logical slots to physical (block, offset).

    Returns ``blocks`` and ``offsets`` ``[num_seqs, num_kv_heads, max_len]`` int64 and ``valid`` (bool, same
    shape; slot < length). Table entries past a head's length may be garbage (-1), so invalid slots are
    pointed at block 0 instead of being read from the table value.
    """
    j = torch.arange(max_len, device=block_tables.device)
    valid = j < lengths.unsqueeze(-1).long()
    col = (j // block_size).clamp(max=block_tables.shape[-1] - 1)  # max_len > 0 implies >= 1 column
    blocks = block_tables.long().index_select(-1, col)
    blocks = torch.where(valid, blocks, torch.zeros_like(blocks))
    offsets = (j % block_size).expand_as(blocks)
    return blocks, offsets, valid


def gather_blocks(
    pool: torch.Tensor,
    block_tables: torch.Tensor,
    valid: torch.Tensor,
    block_size: int,
    max_len: int,
    zero_invalid: bool = True,
) -> torch.Tensor:
    """Torch helper: the logical slots ``[num_seqs, num_kv_heads, max_len, head_dim]`` of a pool
    ``[num_blocks, block_size, head_dim]``, copied a whole block at a time (one ``index_select`` of contiguous
    ``block_size × head_dim`` rows, far cheaper on CPU than indexing slot by slot).

    With ``zero_invalid``, slots past a head's length (``~valid``, always a suffix) are zeroed: the pool there may
    hold anything, NaN included, and ``0 × NaN`` would poison a probability-weighted sum. (Keys whose logits are
    masked to -inf afterwards need no zeroing.) The zeroing multiplies by the mask and then clears NaN/inf, which
    is exact for finite valid slots, several times cheaper on CPU than a broadcast ``masked_fill``, and reads
    nothing back to the host.
    """
    num_seqs, num_kv_heads = block_tables.shape[:2]
    cols = -(-max_len // block_size)
    ids = block_tables[..., :cols].long().clamp_min(0).reshape(-1)
    full = pool.index_select(0, ids).view(num_seqs, num_kv_heads, cols * block_size, pool.shape[-1])
    if zero_invalid:
        keep = torch.nn.functional.pad(valid, (0, cols * block_size - max_len), value=False)
        full.mul_(keep[..., None]).nan_to_num_(0.0, 0.0, 0.0)
    return full[:, :, :max_len]


def strided_slots(pool: torch.Tensor, layout: tuple[int, int, int], num_seqs: int, num_kv_heads: int, length: int):
    """Torch helper: the logical slots ``[num_seqs, num_kv_heads, length, head_dim]`` of a pool
    ``[num_blocks, block_size, head_dim]`` as a strided view, no copy, when every head holds ``length`` slots in
    one contiguous run starting at flat slot ``first + b * seq_stride + h * head_stride`` (``layout``)."""
    first, seq_stride, head_stride = layout
    d = pool.shape[-1]
    flat = pool.view(-1, d)
    return flat.as_strided(
        (num_seqs, num_kv_heads, length, d), (seq_stride * d, head_stride * d, d, 1), flat.storage_offset() + first * d
    )


def num_programs_target(device: torch.device) -> int:
    """How many programs a launch should provide to fill the device (2 waves of SMs on CUDA)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def pick_num_splits(batch: int, num_kv_heads: int, max_len: int, device: torch.device, block_n: int) -> int:
    """Split-K factor for decode: enough (seq, kv_head, split) programs to fill the GPU, each split
    keeping at least 256 keys (shorter splits spend more on the merge than they save)."""
    min_chunk = 256 if device.type == "cuda" else 4096
    max_by_len = max(1, math.ceil(max_len / max(min_chunk, block_n)))
    want = math.ceil(num_programs_target(device) / max(batch * num_kv_heads, 1))
    return int(max(1, min(want, max_by_len, 64)))


# ----------------------------------------------------------------------------------------------------------
# Triton device functions
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def slot_coords(bt_row_ptr, offs_n, mask_n, BLOCK_SIZE: tl.constexpr):
    """Physical (block, offset) of logical slots ``offs_n`` of one head; block ids widened to int64.

    ``bt_row_ptr`` points at ``block_tables[s, h, 0]`` (contiguous in the last dim). Masked slots read no
    table entry (they may be garbage) and map to block 0.
    """
    blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    return blk, offs_n % BLOCK_SIZE


@triton.jit
def load_tile(base_ptr, blk, off, offs_d, mask_n, mask_d, stride_b, stride_s, UPCAST: tl.constexpr):
    """Gather a ``[BLOCK_N, BLOCK_D]`` tile of K or V rows at physical (blk, off); fp32 when UPCAST."""
    ptrs = base_ptr + blk[:, None] * stride_b + off[:, None] * stride_s + offs_d[None, :]
    tile = tl.load(ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def bias_tile(bias_ptr, blk, off, mask_n, BLOCK_SIZE: tl.constexpr):
    """The ``[BLOCK_N]`` logit biases of the slots at physical (blk, off), natural log to the kernels' log2."""
    return tl.load(bias_ptr + blk * BLOCK_SIZE + off, mask=mask_n, other=0.0) * LOG2E_JIT


@triton.jit
def add_bias(qk, bias_ptr, blk, off, mask_n, term, BLOCK_SIZE: tl.constexpr, HAS_TERM: tl.constexpr):
    """``qk`` ``[rows, BLOCK_N]`` (log2) plus the slots' biases and, on slots with a positive bias, each row's
    ``term`` ``[rows]`` (already in log2; ignored without HAS_TERM)."""
    kb = bias_tile(bias_ptr, blk, off, mask_n, BLOCK_SIZE)[None, :]
    qk += kb
    if HAS_TERM:
        qk += tl.where(kb > 0, term[:, None], 0.0)
    return qk


@triton.jit
def mm(a, b, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation: IEEE fp32 when UPCAST, else in the (fp16/bf16) dtype of ``b``."""
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        r = tl.dot(a.to(b.dtype), b)
    return r


@triton.jit
def online_softmax_step(qk, m_i, l_i, acc, v, UPCAST: tl.constexpr):
    """One flash-attention update with a ``[M, N]`` tile of log2-domain logits (masked = -inf).

    Rows whose logits are all -inf so far keep ``m_i == -inf``; a safe max avoids ``-inf - -inf``.
    Returns the new (m_i, l_i, acc).
    """
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mm(p, v, UPCAST)
    return m_new, l_i, acc


@triton.jit
def online_lse_step(qk, m_i, l_i):
    """The softmax normaliser of :func:`online_softmax_step` alone (no values): a running ``(max, sum)`` of a
    ``[M, N]`` tile of log2-domain logits (masked = -inf); ``m_i + log2(l_i)`` is the rows' log-sum-exp so far."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(qk - m_safe[:, None]), 1)
    return m_new, l_i


@triton.jit
def row_lse(m_i, l_i):
    """The rows' log-sum-exp (log2 domain) from a running ``(max, sum)``; ``-inf`` for rows that saw no key."""
    has = l_i > 0.0
    return tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))


@triton.jit
def finish_rows(m_i, l_i, acc):
    """Normalise the accumulator; rows that saw no key give zeros and lse ``-inf`` (log2 domain)."""
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    return out, row_lse(m_i, l_i)


@triton.jit
def prob_power(logit, lse, valid, POWER: tl.constexpr):
    """``p**POWER`` with ``p = exp2(logit - lse)`` (log2 domain), 0 where not ``valid``."""
    lse_safe = tl.where(lse == float("-inf"), float("inf"), lse)
    p = tl.where(valid, tl.exp2(logit - lse_safe), 0.0)
    if POWER == 2:
        p = p * p
    return p
