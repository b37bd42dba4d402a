"""Summary slots (kvcompress.cache.summary): what a head evicts folds into slots that hold its groups' mean key and
value and their token counts, which survive compaction, a second compression, forks and recycled blocks."""

from __future__ import annotations

import math

import pytest
import torch

from kvcompress.cache.paged import PagedKVCache
from kvcompress.cache.summary import fold_evicted

L, H, D, BS = 2, 3, 4, 4


def filled(
    n: int, seed: int = 0, spread: torch.Tensor | None = None
) -> tuple[PagedKVCache, torch.Tensor, torch.Tensor]:
    """A summaries cache holding ``n`` tokens of one sequence; returns it and the keys / values ``[L, n, H, D]``.
    ``spread`` (broadcast to the keys) shifts the keys, which are then 0.1 x standard normal around it."""
    cache = PagedKVCache(L, H, D, 128, block_size=BS, max_seqs=2, max_tokens_per_head=64, summaries=True)
    seq = cache.add_sequence()
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(L, n, H, D, generator=gen), torch.randn(L, n, H, D, generator=gen)
    if spread is not None:
        keys = keys * 0.1 + spread
    plan = cache.plan_step([seq], [n])
    for layer in range(L):
        cache.write(layer, plan, keys[layer], values[layer])
    return cache, keys, values


def compress(
    cache: PagedKVCache, keep: torch.Tensor, groups: int, kmeans: int = 0, queries: list | None = None
) -> None:
    """Fold then evict sequence 0 down to ``keep`` ``[L, 1, H, N]``, as the compressor does."""
    views = [cache.view(layer, [0]) for layer in range(L)]
    cache.evict([0], fold_evicted(cache, views, keep, groups, kmeans, queries))


