"""compression_overhead on the tiny random Llama with a word-level toy tokenizer (ids fit its 128-token vocab)."""

import zlib

import pytest

from kvcompress.bench.overhead import compression_overhead
from kvcompress.model_runner import ModelRunner
from kvcompress.policies.lfu import LFUPolicy
from kvcompress.policies.streaming import StreamingPolicy

KEYS = {
    "policy",
    "decode_ms_per_step",
    "baseline_ms_per_step",
    "compress_ms_total",
    "n_compressions",
    "overhead_pct",
    "overhead_pct_min",
    "overhead_pct_max",
}


class WordTokenizer:
    """One id per whitespace-separated word (crc32 mod ``vocab``); no chat template, so prompts stay raw text."""

    chat_template = None

    def __init__(self, vocab: int = 128) -> None:
        self.vocab = vocab

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [zlib.crc32(w.encode()) % self.vocab for w in text.split()]}


@pytest.fixture
def forward_calls(monkeypatch) -> list[int]:
    """Counts every ModelRunner.forward call (prefill chunks and decode steps)."""
    calls: list[int] = []
    forward = ModelRunner.forward

    def counting(self, seq_ids, tokens, *args, **kwargs):
        calls.append(len(seq_ids))
        return forward(self, seq_ids, tokens, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "forward", counting)
    return calls


def test_rows_and_exact_step_count(tiny_llama, forward_calls) -> None:
    policies = {"lfu": LFUPolicy(), "streaming": StreamingPolicy()}
    rows = compression_overhead(
        tiny_llama, WordTokenizer(), policies, ratio=8.0, context=320, steps=4, compress_every=2, repeats=2
    )
    assert [r["policy"] for r in rows] == ["lfu", "streaming"]
    for r in rows:
        assert KEYS <= set(r)
        assert 300 <= r["prompt_tokens"] <= 320
        assert r["kept_tokens_per_head"] == pytest.approx(r["prompt_tokens"] / 8, abs=1)
        assert r["n_compressions"] == 2  # after decode steps 2 and 4
        assert r["compress_ms_total"] > 0
        assert r["decode_ms_per_step"] > 0 and r["baseline_ms_per_step"] > 0
        assert r["overhead_pct_min"] <= r["overhead_pct"] <= r["overhead_pct_max"]
    # per policy: repeats x (policy + baseline) engine runs of one prefill forward and exactly `steps` decode forwards
    assert len(forward_calls) == 2 * 2 * 2 * (1 + 4)


def test_no_continual_compression_and_batch(tiny_llama) -> None:
    rows = compression_overhead(
        tiny_llama, WordTokenizer(), {"lfu": LFUPolicy()}, context=320, steps=3, compress_every=0, repeats=1, batch=2
    )
    assert rows[0]["n_compressions"] == 0 and rows[0]["compress_ms_total"] == 0
    assert rows[0]["batch"] == 2


def test_tokenizer_outside_the_vocabulary_is_refused(tiny_llama) -> None:
    with pytest.raises(ValueError, match="vocabulary has 128 entries"):
        compression_overhead(tiny_llama, WordTokenizer(vocab=1000), {"lfu": LFUPolicy()}, context=200, steps=2)
