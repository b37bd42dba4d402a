"""Paged cache operations: block boundaries, short heads, freeing, exhaustion, and a property test against a
dense reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress.cache.paged import HIDDEN, PagedKVCache, PoolExhaustedError

L, H, D, BS = 2, 3, 4, 4


def make(num_blocks: int = 64, max_seqs: int = 2) -> PagedKVCache:
    return PagedKVCache(L, H, D, num_blocks, block_size=BS, max_seqs=max_seqs, max_tokens_per_head=64)


def append(cache: PagedKVCache, seq: int, n: int, start: int = 0) -> torch.Tensor:
    """Append n tokens to every layer; K[t, h, :] = position*10 + h, so contents identify the token."""
    plan = cache.plan_step([seq], [n])
    assert plan.positions.tolist() == list(range(start, start + n))
    pos = torch.arange(start, start + n)
    k = (pos[:, None, None] * 10 + torch.arange(H)[None, :, None]).float().expand(n, H, D).contiguous()
    for layer in range(L):
        cache.write(layer, plan, k + layer * 1000, -k)
    return k


def evict_layer(cache: PagedKVCache, layer: int, seq: int, keep: torch.Tensor) -> int:
    """Evict in one layer only (``keep`` ``[1, H, N]``): every other layer keeps everything."""
    full = torch.ones(L, *keep.shape[:-1], max(keep.shape[-1], int(cache.lengths[:, seq].max())), dtype=torch.bool)
    full[layer] = False
    full[layer, ..., : keep.shape[-1]] = keep
    return cache.evict([seq], full)


def positions(cache: PagedKVCache, layer: int, seq: int, head: int) -> list[int]:
    v = cache.view(layer, [seq])
    return sorted(v.positions[0, head][v.valid[0, head]].tolist())


@pytest.mark.parametrize("n", [1, BS - 1, BS, BS + 1, 3 * BS])
def test_append_across_block_boundaries(n: int) -> None:
    cache = make()
    s = cache.add_sequence()
    append(cache, s, n)
    assert cache.num_used_blocks == L * H * -(-n // BS)
    v = cache.view(1, [s])
    assert v.valid.sum() == H * n
    # K was written where the block table says: key value encodes (layer, position, head)
    expect = 1000 + v.positions * 10 + torch.arange(H)[None, :, None]
    assert torch.equal(v.keys[..., 0][v.valid], expect[v.valid].float())
    assert torch.equal(v.values[..., 0][v.valid], -(expect[v.valid].float() - 1000))


def test_evict_compacts_and_frees_blocks() -> None:
    cache = make()
    s = cache.add_sequence()
    append(cache, s, 10)  # 3 blocks per head
    keep = torch.zeros(1, H, 10, dtype=torch.bool)
    keep[0, 0, [1, 8, 9]] = True  # head 0 keeps 3 tokens -> 1 block
    keep[0, 1] = True  # head 1 keeps all
    keep[0, 2, 0] = True  # head 2 keeps 1 token
    before = cache.num_free_blocks
    freed = evict_layer(cache, 0, s, keep)
    assert freed == 2 + 0 + 2
    assert cache.num_free_blocks == before + 4
    assert cache.lengths[0, s].tolist() == [3, 10, 1]
    assert positions(cache, 0, s, 0) == [1, 8, 9]
    assert positions(cache, 0, s, 2) == [0]
    v = cache.view(0, [s])
    assert torch.equal(v.keys[0, 0, :3, 0].sort().values, torch.tensor([10.0, 80.0, 90.0]))
    assert positions(cache, 1, s, 0) == list(range(10))  # other layer untouched


def test_head_at_length_zero_and_one() -> None:
    cache = make()
    s = cache.add_sequence()
    append(cache, s, 5)
    keep = torch.zeros(1, H, 5, dtype=torch.bool)
    keep[0, 1, 4] = True
    evict_layer(cache, 0, s, keep)
    assert cache.lengths[0, s].tolist() == [0, 1, 0]
    assert cache.num_blocks_held[0, s].tolist() == [0, 1, 0]
    append(cache, s, 1, start=5)  # a length-0 head gets a fresh block
    assert cache.lengths[0, s].tolist() == [1, 2, 1]
    assert positions(cache, 0, s, 1) == [4, 5]


def test_exhaustion_raises_before_writing() -> None:
    cache = make(num_blocks=L * H * 2)
    s = cache.add_sequence()
    append(cache, s, 2 * BS)
    snapshot = (cache.block_tables.copy(), cache.lengths.copy(), cache.seen.copy(), cache.num_free_blocks)
    with pytest.raises(PoolExhaustedError, match="needs 6 more blocks but only 0"):
        cache.plan_step([s], [1])
    assert (cache.block_tables == snapshot[0]).all() and (cache.lengths == snapshot[1]).all()
    assert (cache.seen == snapshot[2]).all()
    assert cache.num_free_blocks == snapshot[3]


def test_release_and_fork_account_blocks() -> None:
    cache = make(max_seqs=3)
    a = cache.add_sequence()
    append(cache, a, 7)
    b = cache.fork(a)
    assert cache.num_used_blocks == 2 * L * H * 2
    assert positions(cache, 1, b, 2) == list(range(7))
    assert torch.equal(cache.view(1, [b]).keys, cache.view(1, [a]).keys)
    cache.release(a)
    assert cache.num_used_blocks == L * H * 2
    assert positions(cache, 1, b, 2) == list(range(7))


def test_memory_accounting_after_halving() -> None:
    cache = make()
    s = cache.add_sequence()
    append(cache, s, 32)
    m0 = cache.memory([s])
    assert m0.logical_compression == 1.0
    keep = torch.zeros(1, H, 32, dtype=torch.bool)
    keep[..., ::2] = True
    cache.evict([s], keep.expand(L, -1, -1, -1))
    m = cache.memory([s])
    assert m.tokens_kept == L * H * 16 and m.logical_compression == 2.0
    assert m.allocated_bytes * 2 == m0.allocated_bytes
    assert m.dense_bytes == L * H * 32 * 2 * D * 4
    assert 1.0 < m.physical_compression < 2.0  # metadata overhead shows up


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 9), st.integers(0, 2**16)), min_size=1, max_size=12))
def test_random_append_evict_matches_dense_reference(ops) -> None:
    """Random appends and evictions on two sequences against a dict-of-lists reference per (layer, seq, head)."""
    cache = make(num_blocks=400)
    seqs = [cache.add_sequence(), cache.add_sequence()]
    ref = {(layer, s, h): [] for layer in range(L) for s in seqs for h in range(H)}
    seen = dict.fromkeys(seqs, 0)
    gen = torch.Generator().manual_seed(0)
    for is_evict, n, salt in ops:
        s = seqs[salt % 2]
        if not is_evict:
            append(cache, s, n, start=seen[s])
            for layer in range(L):
                for h in range(H):
                    ref[layer, s, h] += list(range(seen[s], seen[s] + n))
            seen[s] += n
        else:
            layer = salt % L
            width = max(int(cache.lengths[layer, s].max()), 1)
            keep = torch.rand(1, H, width, generator=gen) < 0.5
            held = cache.view(layer, [s])
            for h in range(H):
                kept = held.positions[0, h][keep[0, h, : held.valid.shape[-1]] & held.valid[0, h]].tolist()
                ref[layer, s, h] = sorted(kept)
            evict_layer(cache, layer, s, keep)
    for (layer, s, h), want in ref.items():
        assert positions(cache, layer, s, h) == want
        v = cache.view(layer, [s])
        got_k = v.keys[0, h, :, 0][v.valid[0, h]]
        assert torch.equal(got_k, (v.positions[0, h][v.valid[0, h]] * 10 + h + layer * 1000).float())
    used = int(cache.num_blocks_held.sum())
    assert used == cache.num_used_blocks
    assert (cache.num_blocks_held == (cache.lengths + BS - 1) // BS).all()


def test_truncate_drops_the_last_tokens_and_their_blocks() -> None:
    """KVzip's reconstruction is truncated off: lengths, seen and blocks are back to the prompt, contents intact,
    even after a compaction reordered the prompt's slots."""
    cache = make()
    cache.add_sequence()
    append(cache, 0, 9)
    evict_layer(cache, 0, 0, torch.tensor([[[True, False] * 4 + [True]] * H]))  # 5 of 9 kept in layer 0
    before = (cache.lengths.copy(), int(cache.num_blocks_held.sum()), [positions(cache, 1, 0, h) for h in range(H)])
    append(cache, 0, 7, start=9)
    assert cache.truncate(0, 7) > 0
    assert (cache.lengths == before[0]).all() and int(cache.seen[0]) == 9
    assert int(cache.num_blocks_held.sum()) == before[1] == cache.num_used_blocks
    assert [positions(cache, 1, 0, h) for h in range(H)] == before[2]
    append(cache, 0, 2, start=9)  # the next token continues at the prompt's end
    with pytest.raises(ValueError, match="cannot truncate"):
        cache.truncate(0, 8)


