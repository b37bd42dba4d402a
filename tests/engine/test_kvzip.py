"""KVzip on the engine: reconstruction scores equal a dense eager reference, the reconstruction tokens leave the
cache, both evaluation modes and shared prefixes run end to end, and the extra prefill is timed."""

from __future__ import annotations

import random

import pytest
import torch

from kvcompress.budget import Budget
from kvcompress.cache.paged import HeadView
from kvcompress.compressor import Compressor
from kvcompress.engine import Engine, Request
from kvcompress.generate import as_request
from kvcompress.policies.kvzip import KVzipPolicy
from kvcompress.policies.lfu import LFUPolicy
from kvcompress.policies.snapkv import SnapKVPolicy

REPEAT = [5, 9, 17, 33, 2]  # stands in for the tokenized "Repeat the previous context exactly." prompt
CONTEXT = [random.Random(0).randrange(3, 128) for _ in range(45)]
QUESTIONS = [[random.Random(q).randrange(3, 128) for _ in range(6)] for q in range(1, 3)]


def _kvzip(ratio: float = 2, allocation: str = "uniform") -> Compressor:
    return Compressor(KVzipPolicy(repeat_ids=REPEAT), Budget(ratio=ratio, protected_window=4, allocation=allocation))


def _eager_attentions(model, ids: list[int]) -> tuple[torch.Tensor, ...]:
    """L x ``[1, H_q, T, T]``: the model's eager softmax attention over ``ids`` (its attention implementation is
    restored afterwards)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(torch.tensor([ids]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)


def _dense_scores(
    model, context: list[int], exclude: tuple[int, int] = (0, 0), window: int = 0, window_weight: float = 1.0
) -> torch.Tensor:
    """``[L, H_kv, n]``: max over the reconstruction queries and the GQA group's query heads of the eager softmax
    attention of ``context + REPEAT + context`` to each context token. With ``exclude = (lo, hi)`` each query's
    attention is renormalised over the keys outside positions ``[lo, hi)``, which score 0 (kvpress's KVzip).
    ``window``: the context's own last ``window`` queries are in the maximum too (they come right before the
    reconstruction's, so the rows are one slice), their attention times ``window_weight``."""
    n, cfg = len(context), model.config
    attentions = _eager_attentions(model, [*context, *REPEAT, *context])
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    lo, hi = exclude
    rows = [a[0, :, n - window :] for a in attentions]  # L x [H_q, T - n + window, T]: window + reconstruction
    rows = [r / (1 - r[..., lo:hi].sum(-1, keepdim=True)) for r in rows]
    for r in rows:
        r[..., lo:hi] = 0
        r[:, :window] *= window_weight
    per_head = torch.stack([r[..., :n].amax(1) for r in rows])  # [L, H_q, n]
    return per_head.view(len(attentions), cfg.num_key_value_heads, group, n).amax(2)


def _capture_before_compression(engine: Engine) -> list[dict]:
    """Record slot scores (by position) and cache sizes each time the compressor is asked to compress."""
    seen: list[dict] = []
    compress = engine.compressor.compress

    def capture(cache, seq_ids, budget=None):
        (sid,) = seq_ids
        scores = []
        for layer in range(cache.num_layers):
            v = cache.view(layer, [sid], with_kv=False)
            order = v.positions[0].argsort(-1)
            scores.append(v.scores[0].gather(-1, order))
        seen.append(
            {
                "scores": torch.stack(scores),
                "lengths": cache.lengths[:, sid].copy(),
                "seen": int(cache.seen[sid]),
                "blocks": int(cache.num_blocks_held[:, sid].sum()),
                "positions": sorted(cache.view(0, [sid], with_kv=False).positions[0, 0].tolist()),
            }
        )
        return compress(cache, seq_ids, budget)

    engine.compressor.compress = capture
    return seen


@pytest.mark.parametrize("chunk", [16, 2048], ids=["chunked", "one-chunk"])
def test_scores_equal_dense_reference_and_reconstruction_is_released(tiny_llama, chunk):
    engine = Engine(tiny_llama, _kvzip(), max_seqs=2, max_tokens_per_head=256, prefill_chunk=chunk)
    seen = _capture_before_compression(engine)
    (out,) = engine.run([Request(0, CONTEXT, 4)])
    (got,) = seen
    torch.testing.assert_close(got["scores"], _dense_scores(tiny_llama, CONTEXT), atol=1e-5, rtol=1e-4)
    n = len(CONTEXT)
    assert (got["lengths"] == n).all() and got["seen"] == n  # the reconstruction tokens are gone
    assert got["blocks"] == engine._blocks_for(n)
    assert engine.stats.reconstruct_tokens == len(REPEAT) + n
    assert out.reconstruct_s > 0 and engine.stats.prefill_tokens == n  # timed apart from the prefill
    assert 1.8 < out.memory.logical_compression < 2.3
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


@pytest.mark.parametrize("chunk", [16, 2048], ids=["chunked", "one-chunk"])
def test_prefix_renorm_scores_equal_the_renormalised_dense_reference(tiny_llama, chunk):
    """``prefix_renorm`` with an 8-token prefix and 2 sinks: positions 2..7 leave every reconstruction query's
    softmax (score 0), the others score their attention renormalised without them, above the plain scores."""
    policy = KVzipPolicy(repeat_ids=REPEAT, prefix_ids=CONTEXT[:8], prefix_keep=2, prefix_renorm=True)
    assert policy.window_exclude == (2, 8)
    comp = Compressor(policy, Budget(ratio=2, protected_window=4))
    engine = Engine(tiny_llama, comp, max_seqs=1, max_tokens_per_head=256, prefill_chunk=chunk)
    seen = _capture_before_compression(engine)
    engine.run([Request(0, CONTEXT, 4)])
    got = seen[0]["scores"]
    torch.testing.assert_close(got, _dense_scores(tiny_llama, CONTEXT, (2, 8)), atol=1e-5, rtol=1e-4)
    plain = _dense_scores(tiny_llama, CONTEXT)
    assert (got[..., 2:8] == 0).all() and (plain[..., 2:8] > 0).all()
    assert (got[..., 8:] >= plain[..., 8:] - 1e-6).all() and (got[..., 8:] > plain[..., 8:] + 1e-4).any()


@pytest.mark.parametrize("weight", [1.0, 4.0])
@pytest.mark.parametrize("chunk", [16, 2048], ids=["chunked", "one-chunk"])
def test_window_folds_the_prompts_last_queries_into_the_maximum(tiny_llama, chunk, weight):
    """``window=6``: the context's last 6 queries vote beside the reconstruction's, in the same maximum, and raise
    some scores above the reconstruction's alone; ``window_weight`` scales their attention (only theirs: the
    reconstruction's chunks are observed in full, ``every_query``) before the maximum."""
    policy = KVzipPolicy(repeat_ids=REPEAT, window=6, window_weight=weight)
    engine = Engine(
        tiny_llama,
        Compressor(policy, Budget(ratio=2, protected_window=4)),
        max_seqs=1,
        max_tokens_per_head=256,
        prefill_chunk=chunk,
    )
    seen = _capture_before_compression(engine)
    engine.run([Request(0, CONTEXT, 4)])
    got, plain = seen[0]["scores"], _dense_scores(tiny_llama, CONTEXT)
    want = _dense_scores(tiny_llama, CONTEXT, window=6, window_weight=weight)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got >= plain - 1e-6).all() and (got > plain + 1e-4).any()
    if weight != 1:
        unweighted = _dense_scores(tiny_llama, CONTEXT, window=6)
        assert (got > unweighted + 1e-4).any()


