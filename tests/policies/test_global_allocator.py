"""The KV-Compress global allocator evicts the globally cheapest whole blocks across all (layer, head) pairs."""

from __future__ import annotations

import pytest
import torch

from kvcompress.allocators import build_allocator
from kvcompress.allocators.global_threshold import GlobalAllocator


def test_global_allocator_evicts_the_cheapest_block_units() -> None:
    torch.manual_seed(0)
    L, H, N, bs = 3, 2, 64, 16
    ranks = torch.rand(L, 1, H, N) * torch.arange(1, L * H + 1).view(L, 1, H, 1)  # heads of unequal importance
    lengths = torch.full((L, 1, H), N)
    target = torch.tensor([L * H * N / 4], dtype=torch.float64)  # keep 1/4: evict 3/4 of the 24 block units
    counts = GlobalAllocator().allocate(ranks, lengths, torch.zeros_like(lengths), target, bs)

    # brute force: a head's j-th unit costs its (j*bs)-th smallest rank; take the 18 cheapest units overall
    asc = ranks.sort(-1).values
    units = [
        (float(asc[layer, 0, h, j * bs - 1]), layer, h) for layer in range(L) for h in range(H) for j in (1, 2, 3, 4)
    ]
    evicted = torch.zeros(L, 1, H, dtype=torch.long)
    for _, layer, h in sorted(units)[: L * H * 4 * 3 // 4]:
        evicted[layer, 0, h] += 1
    assert torch.equal(counts, lengths - evicted * bs)
    assert counts.sum() == L * H * N // 4
    assert counts.min() < counts.max(), "unequal heads should keep different numbers of tokens"


def test_global_allocator_floor_keeps_a_share_of_the_uniform_budget() -> None:
    L, H, N, bs = 1, 4, 64, 8
    ranks = torch.ones(L, 1, H, N)
    ranks[0, 0, 0] = 1e-3  # head 0 is worthless: KV-Compress gives it nothing
    lengths = torch.full((L, 1, H), N)
    target = torch.tensor([L * H * N / 4], dtype=torch.float64)  # uniform share: 16 tokens per head
    zero = torch.zeros_like(lengths)
    plain = GlobalAllocator().allocate(ranks, lengths, zero, target, bs)
    assert plain[0, 0, 0] == 0
    counts = GlobalAllocator(floor=0.5).allocate(ranks, lengths, zero, target, bs)
    assert (counts >= 8).all()  # ceil(0.5 x 16)
    assert counts[0, 0, 0] == 8
    assert ((lengths - counts) % bs == 0).all(), "whole blocks only"
    assert counts.sum() <= target.item()


def test_global_allocator_cap_hands_a_dominant_heads_budget_to_the_others() -> None:
    """One head outranks every token of the others: KV-Compress gives it its whole length. With cap=2 it keeps at
    most twice the uniform share, and the blocks this frees go to the others by rank, still as whole blocks."""
    L, H, N, bs = 1, 4, 64, 8
    ranks = torch.rand(L, 1, H, N)
    ranks[0, 0, 0] += 10.0  # the copying head
    lengths = torch.full((L, 1, H), N)
    target = torch.tensor([L * H * N / 4], dtype=torch.float64)  # uniform share: 16 tokens per head
    zero = torch.zeros_like(lengths)
    plain = GlobalAllocator().allocate(ranks, lengths, zero, target, bs)[0, 0]
    assert plain[0] == 64 and plain[1:].sum() == 0
    capped = GlobalAllocator(cap=2.0).allocate(ranks, lengths, zero, target, bs)[0, 0]
    assert capped[0] == 32  # ceil(2 x 16)
    assert capped.sum() == 64 and capped[1:].sum() == 32
    assert ((lengths[0, 0] - capped) % bs == 0).all(), "whole blocks only"
    protected = torch.full_like(lengths, 40)  # protected tokens win over the ceiling
    assert GlobalAllocator(cap=2.0).allocate(ranks, lengths, protected, target, bs)[0, 0, 0] >= 40


def test_global_allocator_normalize_compares_heads_by_their_own_mass() -> None:
    """A flat low-scale head against a peaky high-scale head: raw scores evict the flat head first; normalised
    (by sum or max) the peaky head's tail holds a small share of its attention and goes first."""
    N, bs = 64, 8
    ranks = torch.empty(1, 1, 2, N)
    ranks[0, 0, 0] = 0.01  # flat
    ranks[0, 0, 1] = 1.0
    ranks[0, 0, 1, 0] = 100.0  # peaky
    lengths = torch.full((1, 1, 2), N)
    zero = torch.zeros_like(lengths)
    target = torch.tensor([N], dtype=torch.float64)  # keep half overall
    raw = GlobalAllocator().allocate(ranks, lengths, zero, target, bs)[0, 0]
    assert raw[0] < raw[1]
    for how in ("sum", "max"):
        counts = GlobalAllocator(normalize=how).allocate(ranks, lengths, zero, target, bs)[0, 0]
        assert counts[0] > counts[1], how
        assert counts.sum() == N


def test_allocator_args_errors() -> None:
    with pytest.raises(ValueError, match="allocation 'global' has no field 'alpha'; its fields: floor, cap, normalize"):
        build_allocator("global", {"alpha": 0.2})
    with pytest.raises(ValueError, match="normalize must be one of none, sum, max"):
        build_allocator("global", {"normalize": "rank"})
    with pytest.raises(ValueError, match="cap must be 0 .none. or at least 1 and the floor"):
        build_allocator("global", {"cap": 0.5})
    with pytest.raises(ValueError, match="its fields: none"):
        build_allocator("uniform", {"floor": 0.1})