def test_rewound_hides_the_later_prompt_and_restores_it() -> None:
    """Inside ``rewound(seq, 5)`` the next token is at position 5 and the prompt's slots at positions 5..8 read as
    HIDDEN + position (out of every query's causal reach); on exit the tokens written inside are gone and
    positions, lengths, seen and blocks are as before, even after a compaction reordered the prompt's slots."""
    cache = make()
    cache.add_sequence()
    append(cache, 0, 9)
    evict_layer(cache, 0, 0, torch.tensor([[[True, False] * 4 + [True]] * H]))  # layer 0 keeps 0, 2, 4, 6, 8
    before = (cache.lengths.copy(), int(cache.num_blocks_held.sum()), [positions(cache, 0, 0, h) for h in range(H)])
    with cache.rewound(0, 5):
        assert positions(cache, 0, 0, 0) == [0, 2, 4, HIDDEN + 6, HIDDEN + 8]
        assert positions(cache, 1, 0, 2) == [0, 1, 2, 3, 4, *(HIDDEN + p for p in range(5, 9))]
        append(cache, 0, 6, start=5)
        assert positions(cache, 1, 0, 0) == [*range(11), *(HIDDEN + p for p in range(5, 9))]
    assert (cache.lengths == before[0]).all() and int(cache.seen[0]) == 9
    assert int(cache.num_blocks_held.sum()) == before[1] == cache.num_used_blocks
    assert [positions(cache, 0, 0, h) for h in range(H)] == before[2]
    assert positions(cache, 1, 0, 1) == list(range(9))
    with cache.rewound(0, 9):  # the whole prompt visible: nothing hidden
        assert positions(cache, 1, 0, 1) == list(range(9))
    with pytest.raises(ValueError, match="cannot rewind sequence 0 to 10 tokens: it has seen 9"):
        with cache.rewound(0, 10):
            pass