def _local_dense_scores(model, context: list[int], size: int, lookahead: int = 0) -> torch.Tensor:
    """``[L, H_kv, n]``: reconstruction chunk by chunk, each pass run densely on its own: ``context[:v] + REPEAT +
    context[a:b]`` for each chunk ``[a, b)`` of ``size`` tokens, ``v = min(b + lookahead, n)``; a context token
    scores the max over every pass that sees it of its reconstruction queries' attention (as
    :func:`_dense_scores`, per pass), counting a pass only up to its chunk's end ``b`` when ``lookahead`` > 0."""
    n, cfg = len(context), model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    best = torch.zeros(cfg.num_hidden_layers, cfg.num_key_value_heads, n)
    for a in range(0, n, size):
        b = min(a + size, n)
        v = min(b + lookahead, n)
        attentions = _eager_attentions(model, [*context[:v], *REPEAT, *context[a:b]])
        per_head = torch.stack([x[0, :, v:, :v].amax(1) for x in attentions])  # [L, H_q, v]
        seen = per_head.view(len(attentions), cfg.num_key_value_heads, group, v).amax(2)
        upto = b if lookahead else v
        best[..., :upto] = best[..., :upto].maximum(seen[..., :upto])
    return best


@pytest.mark.parametrize("chunk", [16, 2048], ids=["chunked", "one-chunk"])
def test_local_chunk_passes_see_the_context_up_to_their_chunk(tiny_llama, chunk):
    """``local_chunk=16`` on 45 tokens: three passes, each seeing the context only up to its chunk's end, give
    the scores of the three dense runs; they differ from one pass over the whole context, and the cache is back
    to the prompt (positions included) afterwards."""
    comp = Compressor(KVzipPolicy(repeat_ids=REPEAT, local_chunk=16), Budget(ratio=2, protected_window=4))
    engine = Engine(tiny_llama, comp, max_seqs=1, max_tokens_per_head=256, prefill_chunk=chunk)
    seen = _capture_before_compression(engine)
    engine.run([Request(0, CONTEXT, 4)])
    (got,) = seen
    n = len(CONTEXT)
    torch.testing.assert_close(got["scores"], _local_dense_scores(tiny_llama, CONTEXT, 16), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got["scores"], _dense_scores(tiny_llama, CONTEXT), atol=1e-3)
    assert (got["lengths"] == n).all() and got["seen"] == n and got["positions"] == list(range(n))
    assert engine.stats.reconstruct_tokens == 3 * len(REPEAT) + n
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


