"""Test fixtures for the paged kernels: random paged pools and naive dense references.

``make_case`` builds a pool whose used blocks are scattered by a random permutation (or pushed to the far
end of a huge ``torch.empty`` pool), whose unused slots hold NaN and bogus positions (so any read past a
head's length poisons the result), and whose block-table entries past each head's length are -1.
The ``naive_*`` functions rebuild each head's dense K/V by walking the block table slot by slot in Python
and use SDPA / explicit softmax per (sequence, query head): independent of the vectorised references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GARBAGE_POS = -7  # a position every query would see if a kernel read an unused slot

ON_GPU = torch.cuda.is_available()
# Dtypes of the Triton-vs-torch comparisons: bf16 only on a GPU (the CPU interpreter computes bf16 wrongly).
DTYPES = [torch.float32, torch.float16, *([torch.bfloat16] if ON_GPU else [])]
# Output tolerances; bf16 as vLLM's kernel tests (8 mantissa bits: ~4e-3 relative rounding per element).
OUT_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=1.5e-2, rtol=1e-2),
}
# (H_q, H_kv, D) of real models, checked on CUDA only (too slow for the interpreter): SmolLM2-135M,
# Llama-3.1-8B, Qwen2-7B, Llama-2-7B (MHA), and a head_dim-256 GQA-8 case (Gemma-style).
MODEL_GEOMETRIES = [(9, 3, 64), (32, 8, 128), (28, 4, 128), (32, 32, 128), (16, 2, 256)]


@dataclass
class PagedCase:
    k_cache: torch.Tensor  # [num_blocks, block_size, D]
    v_cache: torch.Tensor
    slot_pos: torch.Tensor  # [num_blocks, block_size] int32
    slot_score: torch.Tensor  # [num_blocks, block_size] float32
    block_tables: torch.Tensor  # [B, H_kv, max_blocks] int32
    lengths: torch.Tensor  # [B, H_kv] int32

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]

    def slots(self, b: int, h: int) -> torch.Tensor:
        """Flat slot ids ``[len]`` (int64, CPU) of head (b, h) in logical order, read through the block table."""
        bs = self.block_size
        table = self.block_tables[b, h].tolist()  # one device->host copy, not one per slot
        return torch.tensor([table[j // bs] * bs + j % bs for j in range(int(self.lengths[b, h]))], dtype=torch.int64)

    def to(self, device: torch.device | str) -> PagedCase:
        """The same case with every tensor on ``device``."""
        return PagedCase(*(t.to(device) for t in vars(self).values()))

    def dense(self, b: int, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K [len, D] fp32, V [len, D] fp32, pos [len] int64) of head (b, h)."""
        s = self.slots(b, h)
        d = self.k_cache.shape[-1]
        return (
            self.k_cache.view(-1, d)[s].float(),
            self.v_cache.view(-1, d)[s].float(),
            self.slot_pos.view(-1)[s].long(),
        )


