"""write_kv / compact: Triton vs torch vs a per-row Python loop, and an evict-compact-decode round trip.

Expected values are built on the CPU; the ops run on the ``device`` fixture (CUDA when present, else the CPU,
Triton under the interpreter).
"""

from __future__ import annotations

import pytest
import torch
from kvcompress_kernels import (
    compact,
    compact_torch,
    compact_triton,
    paged_decode_triton,
    use_backend,
    write_kv,
    write_kv_torch,
    write_kv_triton,
)
from paged_case import make_case

IMPLS = {"triton": (write_kv_triton, compact_triton), "torch": (write_kv_torch, compact_torch)}


def _pool(num_blocks=12, block_size=16, head_dim=64, dtype=torch.float32, seed=0, bias=False):
    """(k_cache, v_cache ``[num_blocks, block_size, head_dim]``, slot_pos, slot_score ``[num_blocks, block_size]``
    and, with ``bias``, slot_bias ``[num_blocks, block_size]``), random, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    pool = (
        torch.randn(num_blocks, block_size, head_dim, generator=gen).to(dtype),
        torch.randn(num_blocks, block_size, head_dim, generator=gen).to(dtype),
        torch.randint(0, 1000, (num_blocks, block_size), generator=gen, dtype=torch.int32),
        torch.rand(num_blocks, block_size, generator=gen),
    )
    return (*pool, torch.rand(num_blocks, block_size, generator=gen) * 5) if bias else pool


def _clone(pool, device="cpu"):
    return tuple(t.clone().to(device) for t in pool)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("bias", [False, True])
def test_write_kv_matches_loop(device, impl, dtype, head_dim, bias):
    """Written slots get their rows and position; their score, and their summary bias if the pool has one, are
    zeroed; every other slot is untouched."""
    pool = _pool(head_dim=head_dim, dtype=dtype, bias=bias)
    n = 37  # spans 3 programs of 16 rows, the last partial
    slots = torch.randperm(pool[0].shape[0] * pool[0].shape[1])[:n]
    k, v = torch.randn(n, head_dim), torch.randn(n, head_dim)  # fp32 rows, cast to the pool dtype
    pos = torch.arange(n, dtype=torch.int32) + 500
    expected = _clone(pool)
    bs = pool[0].shape[1]
    for i, s in enumerate(slots.tolist()):
        expected[0][s // bs, s % bs] = k[i].to(dtype)
        expected[1][s // bs, s % bs] = v[i].to(dtype)
        expected[2][s // bs, s % bs] = pos[i]
        expected[3][s // bs, s % bs] = 0.0
        if bias:
            expected[4][s // bs, s % bs] = 0.0
    got = _clone(pool, device)
    IMPLS[impl][0](*got[:4], slots.to(device), k.to(device), v.to(device), pos.to(device), *got[4:])
    for g, want in zip(got, expected, strict=True):
        torch.testing.assert_close(g.cpu(), want, atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_compact_matches_loop(device, impl, dtype, bias):
    """Every per-slot tensor of the pool, the summary bias included when there is one, moves src -> dst."""
    pool = _pool(dtype=dtype, seed=1, bias=bias)
    perm = torch.randperm(pool[0].shape[0] * pool[0].shape[1])
    src, dst = perm[:21], perm[21:42]  # disjoint
    expected = _clone(pool)
    bs = pool[0].shape[1]
    for s, d in zip(src.tolist(), dst.tolist(), strict=True):
        for t in expected:
            t[d // bs, d % bs] = t[s // bs, s % bs]
    got = _clone(pool, device)
    IMPLS[impl][1](*got[:4], src.to(device), dst.to(device), *got[4:])
    for g, want in zip(got, expected, strict=True):
        torch.testing.assert_close(g.cpu(), want, atol=0, rtol=0)


def test_empty_and_validation(device):
    pool = _clone(_pool(), device)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    rows = torch.empty(0, 64, device=device)
    write_kv_triton(*pool, empty, rows, rows, empty.int())
    compact_triton(*pool, empty, empty)
    with pytest.raises(ValueError, match="int64"):
        compact_torch(*pool, empty.int(), empty.int())
    with pytest.raises(ValueError, match="slot_score"):
        write_kv_torch(*pool[:3], pool[3].double(), empty, rows, rows, empty.int())
    with pytest.raises(ValueError, match="slot_bias must be None or contiguous float32"):
        compact_triton(*pool, empty, empty, pool[3].double())
    with pytest.raises(ValueError, match="slot_bias must be None or contiguous float32"):
        write_kv_torch(*pool, empty, rows, rows, empty.int(), pool[3][:2])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_evict_compact_then_decode(device, backend):
    """Evict tokens of one head, move tail survivors into the holes, drop the tail: decode output equals
    attention over the survivors, and positions/scores travelled with their slots."""
    case = make_case([[45]], 64, torch.float32, seed=5, device=device)
    bs = case.block_size
    case.slot_score.view(-1)[case.slots(0, 0).to(device)] = torch.arange(45, dtype=torch.float32, device=device)
    slots = case.slots(0, 0).to(device)
    evict = torch.tensor([0, 3, 4, 17, 30, 31, 40, 44])
    keep = torch.ones(45, dtype=torch.bool)
    keep[evict] = False
    n_keep = int(keep.sum())
    holes = evict[evict < n_keep]  # logical holes inside the kept prefix
    movers = torch.nonzero(keep[n_keep:]).flatten() + n_keep  # survivors in the tail
    assert len(holes) == len(movers)
    keep, holes, movers = keep.to(device), holes.to(device), movers.to(device)  # index device tensors on-device
    q = torch.randn(1, 2, 64).to(device)
    k_keep, v_keep = case.k_cache.view(-1, 64)[slots[keep]], case.v_cache.view(-1, 64)[slots[keep]]
    pos_keep = case.slot_pos.view(-1)[slots[keep]].sort().values
    ref = torch.softmax(q[0] @ k_keep.T * 0.125, -1) @ v_keep
    with use_backend(backend):
        compact(case.k_cache, case.v_cache, case.slot_pos, case.slot_score, slots[movers], slots[holes])
    case.lengths.fill_(n_keep)
    case.block_tables[0, 0, (n_keep + bs - 1) // bs :] = -1  # free the now-empty tail blocks
    out = paged_decode_triton(q, case.k_cache, case.v_cache, case.block_tables, case.lengths, 0.125)
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)
    new_slots = case.slots(0, 0).to(device)
    assert torch.equal(case.slot_pos.view(-1)[new_slots].sort().values, pos_keep)
    # scores were set to the original logical index, i.e. the original position
    torch.testing.assert_close(case.slot_score.view(-1)[new_slots], case.slot_pos.view(-1)[new_slots].float())


def test_write_kv_dispatch_and_huge_pool(device):
    """Writes land correctly past 2**31 elements (int64 slot arithmetic) through the dispatcher."""
    head_dim, bs = 64, 16
    num_blocks = (1 << 31) // (bs * head_dim) + 8
    k_cache = torch.empty(num_blocks, bs, head_dim, dtype=torch.float16, device=device)
    v_cache = torch.empty_like(k_cache)
    slot_pos = torch.empty(num_blocks, bs, dtype=torch.int32, device=device)
    slot_score = torch.empty(num_blocks, bs, device=device)
    slots = torch.arange(num_blocks * bs - 20, num_blocks * bs, device=device)
    k, v = torch.randn(20, head_dim).to(device), torch.randn(20, head_dim).to(device)
    pos = torch.arange(20, dtype=torch.int32, device=device)
    with use_backend("triton"):
        write_kv(k_cache, v_cache, slot_pos, slot_score, slots, k, v, pos)
        compact(k_cache, v_cache, slot_pos, slot_score, slots[10:], slots[:10] - 100)
    torch.testing.assert_close(k_cache[-2:].reshape(-1, head_dim)[-20:], k.half())
    torch.testing.assert_close(v_cache.view(-1, head_dim)[slots[:10] - 100], v[10:].half())
    assert slot_pos.view(-1)[slots[:10] - 100].tolist() == list(range(10, 20))
    assert torch.all(slot_score.view(-1)[slots] == 0)