def held(
    cache: PagedKVCache, layer: int, head: int, seq: int = 0
) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{position: (key, value, count)}`` of what a head of sequence ``seq`` holds."""
    v = cache.view(layer, [seq])
    ok = v.valid[0, head]
    bias = cache.slot_bias.view(-1)[v.slots[0, head][ok]]
    rows = zip(v.positions[0, head][ok], v.keys[0, head][ok], v.values[0, head][ok], bias, strict=True)
    return {int(p): (k, val, float(b.exp())) for p, k, val, b in rows}


def test_each_group_becomes_one_slot_with_its_means_and_count() -> None:
    cache, keys, values = filled(20)
    keep = torch.zeros(L, 1, H, 20, dtype=torch.bool)
    keep[..., [0, 7, 19]] = True  # evicted: 1-6, 8-18 (17 tokens) -> groups of 9 and 8, by position
    compress(cache, keep, groups=2)
    groups = [list(range(1, 7)) + [8, 9, 10], list(range(11, 19))]
    for layer in range(L):
        for h in range(H):
            slots = held(cache, layer, h)
            assert sorted(slots) == [0, 7, 10, 18, 19]  # a summary sits at its group's last position
            assert sum(c for _, _, c in slots.values()) == pytest.approx(20)  # every token is accounted for
            for members in groups:
                k, v, count = slots[members[-1]]
                assert count == pytest.approx(len(members))
                torch.testing.assert_close(k, keys[layer, members, h].mean(0))
                torch.testing.assert_close(v, values[layer, members, h].mean(0))
            for p in (0, 7, 19):
                k, v, count = slots[p]
                assert count == 1 and torch.equal(k, keys[layer, p, h]) and torch.equal(v, values[layer, p, h])


@pytest.mark.parametrize("kmeans", [0, 3])
def test_kmeans_regroups_evicted_tokens_by_key(kmeans: int) -> None:
    """Evicted keys from two clusters, interleaved in position: the groups by position mix them; a few k-means
    iterations give one slot per cluster, at its last member's position, with that cluster's means and count."""
    far = torch.where(torch.arange(20) % 2 == 0, 8.0, -8.0)[None, :, None, None]  # even near +8, odd near -8
    cache, keys, values = filled(20, seed=4, spread=far)
    keep = torch.zeros(L, 1, H, 20, dtype=torch.bool)
    keep[..., [0, 19]] = True  # evicted: 1-18
    compress(cache, keep, groups=2, kmeans=kmeans)
    by_key = [list(range(2, 19, 2)), list(range(1, 18, 2))]  # even 2-18, odd 1-17
    by_position = [list(range(1, 10)), list(range(10, 19))]
    for layer in range(L):
        for h in range(H):
            slots = held(cache, layer, h)
            groups = by_key if kmeans else by_position
            assert sorted(slots) == sorted([0, 19] + [g[-1] for g in groups])
            for members in groups:
                k, v, count = slots[members[-1]]
                assert count == pytest.approx(len(members))
                torch.testing.assert_close(k, keys[layer, members, h].mean(0))
                torch.testing.assert_close(v, values[layer, members, h].mean(0))
                assert (k.abs().mean() > 6) == bool(kmeans)  # one cluster's keys, or a mix of both


def test_a_summary_evicted_again_folds_in_by_its_count() -> None:
    cache, keys, _ = filled(20, seed=1)
    keep = torch.zeros(L, 1, H, 20, dtype=torch.bool)
    keep[..., 10:] = True
    compress(cache, keep, groups=1)  # positions 0-9 -> one slot at 9, counting 10
    v = cache.view(0, [0])
    keep = (v.positions >= 15)[None].expand(L, -1, -1, -1)  # evict the summary and 10-14
    compress(cache, keep, groups=1)
    for h in range(H):
        slots = held(cache, 0, h)
        assert sorted(slots) == [14, 15, 16, 17, 18, 19]
        k, _, count = slots[14]
        assert count == pytest.approx(15)
        torch.testing.assert_close(k, keys[0, :15, h].mean(0))  # the mean over all 15 tokens, not over 6 slots


def test_a_head_that_evicts_fewer_tokens_than_groups_keeps_each_as_itself() -> None:
    cache, keys, _ = filled(12, seed=2)
    keep = torch.ones(L, 1, H, 12, dtype=torch.bool)
    keep[..., [3, 5]] = False
    keep[0, 0, 1] = True  # layer 0, head 1 evicts nothing
    compress(cache, keep, groups=4)
    for layer in range(L):
        for h in range(H):
            slots = held(cache, layer, h)
            assert sorted(slots) == list(range(12)) and all(c == pytest.approx(1) for _, _, c in slots.values())
            assert all(torch.allclose(slots[p][0], keys[layer, p, h]) for p in range(12))


def test_forks_copy_counts_and_recycled_slots_start_at_zero() -> None:
    cache, _, _ = filled(16, seed=3)
    keep = torch.zeros(L, 1, H, 16, dtype=torch.bool)
    keep[..., 12:] = True
    compress(cache, keep, groups=1)
    child = cache.fork(0)
    v = cache.view(1, [child])
    counts = cache.slot_bias.view(-1)[v.slots[0]].exp()
    assert sorted(counts[0].tolist()) == pytest.approx([1, 1, 1, 1, 12])
    cache.release(0)
    cache.release(child)
    seq = cache.add_sequence()
    plan = cache.plan_step([seq], [40])  # reuses the summaries' blocks
    for layer in range(L):
        cache.write(layer, plan, torch.zeros(40, H, D), torch.zeros(40, H, D))
    assert torch.all(cache.slot_bias.view(-1)[plan.slots[0].reshape(-1)] == 0)


def test_the_compressor_spends_the_budget_on_summaries_too() -> None:
    """``summary_slots`` come out of the budget: each head holds its share, two of them summaries, and every token
    the head has seen is counted once."""
    from kvcompress.budget import Budget
    from kvcompress.compressor import Compressor
    from kvcompress.policies.knorm import KnormPolicy

    cache, _, _ = filled(40, seed=4)
    Compressor(KnormPolicy(), Budget(ratio=4, protected_window=2, summary_slots=2)).compress(cache, [0])
    for layer in range(L):
        for h in range(H):
            counts = [c for _, _, c in held(cache, layer, h).values()]
            assert len(counts) == 10 and sum(c > 1 for c in counts) == 2
            assert sum(counts) == pytest.approx(40)


def test_summaries_cost_the_global_allocator_no_block() -> None:
    """The global threshold frees whole blocks; summaries sit in the places of kept tokens, so they free as many."""
    from kvcompress.budget import Budget
    from kvcompress.compressor import Compressor
    from kvcompress.policies.knorm import KnormPolicy

    used = {}
    for slots in (0, 1, 3):
        cache, _, _ = filled(48, seed=5)
        budget = Budget(ratio=3, protected_window=2, allocation="global", summary_slots=slots)
        Compressor(KnormPolicy(), budget).compress(cache, [0])
        used[slots] = (cache.num_used_blocks, int(cache.lengths.sum()))
    assert used[0] == used[1] == used[3]


def test_a_cache_without_summaries_refuses_to_fold() -> None:
    cache = PagedKVCache(L, H, D, 8, block_size=BS)
    with pytest.raises(ValueError, match="summaries=True"):
        fold_evicted(cache, [], torch.zeros(L, 1, H, 0, dtype=torch.bool), 1)


def test_kmeans_needs_several_summary_slots() -> None:
    from kvcompress.budget import Budget, BudgetError

    with pytest.raises(
        BudgetError, match=r"budget.summary_kmeans=5 regroups .* needs budget.summary_slots >= 2 \(got 1\)"
    ):
        Budget(ratio=4, summary_slots=1, summary_kmeans=5)
    Budget(ratio=4, summary_slots=2, summary_kmeans=5)


def test_shared_value_slots_keep_their_groups_keys_and_counts_and_the_heads_mean_value() -> None:
    """``shared_value`` (``budget.summary_shared_value``): with the two key clusters of the k-means test, each slot
    keeps its cluster's mean key and count, and every slot holds the mean value of all 18 evicted tokens, so the
    slots sketch only the evicted tokens' share of attention."""
    far = torch.where(torch.arange(20) % 2 == 0, 8.0, -8.0)[None, :, None, None]
    cache, keys, values = filled(20, seed=4, spread=far)
    keep = torch.zeros(L, 1, H, 20, dtype=torch.bool)
    keep[..., [0, 19]] = True
    views = [cache.view(layer, [0]) for layer in range(L)]
    cache.evict([0], fold_evicted(cache, views, keep, 2, kmeans=3, shared_value=True))
    for layer in range(L):
        for h in range(H):
            slots = held(cache, layer, h)
            for members in (list(range(2, 19, 2)), list(range(1, 18, 2))):
                k, v, count = slots[members[-1]]
                assert count == pytest.approx(len(members))
                torch.testing.assert_close(k, keys[layer, members, h].mean(0))
                torch.testing.assert_close(v, values[layer, 1:19, h].mean(0))
            assert torch.equal(slots[0][1], values[layer, 0, h])  # a kept token keeps its own value


