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


def test_global_allocator_floor_from_applies_the_floor_to_hard_compressions_only() -> None:
    """Two sequences, one compressed 8x and one 16x (``depth``), both with a worthless head: with floor_from=12 only
    the 16x one holds that head at the floor; the 8x one is allocated as with no floor at all."""
    L, H, N, bs = 1, 4, 64, 8
    ranks = torch.ones(L, 2, H, N)
    ranks[0, :, 0] = 1e-3
    lengths = torch.full((L, 2, H), N)
    target = torch.tensor([L * H * N / 4] * 2, dtype=torch.float64)  # uniform share: 16 tokens per head
    zero = torch.zeros_like(lengths)
    depth = torch.tensor([8.0, 16.0], dtype=torch.float64)
    plain = GlobalAllocator().allocate(ranks, lengths, zero, target, bs)
    both = GlobalAllocator(floor=0.5).allocate(ranks, lengths, zero, target, bs)
    counts = GlobalAllocator(floor=0.5, floor_from=12).allocate(ranks, lengths, zero, target, bs, depth=depth)
    assert plain[0, 0, 0] == 0 and both[0, 0, 0] == 8
    assert torch.equal(counts[:, 0], plain[:, 0]) and torch.equal(counts[:, 1], both[:, 1])
    with pytest.raises(ValueError, match="floor_from needs each sequence's depth"):
        GlobalAllocator(floor=0.5, floor_from=12).allocate(ranks, lengths, zero, target, bs)


def test_global_allocator_floor_layers_holds_up_the_leading_layers_only() -> None:
    """Two layers, each with a worthless head: floor_layers=1 holds layer 0's at the floor and leaves layer 1's to
    the threshold, which gives it nothing, as with no floor at all."""
    L, H, N, bs = 2, 2, 64, 8
    ranks = torch.ones(L, 1, H, N)
    ranks[:, 0, 0] = 1e-3
    lengths = torch.full((L, 1, H), N)
    target = torch.tensor([L * H * N / 4], dtype=torch.float64)  # uniform share: 16 tokens per head
    zero = torch.zeros_like(lengths)
    counts = GlobalAllocator(floor=0.5, floor_layers=1).allocate(ranks, lengths, zero, target, bs)
    assert counts[0, 0, 0] == 8 and counts[1, 0, 0] == 0
    assert counts.sum() <= target.item() and ((lengths - counts) % bs == 0).all()
    with pytest.raises(ValueError, match="floor_layers must be 0 .the floor in every layer. or a number"):
        build_allocator("global", {"floor_layers": 7})


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
    fields = "floor, floor_from, floor_layers, cap, normalize"
    with pytest.raises(ValueError, match=f"allocation 'global' has no field 'alpha'; its fields: {fields}"):
        build_allocator("global", {"alpha": 0.2})
    with pytest.raises(ValueError, match="normalize must be one of none, sum, max"):
        build_allocator("global", {"normalize": "rank"})
    for bad in ({"floor": 0.5, "floor_from": 0.5}, {"floor_from": 16}):
        with pytest.raises(ValueError, match="floor_from must be 0 .the floor at every ratio. or a ratio >= 1"):
            build_allocator("global", bad)
    with pytest.raises(ValueError, match="cap must be 0 .none. or at least 1 and the floor"):
        build_allocator("global", {"cap": 0.5})
    with pytest.raises(ValueError, match="its fields: none"):
        build_allocator("uniform", {"floor": 0.1})


def test_the_compressor_gives_floor_from_each_sequences_depth() -> None:
    """Two sequences held to 8 tokens per head in one compression: the one that saw 64 tokens (8x) is past
    floor_from=5, so floor=1 holds every head at its uniform share; the one that saw 24 (3x) is allocated by the
    threshold alone, exactly as without a floor."""
    from kvcompress.budget import Budget
    from kvcompress.cache.paged import PagedKVCache
    from kvcompress.compressor import Compressor
    from kvcompress.policies.knorm import KnormPolicy

    L, H, D = 2, 3, 4

    def two_sequences() -> PagedKVCache:
        cache = PagedKVCache(L, H, D, 256, block_size=4, max_seqs=2, max_tokens_per_head=64)
        seqs = [cache.add_sequence(), cache.add_sequence()]
        gen = torch.Generator().manual_seed(3)
        plan = cache.plan_step(seqs, [24, 64])
        for layer in range(L):
            scale = torch.rand(1, H, 1, generator=gen) * 4  # heads of unequal key norms
            keys = torch.randn(88, H, D, generator=gen) * scale
            cache.write(layer, plan, keys, torch.randn(88, H, D, generator=gen))
        return cache

    def kept(cache: PagedKVCache, seq: int) -> list[int]:
        return [int(n) for layer in range(L) for n in cache.view(layer, [seq]).lengths[0]]

    args = {"floor": 1.0, "floor_from": 5}
    cache, plain = two_sequences(), two_sequences()
    Compressor(
        KnormPolicy(), Budget(max_cache_tokens=8, protected_window=1, allocation="global", allocator_args=args)
    ).compress(cache, [0, 1])
    Compressor(KnormPolicy(), Budget(max_cache_tokens=8, protected_window=1, allocation="global")).compress(
        plain, [0, 1]
    )
    assert kept(cache, 1) == [8] * (L * H)
    assert kept(cache, 0) == kept(plain, 0) and len(set(kept(plain, 0))) > 1
    assert kept(plain, 1) != kept(cache, 1)
