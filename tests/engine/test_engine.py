"""The continuous-batching engine: equality with the single-sequence path, no loss under preemption, and the
memory mechanism (compression admits more sequences on the same pool)."""

from __future__ import annotations

import random

import pytest
import torch

from kvcompress.budget import Budget
from kvcompress.cache.paged import PagedKVCache
from kvcompress.compressor import Compressor
from kvcompress.engine import Engine, Request
from kvcompress.generate import generate
from kvcompress.policies.lfu import LFUPolicy
from kvcompress.policies.snapkv import SnapKVPolicy

LAYERS, HEADS = 2, 2  # tiny_llama's geometry


def _requests(n: int, lengths: tuple[int, int], new: int, vocab: int = 128, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [
        Request(i, [rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))], new, arrival_step=2 * i)
        for i in range(n)
    ]


def _single(model, request: Request, compressor: Compressor | None) -> list[int]:
    return generate(model, [list(request.prompt_ids)], compressor, request.max_new_tokens, request.eos_token_ids)[
        0
    ].tokens


def _lfu(ratio: float = 2, every: int = 0) -> Compressor:
    return Compressor(LFUPolicy(window=8), Budget(ratio=ratio, protected_window=8, compress_every=every))


def _lfu_summaries() -> Compressor:
    """Continual compression that folds what it evicts into summary slots, and folds those again."""
    return Compressor(LFUPolicy(window=8), Budget(ratio=2, protected_window=8, compress_every=5, summary_slots=2))


@pytest.mark.parametrize(
    "make",
    [lambda: None, _lfu, lambda: _lfu(2, every=5), _lfu_summaries],
    ids=["full", "lfu", "lfu-every5", "lfu-every5-summaries"],
)
def test_engine_equals_single_sequence_path(tiny_llama, make):
    """Staggered arrivals, packed multi-sequence prefill in chunks, batched decode: same greedy tokens."""
    requests = _requests(5, (40, 130), new=12)
    engine = Engine(tiny_llama, make(), max_seqs=4, max_tokens_per_head=256, prefill_chunk=32, max_prefill_tokens=80)
    outputs = engine.run(requests)
    assert engine.stats.preemptions == 0 and engine.stats.peak_decode_batch > 1
    assert engine.stats.peak_running > 1  # several sequences really shared the pool
    for req, out in zip(requests, outputs, strict=True):
        assert out.request_id == req.request_id and out.finish_reason == "length"
        assert out.tokens == _single(tiny_llama, req, make()), f"request {req.request_id} diverged"
    assert engine.cache.num_free_blocks == engine.cache.num_blocks  # every block came back


def test_preemption_loses_nothing(tiny_llama):
    """A pool too small for every sequence's growth: the newest are preempted, recomputed, and still finish with
    exactly the tokens the single-sequence path produces."""
    requests = [Request(i, r.prompt_ids, 40) for i, r in enumerate(_requests(4, (60, 90), new=40, seed=1))]
    # room for ~2.5 sequences of ~130 tokens: all four are admitted, growth then forces preemptions
    pool = PagedKVCache.blocks_for(LAYERS, HEADS, 130, 1) * 5 // 2
    engine = Engine(tiny_llama, None, num_blocks=pool, max_seqs=4, max_tokens_per_head=256, watermark_blocks=0)
    outputs = engine.run(requests)
    assert engine.stats.preemptions > 0 and engine.stats.recomputed_tokens > 0  # decoding sequences were preempted
    assert sum(o.preemptions for o in outputs) == engine.stats.preemptions
    for req, out in zip(requests, outputs, strict=True):
        assert len(out.tokens) == 40
        assert out.tokens == _single(tiny_llama, req, None), f"request {req.request_id} corrupted by preemption"
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_pressure_compresses_before_preempting(tiny_llama):
    """With a compressing policy and continual compression off, growth beyond the pool is met by compressing the
    running sequences again (freeing their decode tokens) rather than by preempting."""
    requests = [Request(i, r.prompt_ids, 96) for i, r in enumerate(_requests(3, (100, 120), new=96, seed=2))]
    pool = PagedKVCache.blocks_for(LAYERS, HEADS, 120, 1) * 2
    engine = Engine(tiny_llama, _lfu(4), num_blocks=pool, max_seqs=3, max_tokens_per_head=256, watermark_blocks=0)
    outputs = engine.run(requests)
    assert engine.stats.pressure_compressions > 0
    assert all(len(o.tokens) == 96 for o in outputs)
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_compression_admits_more_sequences_on_the_same_pool(tiny_llama):
    requests = _requests(8, (100, 120), new=8, seed=3)
    for r in requests:
        r.arrival_step = 0
    pool = PagedKVCache.blocks_for(LAYERS, HEADS, 128, 1) * 2
    peaks = {}
    for label, comp in (("dense", None), ("x4", _lfu(4))):
        engine = Engine(tiny_llama, comp, num_blocks=pool, max_seqs=8, max_tokens_per_head=256)
        engine.run([Request(r.request_id, r.prompt_ids, r.max_new_tokens) for r in requests])
        peaks[label] = engine.stats.peak_decode_batch
    assert peaks["dense"] <= 2 and peaks["x4"] >= 2 * peaks["dense"], peaks


