"""The KV-Compress global allocator evicts the globally cheapest whole blocks across all (layer, head) pairs."""

from __future__ import annotations

import torch

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
