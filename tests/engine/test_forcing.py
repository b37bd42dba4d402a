"""Teacher-forced requests (``Request.forced_ids``): the engine emits the forced tokens and records each one's
log-probability and the greedy token at its step. Without compression both must equal what one dense forward of
the model over prompt + forced tokens gives, whatever the batching, sharing or preemption around them."""

from __future__ import annotations

import random

import pytest
import torch

from kvcompress.budget import Budget
from kvcompress.cache.paged import PagedKVCache
from kvcompress.compressor import Compressor
from kvcompress.engine import Engine, Request
from kvcompress.policies.lfu import LFUPolicy

LAYERS, HEADS = 2, 2  # tiny_llama's geometry


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 128) for _ in range(n)]


@torch.no_grad()
def _dense(model, prompt: list[int], forced: list[int]) -> tuple[list[float], list[int]]:
    """Log-probability of each forced token and the argmax before it, from one dense forward (the reference)."""
    logits = model(torch.tensor([prompt + forced])).logits[0, len(prompt) - 1 : -1].float()
    logprobs = logits.log_softmax(-1).gather(-1, torch.tensor(forced)[:, None])[:, 0]
    return logprobs.tolist(), logits.argmax(-1).tolist()


def _check(model, request: Request, out) -> None:
    n = request.max_new_tokens
    prompt = [*request.prompt_ids, *request.question_ids]
    want_lp, want_greedy = _dense(model, prompt, list(request.forced_ids[:n]))
    assert out.tokens == list(request.forced_ids[:n]) and out.finish_reason == "length"
    assert out.greedy_tokens == want_greedy
    torch.testing.assert_close(torch.tensor(out.forced_logprobs), torch.tensor(want_lp), atol=1e-4, rtol=1e-4)


def test_forced_tokens_score_as_a_dense_forward(tiny_llama):
    """Several forced requests (random answers, one shorter than its forced tokens) and a greedy one, with
    staggered arrivals, chunked packed prefill and a question prefilled after the prompt, in one batch."""
    rng = random.Random(0)
    requests = [
        Request(i, _tokens(rng, 40 + 17 * i), n, question_ids=_tokens(rng, 5), forced_ids=_tokens(rng, 12),
                arrival_step=i)
        for i, n in enumerate((12, 12, 7))
    ]  # fmt: skip
    plain = Request("greedy", _tokens(rng, 50), 6)
    engine = Engine(tiny_llama, max_seqs=4, max_tokens_per_head=256, prefill_chunk=32, max_prefill_tokens=80)
    outputs = engine.run([*requests, plain])
    assert engine.stats.peak_decode_batch > 1
    for request, out in zip(requests, outputs[:-1], strict=True):
        _check(tiny_llama, request, out)
    assert outputs[-1].forced_logprobs is None and outputs[-1].greedy_tokens is None
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_forcing_the_greedy_answer_reproduces_it(tiny_llama):
    """Forcing a request's own greedy answer back through a compressing engine (continual compression included)
    emits it again with every greedy token agreeing: forcing changes nothing the policy sees."""
    rng = random.Random(1)
    prompt = _tokens(rng, 90)

    def engine() -> Engine:
        compressor = Compressor(LFUPolicy(window=8), Budget(ratio=2, protected_window=8, compress_every=4))
        return Engine(tiny_llama, compressor, max_seqs=2, max_tokens_per_head=256)

    greedy = engine().run([Request(0, prompt, 16)])[0].tokens
    out = engine().run([Request(0, prompt, 16, forced_ids=greedy)])[0]
    assert out.tokens == greedy and out.greedy_tokens == greedy
    assert all(lp <= 0 for lp in out.forced_logprobs) and len(out.forced_logprobs) == 16


def test_forced_requests_survive_preemption(tiny_llama):
    """A pool too small for every sequence's growth: preempted forced requests are recomputed and record each
    token once, with the dense forward's log-probabilities."""
    rng = random.Random(2)
    requests = [Request(i, _tokens(rng, rng.randint(60, 90)), 40, forced_ids=_tokens(rng, 40)) for i in range(4)]
    pool = PagedKVCache.blocks_for(LAYERS, HEADS, 130, 1) * 5 // 2
    engine = Engine(tiny_llama, None, num_blocks=pool, max_seqs=4, max_tokens_per_head=256, watermark_blocks=0)
    outputs = engine.run(requests)
    assert engine.stats.preemptions > 0
    for request, out in zip(requests, outputs, strict=True):
        _check(tiny_llama, request, out)


def test_forks_of_a_shared_prompt_are_forced_too(tiny_llama):
    """Requests sharing a prompt, with no question to prefill: each fork takes its first forced token from the
    parent's logits."""
    rng = random.Random(3)
    prompt = _tokens(rng, 70)
    requests = [Request(i, prompt, 8, forced_ids=_tokens(rng, 8), share_prefix="p") for i in range(3)]
    engine = Engine(tiny_llama, max_seqs=4, max_tokens_per_head=256)
    outputs = engine.run(requests)
    assert engine.stats.forks == 3
    for request, out in zip(requests, outputs, strict=True):
        _check(tiny_llama, request, out)


def test_bad_forced_requests_are_refused(tiny_llama):
    engine = Engine(tiny_llama, max_seqs=2, max_tokens_per_head=128)
    with pytest.raises(ValueError, match=r"max_new_tokens=5 but only 3 forced_ids.*max_new_tokens <= 3"):
        engine.add_request(Request(0, [5] * 10, 5, forced_ids=[4, 5, 6]))
    with pytest.raises(ValueError, match=r"forced token id 128 is outside the model's vocabulary \[0, 128\)"):
        engine.add_request(Request(0, [5] * 10, 2, forced_ids=[4, 128]))