def _scores_by_position(cache: PagedKVCache, layer: int, seq: int) -> dict[tuple[int, int], float]:
    v = cache.view(layer, [seq], with_kv=False)
    return {
        (h, int(p)): float(s)
        for h in range(H)
        for p, s, ok in zip(v.positions[0, h], v.scores[0, h], v.valid[0, h], strict=True)
        if ok
    }


@pytest.mark.parametrize("seed", range(4))
def test_rewound_keeps_scores_written_within_only_inside_scored(seed: int) -> None:
    """``rewound(seq, visible, scored=(a, b))``: scores written inside survive at positions in ``[a, b)`` only;
    every other slot (visible or hidden) gets its old score back, per head, also in a layer where each head kept
    a different subset of the prompt (a padded view); another sequence and the scratch slot are left alone."""
    g = torch.Generator().manual_seed(seed)
    cache = make()
    other, seq, n = cache.add_sequence(), cache.add_sequence(), 13
    append(cache, other, 5)
    append(cache, seq, n)
    keep = torch.rand(1, H, n, generator=g) > 0.4
    keep[0, 0] = True  # head 0 keeps every position, the others fewer: padding in layer 1's view
    evict_layer(cache, 1, seq, keep)
    for layer in range(L):
        v = cache.view(layer, [seq], with_kv=False)
        cache.set_scores(v, v.positions.float() + 100 * layer + 1000 * torch.arange(H)[None, :, None])
        o = cache.view(layer, [other], with_kv=False)
        cache.set_scores(o, torch.full_like(o.scores, 7.0))
    cache.slot_score.view(-1)[cache.scratch_slot] = 12345.0
    old = [_scores_by_position(cache, layer, seq) for layer in range(L)]
    old_other = [_scores_by_position(cache, layer, other) for layer in range(L)]
    visible = int(torch.randint(0, n + 1, (1,), generator=g))
    a = int(torch.randint(0, n, (1,), generator=g))
    b = int(torch.randint(a, n + 3, (1,), generator=g))
    with cache.rewound(seq, visible, scored=(a, b)):
        append(cache, seq, 5, start=visible)
        for layer in range(L):
            v = cache.view(layer, [seq], with_kv=False)
            cache.set_scores(v, torch.full_like(v.scores, -1.0))
    for layer in range(L):
        want = {hp: (-1.0 if a <= hp[1] < b else s) for hp, s in old[layer].items()}
        assert _scores_by_position(cache, layer, seq) == want
        assert _scores_by_position(cache, layer, other) == old_other[layer]
    assert len(old[1]) < H * n  # the padded layer was exercised
    with pytest.raises(ValueError, match=r"needs 0 <= a <= b, got \(4, 2\)"):
        with cache.rewound(seq, n, scored=(4, 2)):
            pass