def test_shared_value_needs_several_plain_slots() -> None:
    from kvcompress.budget import Budget, BudgetError

    Budget(ratio=4, summary_slots=2, summary_kmeans=5, summary_shared_value=True)
    for args, got in (
        ({"summary_slots": 1}, "summary_slots=1, summary_fit=0, summary_spread=false"),
        ({"summary_slots": 2, "summary_fit": 4}, "summary_slots=2, summary_fit=4, summary_spread=false"),
        ({"summary_slots": 2, "summary_spread": True}, "summary_slots=2, summary_fit=0, summary_spread=true"),
    ):
        with pytest.raises(BudgetError, match=rf"summary_shared_value=true .* >= 2, .* \(got {got}\)"):
            Budget(ratio=4, summary_shared_value=True, **args)
    with pytest.raises(BudgetError, match=r"budget.summary_shared_value must be true or false, got 'yes'"):
        Budget(ratio=4, summary_slots=2, summary_shared_value="yes")
    cache, _, _ = filled(20, seed=17)
    views = [cache.view(layer, [0]) for layer in range(L)]
    keep = torch.ones(L, 1, H, 20, dtype=torch.bool)
    with pytest.raises(ValueError, match="shared-value summary slots keep the head's mean value"):
        fold_evicted(cache, views, keep, 2, spread=True, shared_value=True)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One query ``[D]`` over ``keys``/``values`` ``[n, D]`` with logit biases ``[n]``: its output ``[D]``."""
    return torch.softmax(q @ keys.T * D**-0.5 + bias, -1) @ values


def fit_queries(q: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``q`` ``[H_q, M, D]`` as every layer's queries of one sequence, all valid."""
    return [(q[None], torch.ones(1, q.shape[1], dtype=torch.bool))] * L