def make_case(
    lengths: list[list[int]],
    head_dim: int,
    dtype: torch.dtype,
    *,
    block_size: int = 16,
    spare_blocks: int = 5,
    positions: list[list[torch.Tensor]] | None = None,
    num_blocks: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> PagedCase:
    """Random paged pool holding ``lengths[b][h]`` tokens per head, on ``device``.

    ``positions[b][h]`` (int, ``[len]``) gives each logical slot's token position (default: its index).
    ``num_blocks`` forces a pool size; the pool is then ``torch.empty`` and only the used blocks, placed at
    the far end, are written (for pools beyond 2**31 elements that must not be touched).
    The pool is filled on the CPU (same random values on every device), then moved.
    """
    gen = torch.Generator().manual_seed(seed)
    batch, heads = len(lengths), len(lengths[0])
    need = [[math.ceil(n / block_size) for n in row] for row in lengths]
    total = sum(map(sum, need))
    max_blocks = max(max(map(max, need)), 1) + 2
    if num_blocks is None:
        num_blocks = total + spare_blocks
        ids = torch.randperm(num_blocks, generator=gen)[:total]
        k_cache = torch.full((num_blocks, block_size, head_dim), float("nan"), dtype=dtype)
        v_cache = torch.full_like(k_cache, float("nan"))
        slot_pos = torch.full((num_blocks, block_size), GARBAGE_POS, dtype=torch.int32)
        slot_score = torch.zeros((num_blocks, block_size), dtype=torch.float32)
    else:
        ids = num_blocks - 1 - torch.randperm(total, generator=gen)
        k_cache = torch.empty((num_blocks, block_size, head_dim), dtype=dtype)
        v_cache = torch.empty_like(k_cache)
        slot_pos = torch.empty((num_blocks, block_size), dtype=torch.int32)
        slot_score = torch.empty((num_blocks, block_size), dtype=torch.float32)
        used = ids.sort().values
        for t in (k_cache, v_cache):
            t[used] = float("nan")
        slot_pos[used] = GARBAGE_POS
        slot_score[used] = 0.0
    block_tables = torch.full((batch, heads, max_blocks), -1, dtype=torch.int32)
    it = iter(ids.tolist())
    for b in range(batch):
        for h in range(heads):
            n = lengths[b][h]
            for i in range(need[b][h]):
                block_tables[b, h, i] = next(it)
            slots = torch.tensor(
                [int(block_tables[b, h, j // block_size]) * block_size + j % block_size for j in range(n)],
                dtype=torch.int64,
            )
            k_cache.view(-1, head_dim)[slots] = torch.randn(n, head_dim, generator=gen).to(dtype)
            v_cache.view(-1, head_dim)[slots] = torch.randn(n, head_dim, generator=gen).to(dtype)
            pos = torch.arange(n) if positions is None else positions[b][h]
            slot_pos.view(-1)[slots] = pos.to(torch.int32)
    return PagedCase(k_cache, v_cache, slot_pos, slot_score, block_tables, torch.tensor(lengths, dtype=torch.int32)).to(
        device
    )


def random_bias(case: PagedCase, seed: int = 4) -> torch.Tensor:
    """A ``slot_bias`` for ``case``: ``log(n)`` for n in 1..8 on every slot, as summary slots of 1 to 8 tokens
    would hold (on the case's device)."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 9, case.slot_score.shape, generator=gen).float()
    return counts.log().to(case.slot_score.device)


def naive_decode(
    q: torch.Tensor,
    case: PagedCase,
    scale: float,
    power: int,
    bias: torch.Tensor | None = None,
    term: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, float]]:
    """Dense per-(seq, query head) decode: SDPA output and ``{flat slot: sum_group p**power}``; ``bias``
    (``[num_blocks, block_size]``, CPU) is added to each slot's logit, and ``term`` (``[B, H_q]``) to the logit of
    each slot with a positive bias."""
    batch, num_q_heads, _ = q.shape
    group = num_q_heads // case.lengths.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32)
    scores: dict[int, float] = {}
    for b in range(batch):
        for hq in range(num_q_heads):
            h = hq // group
            if int(case.lengths[b, h]) == 0:
                continue
            k, v, _ = case.dense(b, h)
            kb = torch.zeros(len(k)) if bias is None else bias.view(-1)[case.slots(b, h)]
            if term is not None:
                kb = kb + term[b, hq] * (kb > 0)
            qi = q[b, hq].float()
            out[b, hq] = F.scaled_dot_product_attention(
                qi[None, None, None], k[None, None], v[None, None], attn_mask=kb[None, None, None], scale=scale
            )[0, 0, 0]
            p = torch.softmax(k @ qi * scale + kb, dim=0)
            for s, pj in zip(case.slots(b, h).tolist(), p.pow(power).tolist(), strict=True):
                scores[s] = scores.get(s, 0.0) + pj
    return out, scores


def naive_prefill(
    q: torch.Tensor,
    case: PagedCase,
    q_pos: torch.Tensor,
    cu: torch.Tensor,
    scale: float,
    obs_window: int,
    obs_power: int,
    bias: torch.Tensor | None = None,
    term: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense per-(seq, query head) causal prefill with a position mask; returns (out fp32, obs fp32); ``bias``
    (``[num_blocks, block_size]``, CPU) is added to each slot's logit, and ``term`` (``[T, H_q]``) to the logit of
    each slot with a positive bias."""
    num_q_heads = q.shape[1]
    batch, heads = case.lengths.shape
    group = num_q_heads // heads
    max_len = int(case.lengths.max())
    out = torch.zeros(q.shape, dtype=torch.float32)
    obs = torch.zeros(batch, num_q_heads, max_len)
    for b in range(batch):
        t0, t1 = int(cu[b]), int(cu[b + 1])
        for hq in range(num_q_heads):
            h = hq // group
            n = int(case.lengths[b, h])
            if n == 0 or t1 == t0:
                continue
            k, v, kpos = case.dense(b, h)
            kb = torch.zeros(n) if bias is None else bias.view(-1)[case.slots(b, h)]
            qb = q[t0:t1, hq].float()
            mask = kpos[None, :] <= q_pos[t0:t1, None].long()  # [T_b, len]
            kb = kb.expand_as(mask) if term is None else kb + term[t0:t1, hq, None] * (kb > 0)  # [T_b, len]
            logits = (qb @ k.T * scale + kb).masked_fill(~mask, float("-inf"))
            out[t0:t1, hq] = F.scaled_dot_product_attention(
                qb[None],
                k[None],
                v[None],
                attn_mask=kb.masked_fill(~mask, float("-inf"))[None],
                scale=scale,
            )[0]
            p = torch.softmax(logits, dim=-1)
            first = max(0, (t1 - t0) - obs_window)
            obs[b, hq, :n] = p[first:].pow(obs_power).sum(0)
    return out, obs