def test_heads_grow_in_place_into_the_room_their_sequence_expects() -> None:
    """A sequence added with ``expected_tokens`` gets each head's blocks in one run with room behind it, so decode
    steps past block boundaries keep every head contiguous (a strided ``layout`` for every layer), even while
    another sequence takes blocks in between; without room the heads interleave and no layout is found."""
    cache = make(num_blocks=128, max_seqs=3)
    a = cache.add_sequence(expected_tokens=5 * BS)
    append(cache, a, BS + 2)  # 2 blocks per head, room for 3 more
    b = cache.add_sequence()  # no room of its own: it must not take a's
    append(cache, b, 2 * BS)
    for t in range(BS + 2, 5 * BS):
        plan = cache.plan_step([a], [1])
        for layer in range(L):
            cache.write(layer, plan, torch.zeros(1, H, D), torch.zeros(1, H, D))
        assert all(lay is not None for lay in plan.layout), f"step at length {t} lost contiguity"
        first, _, head_stride = plan.layout[0]
        for h in range(H):
            row = cache.block_tables[0, a, h, : cache.num_blocks_held[0, a, h]]
            assert row.tolist() == list(range(row[0], row[0] + row.size))
            assert row[0] * BS == first + h * head_stride
    assert positions(cache, 1, a, 2) == list(range(5 * BS))
    append(cache, a, BS, start=5 * BS)  # past the room: blocks come from elsewhere, the cache stays right
    assert positions(cache, 0, a, 0) == list(range(6 * BS))
    # b was added without room: its heads' runs are back to back, so its second block is not its first + 1
    tight = cache.add_sequence()
    append(cache, tight, 1)
    append(cache, tight, BS, start=1)
    assert cache.plan_step([tight], [1]).layout == [None] * L


def test_room_kept_for_a_head_is_still_free_and_goes_to_others_last() -> None:
    cache = make(num_blocks=2 * L * H)
    a = cache.add_sequence(expected_tokens=2 * BS)
    append(cache, a, 1)  # 1 block per head, 1 kept behind each
    assert cache.num_free_blocks == L * H
    b = cache.add_sequence()
    append(cache, b, BS)  # takes every free block, kept ones included
    assert cache.num_free_blocks == 0
    cache.release(b)
    cache.release(a)
    assert cache.num_free_blocks == 2 * L * H and (cache._kept_for < 0).all()
