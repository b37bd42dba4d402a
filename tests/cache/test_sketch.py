"""kvcompress.cache.sketch: the sketch is the folded keys' top principal directions, its term is what a spread of
keys is worth to each query, and the engine's attention adds that term to each summary slot, query by query."""

from __future__ import annotations

import math

import pytest
import torch

from kvcompress.budget import Budget, BudgetError
from kvcompress.cache.sketch import key_sketch, sketch_term, slot_term
from kvcompress.compressor import Compressor
from kvcompress.engine import Engine
from kvcompress.generate import as_request
from kvcompress.policies.kvzip import KVzipPolicy


def test_the_sketch_is_the_members_covariances_top_principal_directions() -> None:
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 50, 6, generator=gen) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    members = torch.rand(2, 50, generator=gen) < 0.7
    members[1, 1:] = False  # one member: no spread
    w = key_sketch(keys, members, 6)
    cov = torch.cov(keys[0][members[0]].T, correction=0)
    lam, u = torch.linalg.eigh(cov)
    torch.testing.assert_close(w[0].T @ w[0], cov, atol=1e-5, rtol=1e-5)
    top2 = u[:, -2:] @ torch.diag(lam[-2:]) @ u[:, -2:].T
    torch.testing.assert_close(w[0, :2].T @ w[0, :2], top2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(key_sketch(keys, members, 2)[0], w[0, :2])
    assert not w[1].any()
    # a member that stands for 3 tokens weighs as three copies of its key
    mass = torch.ones(2, 50)
    mass[0, 0] = 3.0
    members[0, 0] = True
    copies = torch.cat([keys[0][members[0]], keys[0, :1], keys[0, :1]])
    repeated = torch.cov(copies.T, correction=0)
    heavy = key_sketch(keys, members, 6, mass)[0]
    torch.testing.assert_close(heavy.T @ heavy, repeated, atol=1e-5, rtol=1e-5)


def test_the_terms_gaussian_is_half_the_squared_spread_and_uniform_is_exact_on_uniform_keys() -> None:
    """Each direction uniform: log(sinh(x)/x), t^2/2 to second order (exact in float32 where 1 - exp(-2x) would
    cancel), and on keys uniform and independent along their axes it is their exact summed weight, where the
    Gaussian's overshoots."""
    t = torch.linspace(-6, 6, 20001)
    x = (math.sqrt(3) * t.abs()).double().clamp_min(1e-12)
    exact64 = x + torch.log1p(-torch.exp(-2 * x)) - math.log(2) - torch.log(x)
    torch.testing.assert_close(sketch_term(t[:, None]).double(), exact64, atol=2e-6, rtol=0)
    torch.testing.assert_close(sketch_term(t[:, None], "gaussian"), t.square() / 2)
    small = t[:, None] * 1e-2
    torch.testing.assert_close(sketch_term(small), sketch_term(small, "gaussian"), atol=1e-8, rtol=1e-3)
    gen = torch.Generator().manual_seed(2)
    D, n = 4, 200000
    half = torch.tensor([2.0, 1.5, 1.0, 0.5])  # each axis uniform on [-half, half]
    keys = (torch.rand(n, D, generator=gen) * 2 - 1) * half
    q = torch.randn(6, D, generator=gen) * 2
    exact = (q @ keys.T).logsumexp(-1) - math.log(n) - q @ keys.mean(0)
    w = key_sketch(keys, torch.ones(n, dtype=torch.bool), D)
    torch.testing.assert_close(sketch_term(q @ w.T), exact, atol=0.05, rtol=0)
    assert (sketch_term(q @ w.T, "gaussian") - exact).min() > 0.1
    with pytest.raises(ValueError, match="tails must be one of uniform, gaussian, got 'heavy'"):
        sketch_term(t[:, None], "heavy")


def test_each_query_reads_its_own_sequences_sketch_of_its_kv_head() -> None:
    gen = torch.Generator().manual_seed(3)
    sketches = torch.randn(3, 2, 4, 8, generator=gen)  # [max_seqs, H_kv, r, D]
    q = torch.randn(5, 6, 8, generator=gen)  # 5 tokens, 6 query heads (3 per kv head)
    seqs = torch.tensor([2, 2, 0, 1, 2])
    term = slot_term(q, sketches, seqs, 0.5, "gaussian")
    for t in range(5):
        for j in range(6):
            spread = 0.5 * sketches[seqs[t], j // 3] @ q[t, j]
            assert float(term[t, j]) == pytest.approx(float(spread.square().sum() / 2), rel=1e-5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(summary_slots=2), "needs budget.summary_slots=1"),
        (dict(summary_slots=1, summary_spread=True), "no summary_spread"),
        (dict(summary_slots=1, compress_every=8), "it needs compress_every=0"),
        (dict(summary_slots=1, summary_sketch_tails="heavy"), "must be one of uniform, gaussian, got 'heavy'"),
        (dict(summary_slots=1, summary_sketch=-1), "summary_sketch"),
    ],
)
def test_a_budget_refuses_a_sketch_it_cannot_keep(fields: dict, message: str) -> None:
    with pytest.raises(BudgetError, match=message):
        Budget(ratio=4, **{"summary_sketch": 4, **fields})