def held_tensors(
    cache: PagedKVCache, layer: int, head: int, seq: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = held(cache, layer, head, seq).values()
    keys, values, counts = zip(*rows, strict=True)
    return torch.stack(keys), torch.stack(values), torch.tensor(counts).log()


def fitted_and_plain(
    n: int, seed: int, q: torch.Tensor, kept: list[int]
) -> tuple[PagedKVCache, PagedKVCache, torch.Tensor, torch.Tensor]:
    """Two caches of ``n`` tokens that keep positions ``kept`` and fold the rest into one slot per head, fitted to
    ``q`` (``[H_q, M, D]``) in the first and with the ``log(n)`` bias in the second; and the keys / values."""
    keep = torch.zeros(L, 1, H, n, dtype=torch.bool)
    keep[..., kept] = True
    cache, keys, values = filled(n, seed=seed)
    compress(cache, keep, 1, queries=fit_queries(q))
    plain, _, _ = filled(n, seed=seed)
    compress(plain, keep, 1)
    return cache, plain, keys, values


def test_a_slot_fitted_to_one_query_gives_it_the_full_heads_output() -> None:
    """With one query per head the fitted slot holds the evicted group's exact share of that query's attention and
    its exact output, so the compressed head answers that query as the full head does; the ``log(n)`` slot does
    not (its mean key's Jensen gap and mean value)."""
    q = torch.randn(H, 1, D, generator=torch.Generator().manual_seed(7)) * 3
    cache, plain, keys, values = fitted_and_plain(24, 6, q, [0, 5, 22, 23])
    for layer in range(L):
        for h in range(H):
            full = attend(q[h, 0], keys[layer, :, h], values[layer, :, h], torch.zeros(24))
            torch.testing.assert_close(attend(q[h, 0], *held_tensors(cache, layer, h)), full)
            assert not torch.allclose(attend(q[h, 0], *held_tensors(plain, layer, h)), full, atol=1e-3)


def test_a_slot_fitted_to_several_queries_weighs_at_least_its_count() -> None:
    """Over several queries of a GQA group the fitted bias is the mean log gap, at least ``log(n)`` (Jensen), and
    the value is the group's mean output: the queries' outputs come closer to the full head's than with the
    ``log(n)`` slot."""
    q = torch.randn(2 * H, 5, D, generator=torch.Generator().manual_seed(9)) * 2  # two query heads per kv head
    cache, plain, keys, values = fitted_and_plain(30, 8, q, [1, 2, 28, 29])
    for layer in range(L):
        for h in range(H):
            count = held(cache, layer, h)[27][2]
            assert count >= 26 * (1 - 1e-5)
            group = q[2 * h : 2 * h + 2].flatten(0, 1)  # the kv head's 10 queries
            full = torch.stack([attend(x, keys[layer, :, h], values[layer, :, h], torch.zeros(30)) for x in group])
            errors = {}
            for name, c in (("fitted", cache), ("log(n)", plain)):
                got = torch.stack([attend(x, *held_tensors(c, layer, h)) for x in group])
                errors[name] = (got - full).norm(dim=-1).mean()
            assert errors["fitted"] < errors["log(n)"]


def add_filled_sequence(cache: PagedKVCache, n: int, seed: int) -> None:
    """One more sequence of ``n`` tokens in ``cache``: keys standard normal from ``seed``, values their negation."""
    seq = cache.add_sequence()
    data = torch.randn(L, n, H, D, generator=torch.Generator().manual_seed(seed))
    plan = cache.plan_step([seq], [n])
    for layer in range(L):
        cache.write(layer, plan, data[layer], -data[layer])


@pytest.mark.parametrize("how", ["fit", "spread"])
def test_two_sequences_folded_at_once_fold_as_each_alone(how: str) -> None:
    """A compression folds every due sequence in one call: each sequence's slots are exactly those it gets when
    folded alone, fitted to its own queries (the second has fewer, padded) or spread along its own keys. (A count
    broadcast over the wrong axis once made every fitted call with two sequences fail.)"""
    n, seeds = 24, (1, 2)
    q = torch.randn(2, 2 * H, 3, D, generator=torch.Generator().manual_seed(11)) * 2  # [S, H_q, M, D]
    valid = torch.tensor([[True, True, True], [True, True, False]])
    keep = torch.rand(L, 2, H, n, generator=torch.Generator().manual_seed(12)) < 0.3  # each head its own tokens
    keep[..., [0, 23]] = True

    def new_cache() -> PagedKVCache:
        return PagedKVCache(L, H, D, 128, block_size=BS, max_seqs=2, max_tokens_per_head=64, summaries=True)

    def fold(cache: PagedKVCache, seqs: list[int], keep: torch.Tensor, queries: list | None) -> None:
        views = [cache.view(layer, seqs) for layer in range(L)]
        args = {"queries": queries} if how == "fit" else {"spread": True}
        cache.evict(seqs, fold_evicted(cache, views, keep, 2, **args))

    both = new_cache()
    for seed in seeds:
        add_filled_sequence(both, n, seed)
    fold(both, [0, 1], keep, [(q, valid)] * L)
    for s, seed in enumerate(seeds):
        alone = new_cache()
        add_filled_sequence(alone, n, seed)
        m = int(valid[s].sum())
        fold(alone, [0], keep[:, s : s + 1], [(q[s : s + 1, :, :m], valid[s : s + 1, :m])] * L)
        for layer in range(L):
            for h in range(H):
                for got, want in zip(held_tensors(both, layer, h, s), held_tensors(alone, layer, h), strict=True):
                    torch.testing.assert_close(got, want)


def test_fitting_the_bias_only_keeps_the_mean_value() -> None:
    """``fit_value=False`` (``budget.summary_fit_value=false``): the slot takes the fitted bias, as a full fit does,
    and keeps its members' mean value, as the ``log(n)`` slot does."""
    n, kept = 24, [0, 5, 22, 23]
    q = torch.randn(H, 3, D, generator=torch.Generator().manual_seed(12)) * 2
    keep = torch.zeros(L, 1, H, n, dtype=torch.bool)
    keep[..., kept] = True
    fitted, plain, _, _ = fitted_and_plain(n, 13, q, kept)
    bias_only, _, _ = filled(n, seed=13)
    views = [bias_only.view(layer, [0]) for layer in range(L)]
    bias_only.evict([0], fold_evicted(bias_only, views, keep, 1, queries=fit_queries(q), fit_value=False))
    for layer in range(L):
        for h in range(H):
            got, full_fit, mean = (held(c, layer, h)[21] for c in (bias_only, fitted, plain))
            torch.testing.assert_close(got[0], mean[0])  # the mean key, in all three
            torch.testing.assert_close(got[1], mean[1])  # the members' mean value
            assert not torch.allclose(got[1], full_fit[1])
            assert got[2] == pytest.approx(full_fit[2], rel=1e-5) and got[2] > mean[2]  # the fitted count


def test_spread_slots_give_every_query_a_two_point_groups_exact_share_and_output() -> None:
    """``spread``: a group whose keys sit at two points symmetric about their mean, with values linear in the same
    offset, is folded into two slots that any query weighs and reads exactly as it does the members; the one
    ``log(n)`` slot does not (its Jensen gap). A group of one member keeps one slot."""
    n = 20
    gen = torch.Generator().manual_seed(14)
    keys, values = torch.randn(L, n, H, D, generator=gen), torch.randn(L, n, H, D, generator=gen)
    centre, a, v0, b = (torch.randn(L, 1, H, D, generator=gen) for _ in range(4))
    side = torch.tensor([1.0, -1.0] * 8).view(1, 16, 1, 1)  # tokens 2-17, alternating sides
    keys[:, 2:18], values[:, 2:18] = centre + 2 * side * a, v0 + side * b
    keep = torch.ones(L, 1, H, n, dtype=torch.bool)
    keep[..., 2:18] = False
    caches = []
    for spread in (True, False):
        cache = PagedKVCache(L, H, D, 128, block_size=BS, max_seqs=2, max_tokens_per_head=64, summaries=True)
        seq = cache.add_sequence()
        plan = cache.plan_step([seq], [n])
        for layer in range(L):
            cache.write(layer, plan, keys[layer], values[layer])
        views = [cache.view(layer, [0]) for layer in range(L)]
        cache.evict([0], fold_evicted(cache, views, keep, 1, spread=spread))
        caches.append(cache)
    queries = torch.randn(5, D, generator=gen) * 2
    for layer in range(L):
        for h in range(H):
            assert sorted(held(caches[0], layer, h)) == [0, 1, 16, 17, 18, 19]  # the last two members hold the pair
            assert [c for _, _, c in held(caches[0], layer, h).values()].count(8.0) == 2
            for q in queries:
                full = attend(q, keys[layer, :, h], values[layer, :, h], torch.zeros(n))
                torch.testing.assert_close(attend(q, *held_tensors(caches[0], layer, h)), full)
                assert not torch.allclose(attend(q, *held_tensors(caches[1], layer, h)), full, atol=1e-3)
    single = torch.ones(L, 1, H, n, dtype=torch.bool)
    single[..., 5] = False  # one member: one slot, its own key and value, no second slot
    cache, k1, v1 = filled(n, seed=15)
    cache.evict([0], fold_evicted(cache, [cache.view(layer, [0]) for layer in range(L)], single, 1, spread=True))
    slot = held(cache, 0, 0)[5]
    torch.testing.assert_close(slot[0], k1[0, 5, 0])
    torch.testing.assert_close(slot[1], v1[0, 5, 0])
    assert len(held(cache, 0, 0)) == n and slot[2] == pytest.approx(1.0)


def test_spread_slots_take_two_places_each_in_the_budget() -> None:
    """Through the compressor, a head at 4x holds what the allocator gave it: 10 of 40 tokens, two of them the
    spread pair (one without spread)."""
    from kvcompress.budget import Budget, BudgetError
    from kvcompress.compressor import Compressor
    from kvcompress.policies.knorm import KnormPolicy

    for spread, summaries in ((True, 2), (False, 1)):
        cache, _, _ = filled(40, seed=16)
        budget = Budget(ratio=4, protected_window=2, summary_slots=1, summary_spread=spread)
        Compressor(KnormPolicy(), budget).compress(cache, [0])
        for layer in range(L):
            for h in range(H):
                counts = [c for _, _, c in held(cache, layer, h).values()]
                assert len(counts) == 10 and sum(c > 1.5 for c in counts) == summaries
                assert sum(counts) == pytest.approx(40, rel=1e-5)  # every token counted once
    with pytest.raises(BudgetError, match=r"summary_spread=true splits .* \(got summary_slots=0, summary_fit=0\)"):
        Budget(ratio=4, summary_spread=True)
    with pytest.raises(BudgetError, match=r"summary_spread=true .* \(got summary_slots=1, summary_fit=4\)"):
        Budget(ratio=4, summary_slots=1, summary_fit=4, summary_spread=True)
    with pytest.raises(BudgetError, match=r"budget.summary_spread must be true or false, got 1"):
        Budget(ratio=4, summary_slots=1, summary_spread=1)
    # a target of 3 per head holds 2 recent + 1 slot, but not 2 recent + a spread pair
    Budget(ratio=40 / 3, protected_window=2, summary_slots=1).check(40)
    with pytest.raises(BudgetError, match=r"protected tokens \(2 recent \+ 0 sinks \+ 2 summary slots"):
        Budget(ratio=40 / 3, protected_window=2, summary_slots=1, summary_spread=True).check(40)
    cache, _, _ = filled(20, seed=17)
    views = [cache.view(layer, [0]) for layer in range(L)]
    keep = torch.ones(L, 1, H, 20, dtype=torch.bool)
    with pytest.raises(ValueError, match="spread summary slots take the log\\(n\\) bias; they cannot also be fitted"):
        fold_evicted(cache, views, keep, 1, queries=fit_queries(torch.randn(H, 2, D)), spread=True)
    with pytest.raises(ValueError, match="fit_value=False keeps the mean value .* but no queries were given"):
        fold_evicted(cache, views, keep, 1, fit_value=False)


def test_the_compressor_fits_slots_to_the_queries_it_observed() -> None:
    """``budget.summary_fit`` = m: the compressor keeps, per layer, the first m queries of a reconstruction pass
    (its repeat request) or the last m of a prompt window, follows forks and releases, and fits the slots to them;
    a policy that observed nothing is refused with what to do."""
    from kvcompress.budget import Budget
    from kvcompress.cache.step import PrefillObservation
    from kvcompress.compressor import Compressor
    from kvcompress.policies.knorm import KnormPolicy
    from kvcompress.policies.snapkv import SnapKVPolicy

    class WindowedKnorm(KnormPolicy):  # Knorm's ranks, with a window of observed queries to fit to
        window = 6

    q = torch.randn(1, H, 6, D, generator=torch.Generator().manual_seed(10))
    for every_query, kept in ((True, q[0, :, :2]), (False, q[0, :, -2:])):
        cache, _, _ = filled(40, seed=11)
        comp = Compressor(WindowedKnorm(), Budget(ratio=4, protected_window=2, summary_slots=1, summary_fit=2))
        for layer in range(L):
            comp.observe_prefill(cache, PrefillObservation(layer, 0, 6, 34, None, q, every_query=every_query))
            comp.observe_prefill(cache, PrefillObservation(layer, 0, 6, 40, None, q * 0, every_query=every_query))
        assert all(torch.equal(x, kept) for x in comp.fit_queries[0])
        comp.fork(0, 1)
        comp.release(0)
        assert 0 not in comp.fit_queries and all(torch.equal(x, kept) for x in comp.fit_queries[1])
        comp.fit_queries[0] = comp.fit_queries.pop(1)
        comp.compress(cache, [0])
        plain, _, _ = filled(40, seed=11)
        Compressor(KnormPolicy(), Budget(ratio=4, protected_window=2, summary_slots=1)).compress(plain, [0])
        for layer in range(L):
            for h in range(H):
                fitted, unfitted = held(cache, layer, h), held(plain, layer, h)
                assert fitted.keys() == unfitted.keys()  # the same tokens kept, the same slot position
                (slot,) = [p for p, (_, _, c) in unfitted.items() if c > 1]
                torch.testing.assert_close(fitted[slot][0], unfitted[slot][0])  # the mean key
                assert fitted[slot][2] > unfitted[slot][2]  # the fitted count closes the Jensen gap
    cache, _, _ = filled(40, seed=11)
    comp = Compressor(SnapKVPolicy(), Budget(ratio=4, protected_window=2, summary_slots=1, summary_fit=2))
    with pytest.raises(ValueError, match=r"summary_fit=2 .* SnapKVPolicy observed none for sequence\(s\) \[0\]"):
        comp.compress(cache, [0])  # a window policy whose sequence was never observed
    with pytest.raises(ValueError, match=r"summary_fit=2 fits .* but KnormPolicy observes none: use a policy"):
        Compressor(KnormPolicy(), Budget(ratio=4, summary_slots=1, summary_fit=2))


def test_fitting_needs_summary_slots() -> None:
    from kvcompress.budget import Budget, BudgetError

    with pytest.raises(BudgetError, match=r"budget.summary_fit=16 .* needs budget.summary_slots >= 1 \(got 0\)"):
        Budget(ratio=4, summary_fit=16)
    with pytest.raises(BudgetError, match=r"summary_fit_value=false keeps .* needs budget.summary_fit >= 1 \(got 0\)"):
        Budget(ratio=4, summary_slots=1, summary_fit_value=False)
    with pytest.raises(BudgetError, match=r"budget.summary_fit_value must be true or false, got 'no'"):
        Budget(ratio=4, summary_slots=1, summary_fit=2, summary_fit_value="no")


def test_summary_max_ratio_folds_only_for_lightly_compressed_sequences() -> None:
    """One compression of two sequences held to 8 tokens per head: the one that saw 24 tokens (3x) folds its
    evictions into a slot, the one that saw 64 (8x, past ``summary_max_ratio=4``) drops them, keeping what a
    budget without summary slots keeps."""
    from kvcompress.budget import Budget
    from kvcompress.compressor import Compressor
    from kvcompress.policies.knorm import KnormPolicy

    def two_sequences() -> PagedKVCache:
        cache = PagedKVCache(L, H, D, 256, block_size=BS, max_seqs=2, max_tokens_per_head=64, summaries=True)
        seqs = [cache.add_sequence(), cache.add_sequence()]
        gen = torch.Generator().manual_seed(6)
        plan = cache.plan_step(seqs, [24, 64])
        for layer in range(L):
            cache.write(layer, plan, torch.randn(88, H, D, generator=gen), torch.randn(88, H, D, generator=gen))
        return cache

    def counts_by_position(cache: PagedKVCache, seq: int) -> list[dict[int, float]]:
        """Per (layer, head) of ``seq``: ``{position: tokens it stands for}``."""
        return [{p: c for p, (_, _, c) in held(cache, layer, h, seq).items()} for layer in range(L) for h in range(H)]

    budget = Budget(max_cache_tokens=8, protected_window=2, summary_slots=1, summary_max_ratio=4)
    assert budget.folds(24) and not budget.folds(64) and budget.folds(32)  # 4x is still light
    cache = two_sequences()
    Compressor(KnormPolicy(), budget).compress(cache, [0, 1])
    plain = two_sequences()
    Compressor(KnormPolicy(), budget.without_summaries()).compress(plain, [1])
    for counts in counts_by_position(cache, 0):
        assert len(counts) == 8 and sum(c > 1 for c in counts.values()) == 1
        assert sum(counts.values()) == pytest.approx(24)
    assert counts_by_position(cache, 1) == counts_by_position(plain, 1)
    assert all(list(c.values()) == [1.0] * 8 for c in counts_by_position(cache, 1))


def test_summary_max_ratio_is_a_ratio_over_summary_slots() -> None:
    from kvcompress.budget import Budget, BudgetError

    with pytest.raises(BudgetError, match=r"summary_max_ratio must be null .* or a ratio >= 1, got 0.5"):
        Budget(ratio=4, summary_slots=1, summary_max_ratio=0.5)
    with pytest.raises(BudgetError, match=r"summary_max_ratio=4 .* needs budget.summary_slots >= 1 \(got 0\)"):
        Budget(ratio=4, summary_max_ratio=4)
    assert Budget(ratio=4, summary_slots=1, summary_max_ratio=4).folds(4000)
    assert not Budget(ratio=8, summary_slots=1, summary_max_ratio=4).folds(4000)


def test_summary_layers_fold_in_the_first_layers_only() -> None:
    """``summary_layers=1`` of two layers: layer 0 folds what it evicts into a slot, layer 1 drops it and keeps
    exactly what a budget without summary slots keeps there (the same tokens, each standing for itself)."""
    from kvcompress.budget import Budget
    from kvcompress.compressor import Compressor
    from kvcompress.policies.knorm import KnormPolicy

    budget = Budget(ratio=4, protected_window=2, summary_slots=1, summary_layers=1)
    cache, _, _ = filled(40, seed=7)
    Compressor(KnormPolicy(), budget).compress(cache, [0])
    plain, _, _ = filled(40, seed=7)
    Compressor(KnormPolicy(), budget.without_summaries()).compress(plain, [0])
    for h in range(H):
        counts = [c for _, _, c in held(cache, 0, h).values()]
        assert len(counts) == 10 and sum(c > 1 for c in counts) == 1
        assert sum(counts) == pytest.approx(40)
        top = {p: c for p, (_, _, c) in held(cache, 1, h).items()}
        assert top == {p: c for p, (_, _, c) in held(plain, 1, h).items()}
        assert list(top.values()) == [1.0] * 10


def test_summary_layers_is_a_layer_count_over_summary_slots() -> None:
    from kvcompress.budget import Budget, BudgetError

    with pytest.raises(BudgetError, match=r"summary_layers must be null .* or a number of layers >= 1 .*, got 0"):
        Budget(ratio=4, summary_slots=1, summary_layers=0)
    with pytest.raises(BudgetError, match=r"summary_layers=7 .* needs budget.summary_slots >= 1 \(got 0\)"):
        Budget(ratio=4, summary_layers=7)
    assert Budget(ratio=4, summary_slots=1, summary_layers=7).without_summaries().summary_layers is None


def test_summary_offset_adds_each_heads_measured_offset_to_its_slots_bias(tmp_path) -> None:
    """``budget.summary_offset``: through the compressor, every summary slot's bias is ``log(n)`` plus its (layer,
    kv head)'s offset from the file; the tokens kept as themselves keep bias 0."""
    import json

    from kvcompress.budget import Budget
    from kvcompress.compressor import Compressor
    from kvcompress.policies.knorm import KnormPolicy

    offset = [[0.5, 1.0, 2.0], [3.0, 0.0, -1.0]]
    path = tmp_path / "gap.json"
    path.write_text(json.dumps({"gap": offset}))
    for file, shift in ((None, [[0.0] * H] * L), (str(path), offset)):
        cache, _, _ = filled(40, seed=18)
        budget = Budget(ratio=4, protected_window=2, summary_slots=1, summary_offset=file)
        Compressor(KnormPolicy(), budget).compress(cache, [0])
        for layer in range(L):
            v = cache.view(layer, [0], with_kv=False)
            for h in range(H):
                bias = cache.slot_bias.view(-1)[v.slots[0, h][v.valid[0, h]]]
                assert len(bias) == 10 and int((bias != 0).sum()) == 1
                assert float(bias[bias != 0][0]) == pytest.approx(math.log(31) + shift[layer][h])


def test_summary_offset_is_a_file_for_this_model_folded_once(tmp_path) -> None:
    import json

    from kvcompress.budget import Budget, BudgetError

    with pytest.raises(BudgetError, match=r"scripts/slot_share.py --save-gap writes; no such file: '/no/gap.json'"):
        Budget(ratio=4, summary_slots=1, summary_offset="/no/gap.json")
    path = tmp_path / "gap.json"
    path.write_text(json.dumps({"gap": [[0.5, 1.0, 2.0]]}))
    for args, got in (
        ({"summary_slots": 0}, "summary_slots=0, summary_fit=0, summary_spread=false, compress_every=0"),
        ({"summary_slots": 2}, "summary_slots=2, summary_fit=0, .*"),
        ({"summary_slots": 1, "compress_every": 8}, "summary_slots=1, .* compress_every=8"),
    ):
        with pytest.raises(BudgetError, match=rf"summary_offset adds .* \(got {got}\)"):
            Budget(ratio=4, summary_offset=str(path), **args)
    budget = Budget(ratio=4, summary_slots=1, summary_offset=str(path))
    assert budget.offsets(1, 3) == [[0.5, 1.0, 2.0]]
    with pytest.raises(BudgetError, match=r"holds offsets for 1 layers x 3 kv heads, but the model has 2 x 3"):
        budget.offsets(2, 3)
    for text in ("{}", '{"gap": [[1.0], [1.0, 2.0]]}', '{"gap": [["1.5"]]}', '{"gap": [[NaN]]}', '{"gap": [[true]]}'):
        path.write_text(text)
        with pytest.raises(BudgetError, match=r"is not a scripts/slot_share.py --save-gap file \(JSON with 'gap'"):
            Budget(ratio=4, summary_slots=1, summary_offset=str(path))


def test_a_sequence_folds_with_its_offset_once(tmp_path) -> None:
    """A slot with an offset no longer counts its tokens, so a second compression of the sequence (here a harder
    budget, as under pool pressure) drops what it evicts: no slot folds the first one in again, no offset doubles."""
    import json

    from kvcompress.budget import Budget
    from kvcompress.compressor import Compressor
    from kvcompress.policies.knorm import KnormPolicy

    offset = [[0.5, 1.0, 2.0], [3.0, 0.0, -1.0]]
    path = tmp_path / "gap.json"
    path.write_text(json.dumps({"gap": offset}))
    cache, _, _ = filled(40, seed=19)
    comp = Compressor(KnormPolicy(), Budget(ratio=4, protected_window=2, summary_slots=1, summary_offset=str(path)))
    comp.compress(cache, [0])
    assert comp.folded_once == {0}
    comp.compress(cache, [0], Budget(ratio=8, protected_window=2, summary_slots=1, summary_offset=str(path)))
    for layer in range(L):
        v = cache.view(layer, [0], with_kv=False)
        for h in range(H):
            bias = cache.slot_bias.view(-1)[v.slots[0, h][v.valid[0, h]]]
            assert len(bias) == 5
            assert all(b == 0 or b == pytest.approx(math.log(31) + offset[layer][h]) for b in bias.tolist())
    child = cache.fork(0)
    comp.fork(0, child)
    assert child in comp.folded_once
    comp.release(child)
    assert comp.folded_once == {0}


def test_an_offset_file_for_another_model_is_refused_when_the_request_is_queued(tmp_path, tiny_llama) -> None:
    import json

    from kvcompress.budget import Budget, BudgetError
    from kvcompress.compressor import Compressor
    from kvcompress.engine import Engine
    from kvcompress.generate import as_request
    from kvcompress.policies.knorm import KnormPolicy

    path = tmp_path / "gap.json"
    path.write_text(json.dumps({"gap": [[0.5, 1.0, 2.0]]}))  # 1 layer x 3 kv heads; the model has 2 x 2
    budget = Budget(ratio=4, protected_window=2, summary_slots=1, summary_offset=str(path))
    engine = Engine(tiny_llama, Compressor(KnormPolicy(), budget), max_tokens_per_head=64)
    with pytest.raises(BudgetError, match=r"holds offsets for 1 layers x 3 kv heads, but the model has 2 x 2"):
        engine.add_request(as_request("r", list(range(3, 40)), [5], "query_agnostic", 2))
    path.write_text(json.dumps({"gap": [[0.5, 1.0], [0.0, -1.0]]}))  # the same file, now for this model: it runs
    out = Engine(tiny_llama, Compressor(KnormPolicy(), budget), max_tokens_per_head=64).run(
        [as_request("r", list(range(3, 40)), [5], "query_agnostic", 2)]
    )
    assert len(out[0].tokens) == 2
