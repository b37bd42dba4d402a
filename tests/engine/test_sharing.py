"""Requests sharing a prompt: one prefill, a fork per request, per-request budgets, and policy state that follows
forks and releases."""

from __future__ import annotations

import random

import pytest

from kvcompress.budget import Budget
from kvcompress.compressor import Compressor
from kvcompress.engine import Engine, Request
from kvcompress.generate import as_request
from kvcompress.policies.lfu import LFUPolicy

CONTEXT = [random.Random(0).randrange(3, 128) for _ in range(120)]
QUESTIONS = [[random.Random(q).randrange(3, 128) for _ in range(6)] for q in range(1, 4)]


def _lfu(ratio: float = 3, metric: str = "L2-avg") -> Compressor:
    return Compressor(LFUPolicy(window=8, metric=metric), Budget(ratio=ratio, protected_window=8))


def _alone(model, request: Request, comp: Compressor) -> list[int]:
    return Engine(model, comp, max_seqs=1, max_tokens_per_head=256).run([request])[0].tokens


def test_questions_on_one_context_share_its_prefill_and_compression(tiny_llama):
    requests = [as_request(i, CONTEXT, q, "query_agnostic", 8, share_prefix="ctx") for i, q in enumerate(QUESTIONS)]
    engine = Engine(tiny_llama, _lfu(), max_seqs=4, max_tokens_per_head=256)
    outputs = engine.run(requests)
    assert engine.stats.shared_prefills == 1 and engine.stats.forks == 3
    assert engine.stats.compressions == 1  # the shared context, once for every question
    assert engine.stats.prefill_tokens == len(CONTEXT) + sum(len(q) for q in QUESTIONS)
    for req, out in zip(requests, outputs, strict=True):
        plain = as_request(req.request_id, CONTEXT, req.question_ids, "query_agnostic", 8)
        assert out.tokens == _alone(tiny_llama, plain, _lfu()), f"question {req.request_id} diverged"
        assert out.memory.logical_compression > 2.5
    assert engine.cache.num_free_blocks == engine.cache.num_blocks and not engine.parents
    assert engine.compressor.policy._window_start == {}  # released sequences leave no policy state behind


def test_a_ratio_sweep_forks_one_prefill_per_budget(tiny_llama):
    ratios = [1.0, 2.0, 4.0]
    requests = [Request(r, CONTEXT, 8, budget=Budget(ratio=r, protected_window=8), share_prefix="ctx") for r in ratios]
    engine = Engine(tiny_llama, _lfu(), max_seqs=4, max_tokens_per_head=256)
    outputs = engine.run(requests)
    assert engine.stats.shared_prefills == 1 and engine.stats.prefill_tokens == len(CONTEXT)
    for r, out in zip(ratios, outputs, strict=True):
        assert out.memory.logical_compression == pytest.approx(r, rel=0.1)
        assert out.tokens == _alone(tiny_llama, Request(r, CONTEXT, 8), _lfu(r)), f"ratio {r} diverged"


def test_fork_copies_and_release_drops_policy_state():
    policy = LFUPolicy()
    comp = Compressor(policy)
    policy._window_start[0] = 17
    comp.fork(0, 3)
    assert policy._window_start == {0: 17, 3: 17}
    comp.release(0)
    assert policy._window_start == {3: 17}


def test_sharing_requests_need_identical_prompts(tiny_llama):
    engine = Engine(tiny_llama, _lfu(), max_seqs=2, max_tokens_per_head=256)
    engine.add_request(Request(0, CONTEXT, 4, share_prefix="ctx"))
    with pytest.raises(ValueError, match="identical prompts"):
        engine.add_request(Request(1, CONTEXT[:-1], 4, share_prefix="ctx"))


def test_one_slot_runs_sharers_one_after_another(tiny_llama):
    requests = [as_request(i, CONTEXT, q, "query_agnostic", 4, share_prefix="ctx") for i, q in enumerate(QUESTIONS)]
    engine = Engine(tiny_llama, _lfu(), max_seqs=1, max_tokens_per_head=256)
    outputs = engine.run(requests)
    assert engine.stats.shared_prefills == 0 and [len(o.tokens) for o in outputs] == [4, 4, 4]


def test_query_aware_ratio_sweeps_of_several_prompts_prefill_their_suffixes_alongside_new_prompts(tiny_llama):
    """Query-aware sweeps (the quality table): each prompt's forks prefill the template tail (window 0) in the same
    step as the next prompt's observed chunk (window 8); both groups come from one pick of the prefill step."""
    suffix = [5, 6, 7]
    requests = [
        as_request((p, r), CONTEXT[p:], QUESTIONS[p], "query_aware", 6, suffix=suffix,
                   budget=Budget(ratio=r, protected_window=8), share_prefix=p)
        for p in range(2) for r in (2.0, 4.0)
    ]  # fmt: skip
    engine = Engine(tiny_llama, _lfu(), max_seqs=6, max_tokens_per_head=256)
    outputs = engine.run(requests)
    for req, out in zip(requests, outputs, strict=True):
        plain = as_request(req.request_id, req.prompt_ids, [], "query_aware", 6, suffix=suffix, budget=req.budget)
        assert out.tokens == Engine(tiny_llama, _lfu(), max_seqs=1, max_tokens_per_head=256).run([plain])[0].tokens


@pytest.mark.parametrize(("max_seqs", "prompts", "forks"), [(4, 5, 3), (2, 3, 3), (4, 3, 9)])
def test_a_sweep_over_more_prompts_than_slots_prefills_each_prompt_once(tiny_llama, max_seqs, prompts, forks):
    """Parents wait for the slots their forks need, and a parent is released early only when its forks cannot
    fit: more prompts than slots, or more forks than slots, still prefill each prompt once (the pool holds
    ``max_seqs`` uncompressed sequences), and each output equals the request run alone."""
    requests = [
        Request((p, f), CONTEXT[p:], 4, budget=Budget(ratio=2 + f / 4, protected_window=8), share_prefix=p)
        for p in range(prompts) for f in range(forks)
    ]  # fmt: skip
    engine = Engine(tiny_llama, _lfu(), max_seqs=max_seqs, max_tokens_per_head=256)
    outputs = engine.run(requests)
    assert engine.stats.shared_prefills == prompts and engine.stats.forks == prompts * forks
    assert engine.stats.preemptions == 0
    assert engine.stats.prefill_tokens == sum(len(CONTEXT[p:]) for p in range(prompts))
    for req, out in zip(requests, outputs, strict=True):
        alone = Request(req.request_id, req.prompt_ids, 4, budget=req.budget)
        assert out.tokens == _alone(tiny_llama, alone, _lfu(req.budget.ratio)), f"{req.request_id} diverged"