def test_eos_finishes_early(tiny_llama):
    req = _requests(1, (50, 50), new=20)[0]
    first = _single(tiny_llama, req, None)
    stop = Request("r", req.prompt_ids, 20, eos_token_ids=(first[3],))
    out = Engine(tiny_llama, max_seqs=1, max_tokens_per_head=128).run([stop])[0]
    assert out.finish_reason == "eos" and out.tokens == first[: first.index(first[3])]


def test_zero_new_tokens_prefills_and_returns_nothing(tiny_llama):
    out = Engine(tiny_llama, max_seqs=1, max_tokens_per_head=128).run([Request("r", [5] * 20, 0)])[0]
    assert out.tokens == [] and out.finish_reason == "length"


def test_bad_requests_are_refused_with_reasons(tiny_llama):
    engine = Engine(tiny_llama, num_blocks=16, max_seqs=2, max_tokens_per_head=128)
    with pytest.raises(ValueError, match="non-empty prompt"):
        engine.add_request(Request(0, [], 4))
    with pytest.raises(ValueError, match="max_tokens_per_head=128"):
        engine.add_request(Request(0, [5] * 120, 16))
    with pytest.raises(ValueError, match="the pool has 16"):
        engine.add_request(Request(0, [5] * 60, 8))
    engine.add_request(Request(1, [5] * 10, 2))
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add_request(Request(1, [5] * 10, 2))
    summaries = Request(2, [5] * 40, 2, budget=Budget(ratio=2, summary_slots=1))
    with pytest.raises(ValueError, match="the engine's cache has no summary slots"):
        Engine(tiny_llama, _lfu(), max_seqs=1, max_tokens_per_head=128).add_request(summaries)


def test_summary_max_ratio_gives_harder_compression_a_plain_cache(tiny_llama):
    """Past ``summary_max_ratio`` the engine's cache carries no summary slots (no bias bytes), and a request
    generates what the same budget without summary slots generates; at or under it, the cache has them."""

    def engine(budget: Budget) -> Engine:
        return Engine(tiny_llama, Compressor(LFUPolicy(window=8), budget), max_seqs=1, max_tokens_per_head=128)

    limited = Budget(ratio=4, protected_window=8, summary_slots=1, summary_max_ratio=2)
    assert engine(Budget(ratio=2, protected_window=8, summary_slots=1, summary_max_ratio=2)).cache.slot_bias is not None
    assert engine(limited).cache.slot_bias is None
    prompt = [random.Random(3).randrange(5, 200) for _ in range(64)]
    runs = [engine(b).run([Request("r", prompt, 6)])[0] for b in (limited, limited.without_summaries())]
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].memory.physical_compression == runs[1].memory.physical_compression


@pytest.mark.slow
def test_engine_equals_single_path_on_embedded_model(smollm2):
    """SmolLM2, lfu + global at 4x, prompts of 200-500 tokens arriving over time, chunked packed prefill."""
    tok = smollm2.tokenizer
    text = "The quick brown fox jumps over the lazy dog. The pass key is 71432. Remember it. " * 40
    requests = [
        Request(i, tok(text[: 900 + 500 * i] + " What is the pass key?").input_ids, 10, (tok.eos_token_id,), 2 * i)
        for i in range(4)
    ]

    def make() -> Compressor:
        return Compressor(LFUPolicy(), Budget(ratio=4, allocation="global", protected_window=16))

    torch.manual_seed(0)
    engine = Engine(
        smollm2.model, make(), max_seqs=4, max_tokens_per_head=1024, prefill_chunk=256, max_prefill_tokens=512
    )
    outputs = engine.run(requests)
    assert engine.stats.peak_decode_batch > 1
    for req, out in zip(requests, outputs, strict=True):
        assert out.tokens == _single(smollm2.model, req, make()), f"request {req.request_id} diverged"
        assert out.memory is not None and out.memory.logical_compression > 3


def test_snapkv_engine_runs_and_frees(tiny_llama):
    requests = _requests(3, (60, 80), new=6, seed=4)
    comp = Compressor(SnapKVPolicy(window=8), Budget(ratio=4, protected_window=8))
    engine = Engine(tiny_llama, comp, max_seqs=3, max_tokens_per_head=128)
    outputs = engine.run(requests)
    assert all(o.memory.logical_compression > 3 for o in outputs)
    assert engine.stats.blocks_freed > 0