@pytest.mark.parametrize("chunk", [16, 2048], ids=["chunked", "one-chunk"])
def test_local_lookahead_passes_see_past_their_chunk_and_score_up_to_its_end(tiny_llama, chunk):
    """``local_chunk=16, local_lookahead=6`` on 45 tokens: passes see up to 22 / 38 / 45 tokens and score up to
    16 / 32 / 45, as the dense runs; the scores differ from passes without the lookahead."""
    policy = KVzipPolicy(repeat_ids=REPEAT, local_chunk=16, local_lookahead=6)
    engine = Engine(tiny_llama, Compressor(policy, Budget(ratio=2, protected_window=4)), max_seqs=1,
                    max_tokens_per_head=256, prefill_chunk=chunk)  # fmt: skip
    seen = _capture_before_compression(engine)
    engine.run([Request(0, CONTEXT, 4)])
    (got,) = seen
    want = _local_dense_scores(tiny_llama, CONTEXT, 16, lookahead=6)
    torch.testing.assert_close(got["scores"], want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(want, _local_dense_scores(tiny_llama, CONTEXT, 16), atol=1e-3)
    assert got["positions"] == list(range(len(CONTEXT))) and engine.cache.num_free_blocks == engine.cache.num_blocks


def test_local_chunk_splits_the_context_into_passes():
    big = KVzipPolicy(repeat_ids=REPEAT, local_chunk=len(CONTEXT))
    assert big.reconstruction(CONTEXT) == KVzipPolicy(repeat_ids=REPEAT).reconstruction(CONTEXT)
    passes = KVzipPolicy(repeat_ids=REPEAT, local_chunk=18).reconstruction(CONTEXT)
    assert [(p.visible, p.tokens) for p in passes] == [
        (18, [*REPEAT, *CONTEXT[:18]]),
        (36, [*REPEAT, *CONTEXT[18:36]]),
        (45, [*REPEAT, *CONTEXT[36:]]),
    ]
    # a last chunk under half the size (5 of 20 tokens) joins the one before; so does 2 of 43 (one pass)
    assert [p.visible for p in KVzipPolicy(repeat_ids=REPEAT, local_chunk=20).reconstruction(CONTEXT)] == [20, 45]
    assert [p.visible for p in KVzipPolicy(repeat_ids=REPEAT, local_chunk=43).reconstruction(CONTEXT)] == [45]
    assert all(p.scored is None for p in passes)
    ahead = KVzipPolicy(repeat_ids=REPEAT, local_chunk=18, local_lookahead=10).reconstruction(CONTEXT)
    assert [(p.visible, p.scored, p.tokens[len(REPEAT) :]) for p in ahead] == [
        (28, (0, 18), CONTEXT[:18]),
        (45, (0, 36), CONTEXT[18:36]),
        (45, (0, 45), CONTEXT[36:]),
    ]


def test_local_lookahead_needs_passes():
    with pytest.raises(ValueError, match="local_lookahead needs policy.local_chunk > 0"):
        KVzipPolicy(local_lookahead=8)
    with pytest.raises(ValueError, match="local_lookahead must be a count of tokens >= 0.*got -1"):
        KVzipPolicy(local_chunk=8, local_lookahead=-1)


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_local_chunk_must_be_a_token_count(bad):
    with pytest.raises(ValueError, match=f"local_chunk must be a count of context tokens.*got {bad!r}"):
        KVzipPolicy(local_chunk=bad)


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_window_must_be_a_query_count(bad):
    with pytest.raises(ValueError, match=f"window must be a count of prompt queries >= 0.*got {bad!r}"):
        KVzipPolicy(window=bad)


@pytest.mark.parametrize("bad", [0, -2.0, True, "4"])
def test_window_weight_must_be_a_positive_number(bad):
    with pytest.raises(ValueError, match=f"window_weight must be .*> 0.*got {bad!r}"):
        KVzipPolicy(window=32, window_weight=bad)
    with pytest.raises(ValueError, match="window_weight needs policy.window > 0"):
        KVzipPolicy(window_weight=4)


def test_prefix_renorm_needs_prefix_keep():
    with pytest.raises(ValueError, match="prefix_renorm=true needs policy.prefix_keep"):
        KVzipPolicy(prefix_renorm=True)
    assert KVzipPolicy(prefix_keep=4, prefix_renorm=True).window_exclude == (0, 0)  # no template prefix: nothing


@pytest.mark.parametrize("mode", ["query_agnostic", "query_aware"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_both_modes_end_to_end(tiny_llama, mode, allocation):
    """Batched = one at a time; query-agnostic reconstructs only the context, the question comes after it."""
    requests = [as_request(i, CONTEXT, q, mode, 6) for i, q in enumerate(QUESTIONS)]
    engine = Engine(tiny_llama, _kvzip(3, allocation), max_seqs=4, max_tokens_per_head=256, prefill_chunk=32)
    outputs = engine.run(requests)
    prompt = len(CONTEXT) + (0 if mode == "query_agnostic" else len(QUESTIONS[0]))
    assert engine.stats.reconstruct_tokens == len(requests) * (len(REPEAT) + prompt)
    for req, out in zip(requests, outputs, strict=True):
        alone = Engine(tiny_llama, _kvzip(3, allocation), max_seqs=1, max_tokens_per_head=256, prefill_chunk=32)
        assert out.tokens == alone.run([req])[0].tokens and len(out.tokens) == 6
        assert out.reconstruct_s > 0 and out.memory.logical_compression > 2.2
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_shared_prefix_reconstructs_once(tiny_llama):
    requests = [as_request(i, CONTEXT, q, "query_agnostic", 6, share_prefix="ctx") for i, q in enumerate(QUESTIONS)]
    engine = Engine(tiny_llama, _kvzip(), max_seqs=4, max_tokens_per_head=256)
    outputs = engine.run(requests)
    assert engine.stats.shared_prefills == 1 and engine.stats.forks == 2
    assert engine.stats.reconstruct_tokens == len(REPEAT) + len(CONTEXT)  # once, for every question
    for req, out in zip(requests, outputs, strict=True):
        plain = as_request(req.request_id, CONTEXT, req.question_ids, "query_agnostic", 6)
        assert out.tokens == Engine(tiny_llama, _kvzip(), max_tokens_per_head=256).run([plain])[0].tokens
        assert out.reconstruct_s > 0
    assert engine.cache.num_free_blocks == engine.cache.num_blocks and not engine.parents


def test_needs_repeat_ids_and_room_for_the_reconstruction(tiny_llama):
    comp = Compressor(KVzipPolicy(), Budget(ratio=2))
    with pytest.raises(ValueError, match="repeat_ids is not set"):
        Engine(tiny_llama, comp, max_tokens_per_head=256).add_request(Request(0, CONTEXT, 4))
    with pytest.raises(ValueError, match="reconstruction"):  # 45 + 5 + 45 tokens at the peak
        Engine(tiny_llama, _kvzip(), max_tokens_per_head=64).add_request(Request(0, CONTEXT, 4))


def _kept_positions(model, policy: KVzipPolicy, allocation: str) -> list[set[int]]:
    """Run CONTEXT through ``policy`` at 2x; the positions each (layer, kv head) holds right after compression."""
    comp = Compressor(policy, Budget(ratio=2, protected_window=4, allocation=allocation))
    kept: list[set[int]] = []
    compress = comp.compress

    def capture(cache, seq_ids, budget=None):
        result = compress(cache, seq_ids, budget)
        for layer in range(cache.num_layers):
            v = cache.view(layer, seq_ids, with_kv=False)
            kept.extend(set(p[ok].tolist()) for p, ok in zip(v.positions[0], v.valid[0], strict=True))
        return result

    comp.compress = capture
    Engine(model, comp, max_seqs=1, max_tokens_per_head=256).run([Request(0, CONTEXT, 4)])
    return kept


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_prefix_keep_keeps_the_prefix_sinks_and_evicts_the_rest_of_it_first(tiny_llama, allocation):
    """``prefix_keep=2`` with an 8-token template prefix: every head keeps positions 0 and 1 and none of 2..7,
    some of which KVzip's own scores keep."""
    prefix, rest = set(range(8)), set(range(2, 8))
    sinks_only = KVzipPolicy(repeat_ids=REPEAT, prefix_ids=CONTEXT[:8], prefix_keep=2)
    kept = _kept_positions(tiny_llama, sinks_only, allocation)
    assert kept and all({0, 1} <= held and not held & rest for held in kept)
    scored = _kept_positions(tiny_llama, KVzipPolicy(repeat_ids=REPEAT, prefix_ids=CONTEXT[:8]), allocation)
    assert any(held & rest for held in scored) and any(not prefix <= held for held in scored)


@pytest.mark.parametrize("bad", [-1, 1.5, "four", True])
def test_prefix_keep_must_be_a_token_count(bad):
    with pytest.raises(ValueError, match=f"prefix_keep must be null or a token count >= 0 .*got {bad!r}"):
        KVzipPolicy(prefix_keep=bad)


def test_pool_kernel_ranks_each_slot_by_the_best_score_of_its_neighbours_in_position_order():
    """``pool_kernel=3``: a slot ranks by the max score of itself and the slots just before and after it in
    position order, whatever the slot order (after compaction slots are not in position order; an evicted
    position is no gap); stored scores are untouched, padding is no neighbour."""
    positions = torch.tensor([[[4, 0, 2, 1, 3, 7, 0], [0, 1, 2, 3, 4, 5, 0]]])  # [S=1, H=2, L=7]; head 0 lacks 5, 6
    valid = torch.tensor([[[True] * 6 + [False], [True] * 6 + [False]]])
    scores = torch.tensor([[[0.1, 0.0, 0.9, 0.2, 0.3, 0.5, 7.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.4, 7.0]]])
    view = HeadView(0, [0], torch.empty(0), torch.empty(0), positions, scores.clone(), valid, positions, valid.sum(-1))
    ranks = KVzipPolicy(pool_kernel=3).rank(view, torch.tensor([8]))
    for h in range(2):
        order = sorted(range(6), key=lambda i: int(positions[0, h, i]))
        for j, i in enumerate(order):
            want = max(float(scores[0, h, k]) for k in order[max(j - 1, 0) : j + 2])
            assert float(ranks[0, h, i]) == pytest.approx(want), (h, int(positions[0, h, i]))
    assert float(ranks[0, 0, 0]) == pytest.approx(0.5)  # position 4 neighbours 7, the next position held
    assert torch.equal(view.scores, scores) and torch.equal(KVzipPolicy().rank(view, torch.tensor([8])), scores)


@pytest.mark.parametrize("bad", [0, -3, 2, 4, 2.0, True])
def test_pool_kernel_must_be_an_odd_count(bad):
    """An even window would give one pooled score too many (``max_pool1d`` pads ``k // 2`` each side)."""
    with pytest.raises(ValueError, match=f"pool_kernel must be an odd window of positions >= 1.*got {bad!r}"):
        KVzipPolicy(pool_kernel=bad)
    with pytest.raises(ValueError, match=f"lfu policy.pool_kernel must be an odd window.*got {bad!r}"):
        LFUPolicy(pool_kernel=bad)
    with pytest.raises(ValueError, match=f"SnapKVPolicy policy.kernel must be an odd window.*got {bad!r}"):
        SnapKVPolicy(kernel=bad)


def test_pooling_leaves_the_template_prefix_out():
    """With ``prefix_keep``, a context token next to the prefix does not inherit a prefix token's score."""
    positions = torch.arange(6).view(1, 1, 6)
    valid = torch.ones(1, 1, 6, dtype=torch.bool)
    scores = torch.tensor([[[0.9, 0.8, 0.1, 0.2, 0.0, 0.3]]])  # prefix = positions 0, 1; sink = 0
    view = HeadView(0, [0], torch.empty(0), torch.empty(0), positions, scores, valid, positions, valid.sum(-1))
    ranks = KVzipPolicy(pool_kernel=3, prefix_ids=[1, 2], prefix_keep=1).rank(view, torch.tensor([6]))
    assert ranks[0, 0].tolist() == pytest.approx([float("inf"), 0.0, 0.2, 0.2, 0.3, 0.3])


def _view(layer: int, positions: list[list[int]], scores: list[list[float]], length: list[int]) -> HeadView:
    """One sequence's view of ``layer``: per head its positions and scores, valid up to ``length``."""
    pos, sc = torch.tensor([positions]), torch.tensor([scores])
    valid = torch.arange(pos.shape[-1]) < torch.tensor(length)[:, None]
    return HeadView(layer, [0], torch.empty(0), torch.empty(0), pos, sc, valid[None], pos, valid.sum(-1)[None])


def test_token_prior_floors_each_head_at_its_tokens_mean_over_every_layer_and_head():
    """``token_prior`` = λ: a slot ranks by max(its own score, λ x its position's mean score over every (layer,
    head) slot holding it), whatever the slot order; padding neither votes nor is lifted; 0 leaves the ranks."""
    views = [
        _view(0, [[0, 1, 2, 3], [3, 2, 1, 0]], [[0.0, 0.1, 0.0, 0.2], [0.0, 0.0, 0.1, 0.0]], [4, 4]),
        _view(1, [[0, 1, 2, 3], [2, 0, 1, 9]], [[1.0, 0.9, 0.3, 0.6], [0.9, 0.3, 0.1, 5.0]], [4, 3]),
    ]
    seen = torch.tensor([4])
    mean = {0: (0.0 + 0.0 + 1.0 + 0.3) / 4, 1: (0.1 + 0.1 + 0.9 + 0.1) / 4, 2: (0.0 + 0.0 + 0.3 + 0.9) / 4}
    mean[3] = (0.2 + 0.0 + 0.6) / 3  # head 1 of layer 1 does not hold position 3 (its last slot is padding)
    ranks = KVzipPolicy(token_prior=2).rank_layers(views, seen)
    for v, r in zip(views, ranks, strict=True):
        for h in range(2):
            for i in range(int(v.lengths[0, h])):
                want = max(float(v.scores[0, h, i]), 2 * mean[int(v.positions[0, h, i])])
                assert float(r[0, h, i]) == pytest.approx(want), (v.layer, h, i)
    assert float(ranks[1][0, 1, 3]) == 5.0  # padding keeps its stored value (the compressor masks it)
    plain = KVzipPolicy().rank_layers(views, seen)
    assert all(torch.equal(p, v.scores) for p, v in zip(plain, views, strict=True))


def test_token_prior_leaves_the_template_prefix_its_own_rank():
    views = [
        _view(0, [[0, 1, 2, 3]], [[0.9, 0.8, 0.1, 0.0]], [4]),
        _view(1, [[0, 1, 2, 3]], [[0.9, 0.8, 0.9, 0.8]], [4]),
    ]
    policy = KVzipPolicy(prefix_ids=[7, 8], prefix_keep=1, token_prior=1)
    ranks = policy.rank_layers(views, torch.tensor([4]))
    assert ranks[0][0, 0].tolist() == pytest.approx([float("inf"), 0.0, 0.5, 0.4])


def test_a_dominant_token_prior_keeps_one_token_set_in_every_head(tiny_llama):
    """Through the engine and compressor: with λ far above any score each head ranks by its tokens' mean over
    every layer and head, so under the uniform split every (layer, kv head) keeps the same positions, where each
    head's own scores keep different ones."""
    shared = _kept_positions(tiny_llama, KVzipPolicy(repeat_ids=REPEAT, token_prior=1e6), "uniform")
    assert len(shared) > 2 and all(held == shared[0] for held in shared)
    own = _kept_positions(tiny_llama, KVzipPolicy(repeat_ids=REPEAT), "uniform")
    assert len({frozenset(held) for held in own}) > 1


@pytest.mark.parametrize("bad", [-0.5, True, "1", float("inf"), float("nan")])
def test_token_prior_must_be_a_finite_number_at_least_zero(bad):
    with pytest.raises(ValueError, match=f"token_prior must be a finite number >= 0.*got {bad!r}"):
        KVzipPolicy(token_prior=bad)