def _engine_run(model, budget: Budget, zero_sketch: bool = False, check=None, folds=None):
    """Run one query-agnostic KVzip request through the Engine under ``budget``; ``check(module, args, kwargs,
    out)`` sees every paged attention forward, and ``folds`` (a list) gets ``(before, after)`` of each
    compression: per layer, each head's ``(positions, keys, valid)`` before it and ``(positions, valid)`` after it,
    the slot biases after it and the cache's sketches."""
    from transformers import AttentionInterface

    from kvcompress.attention import ATTN_IMPLEMENTATION, paged_attention_forward

    def hooked(module, query, key, value, mask, **kwargs):
        out = paged_attention_forward(module, query, key, value, mask, **kwargs)
        if check is not None:
            check(module, (query, key, value, mask), kwargs, out[0])
        return out

    comp = Compressor(KVzipPolicy(repeat_ids=[5, 9, 17]), budget)
    fold = comp.compress

    def compress(cache, seq_ids, b=None):
        views = [cache.view(layer, seq_ids) for layer in range(cache.num_layers)]
        freed = fold(cache, seq_ids, b)
        if folds is not None:
            after = [cache.view(layer, seq_ids) for layer in range(cache.num_layers)]
            biases = [cache.slot_bias.view(-1)[v.slots] for v in after]
            before = [(v.positions, v.keys, v.valid) for v in views]
            # the sketches as the fold left them: the engine zeroes them when it releases the sequence
            folds.append(
                (before, [(v.positions, v.valid) for v in after], biases, cache.slot_sketch[:, seq_ids[0]].clone())
            )
        if zero_sketch:
            cache.slot_sketch.zero_()
        return freed

    comp.compress = compress
    context = [(7 * i) % 120 + 3 for i in range(80)]
    request = as_request("r", context, [11, 12], "query_agnostic", 4)
    engine = Engine(model, comp, max_seqs=2, max_tokens_per_head=256)
    AttentionInterface.register(ATTN_IMPLEMENTATION, hooked)
    try:
        return engine, engine.run([request])[0]
    finally:
        AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


def test_the_engine_adds_each_querys_term_to_its_heads_summary_slot(tiny_llama) -> None:
    """Every forward after the fold is checked against the paged attention without a sketch, run with each query
    head's term added to the bias of its kv head's summary slot (so the term lands on that slot alone, from that
    query's own sequence and head); the fold stores the sketch of exactly the keys each head evicted. A zero sketch
    decodes the tokens plain summary slots decode."""
    from kvcompress.attention import paged_attention_forward

    budget = Budget(ratio=4, protected_window=4, allocation="global", summary_slots=1, summary_sketch=2)
    worst, checked = [0.0], [0]

    def check(module, args, kwargs, out):
        query, key, value, mask = args
        step = kwargs["kvc_step"]
        cache, plan = step.cache, step.plan
        sid = plan.seq_ids[0]  # one request: decode rows and prefill tokens are all this sequence's
        if not cache.slot_sketch[module.layer_idx, sid].any():
            return
        checked[0] += 1
        view = cache.view(module.layer_idx, plan.seq_ids, with_kv=False)
        _, Hq, T, D = query.shape
        group = Hq // key.shape[1]
        saved = cache.slot_bias
        plan.sketched = False  # the attention without the term
        try:
            for t in range(T):
                for j in range(Hq):
                    head = view.slots[0, j // group][view.valid[0, j // group]]
                    summary = head[saved.view(-1)[head] > 0]
                    w = cache.slot_sketch[module.layer_idx, sid, j // group]
                    bias = saved.clone()
                    bias.view(-1)[summary] += sketch_term(D**-0.5 * w @ query[0, j, t].float())
                    cache.slot_bias = bias
                    ref, _ = paged_attention_forward(module, query, key, value, mask, **kwargs)
                    worst[0] = max(worst[0], float((out[0, t, j] - ref[0, t, j]).abs().max()))
        finally:
            cache.slot_bias, plan.sketched = saved, True

    folds = []
    engine, out = _engine_run(tiny_llama, budget, check=check, folds=folds)
    assert checked[0] >= 2 * tiny_llama.config.num_hidden_layers  # the question and each decode step
    assert worst[0] < 1e-5
    ((before, after, biases, sketch),) = folds
    for layer, ((pos, keys, valid), (kept, kept_valid), bias) in enumerate(zip(before, after, biases, strict=True)):
        for h in range(pos.shape[1]):
            stays = set(kept[0, h][kept_valid[0, h] & (bias[0, h] == 0)].tolist())  # the summary slot is no token
            gone = valid[0, h] & torch.tensor([p not in stays for p in pos[0, h].tolist()])
            expected = key_sketch(keys[0, h].float(), gone, 2)
            torch.testing.assert_close(sketch[layer, h].T @ sketch[layer, h], expected.T @ expected)
            assert int(gone.sum()) >= 2 and sketch[layer, h].any()
    assert engine.cache.sketch_bytes == 2 * 2 * 2 * 16 * 4  # layers x kv heads x rank x head_dim floats
    plain_engine, plain = _engine_run(tiny_llama, Budget(**{**budget.__dict__, "summary_sketch": 0}))
    _, zero = _engine_run(tiny_llama, budget, zero_sketch=True)
    assert zero.tokens == plain.tokens
    assert plain_engine.cache.slot_sketch is None


def test_the_cache_keeps_a_sketch_per_sequence_forks_it_counts_it_and_clears_it() -> None:
    from kvcompress.cache.paged import PagedKVCache

    with pytest.raises(ValueError, match="sketch_rank"):
        PagedKVCache(2, 2, 8, 16, 4, 2, sketch_rank=2)  # no summaries to sketch
    cache = PagedKVCache(2, 2, 8, 16, 4, 2, summaries=True, sketch_rank=2)
    seq = cache.add_sequence()
    plan = cache.plan_step([seq], [5])
    assert plan.token_seqs.tolist() == [seq] * 5 and not plan.sketched
    cache.slot_sketch[:, seq] = 1.0
    cache.sketched[seq] = True  # as the fold marks it
    assert cache.plan_step([seq], [1]).sketched
    child = cache.fork(seq)
    assert bool((cache.slot_sketch[:, child] == 1).all()) and cache.sketched[child]
    assert cache.sketch_bytes == 2 * 2 * 2 * 8 * 4
    plain = PagedKVCache(2, 2, 8, 16, 4, 2, summaries=True)
    plain_seq = plain.add_sequence()
    plain.plan_step([plain_seq], [5])
    assert plain.plan_step([plain_seq], [1]).token_seqs is None
    assert cache.memory([seq]).allocated_bytes == plain.memory([plain_seq]).allocated_bytes + cache.sketch_bytes
    cache.release(seq)
    assert not cache.slot_sketch[:, seq].any() and bool((cache.slot_sketch[:, child] == 1).all())
    assert not cache.sketched[seq] and cache.sketched[child]


def test_a_request_asking_for_another_sketch_than_the_engines_is_refused(tiny_llama) -> None:
    budget = Budget(ratio=4, protected_window=4, allocation="global", summary_slots=1, summary_sketch=2)
    engine = Engine(tiny_llama, Compressor(KVzipPolicy(repeat_ids=[5, 9, 17]), budget), max_tokens_per_head=256)
    request = as_request("r", list(range(3, 60)), [11], "query_agnostic", 2)
    request.budget = Budget(**{**budget.__dict__, "summary_sketch": 4})
    with pytest.raises(
        ValueError, match="summary_sketch=4 with uniform tails, but the engine.s cache keeps sketches of rank 2"
    ):
        engine.add_request(request)
