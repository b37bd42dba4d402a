"""decode_latency on the tiny random Llama: row layout, the HF-vs-paged sanity check, and compressed-cache sizes."""

import pytest
import torch

from kvcompress.bench import latency
from kvcompress.bench.latency import check_same_logits, decode_latency, kept_positions

KEYS = {
    "system",
    "context",
    "kept_tokens_per_head",
    "batch",
    "step_ms_median",
    "step_ms_min",
    "step_ms_max",
    "step_ms_std",
    "kv_bytes",
    "ratio_vs_hf",
}


@pytest.fixture(scope="module")
def rows(tiny_llama) -> list[dict]:
    return decode_latency(tiny_llama, [64, 128], ratio=8.0, steps=2, repeats=2, warmup=1)


def test_one_row_per_system_and_context(rows) -> None:
    assert len(rows) == 6
    assert all(KEYS <= set(r) for r in rows)
    assert [(r["context"], r["system"]) for r in rows] == [
        (c, s) for c in (64, 128) for s in ("hf_dense", "paged", "paged_x8")
    ]
    for r in rows:
        assert 0 < r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
        assert r["step_ms_std"] >= 0 and r["batch"] == 1


def test_kept_tokens_and_memory(rows) -> None:
    by = {(r["context"], r["system"]): r for r in rows}
    for c in (64, 128):
        assert by[c, "hf_dense"]["kept_tokens_per_head"] == c
        assert by[c, "paged"]["kept_tokens_per_head"] == c
        assert by[c, "paged_x8"]["kept_tokens_per_head"] == c // 8
        assert by[c, "hf_dense"]["ratio_vs_hf"] == 1.0
        # 2 layers x 2 kv heads x c tokens x head_dim 16 x (K + V) x fp32
        assert by[c, "hf_dense"]["kv_bytes"] == 2 * 2 * c * 16 * 2 * 4
        assert by[c, "paged"]["kv_bytes"] >= by[c, "hf_dense"]["kv_bytes"]  # + per-slot metadata
    # at 128 tokens the compressed cache holds one 16-slot block per head against eight
    assert by[128, "paged_x8"]["kv_bytes"] * 6 < by[128, "paged"]["kv_bytes"]


def test_sanity_check_runs_and_can_fail(tiny_llama, monkeypatch) -> None:
    build = latency.PagedDecoder.build.__func__

    def corrupted(cls, name, model, kv, *args, **kwargs):
        return build(cls, name, model, [(k + 0.5, v) for k, v in kv], *args, **kwargs)

    monkeypatch.setattr(latency.PagedDecoder, "build", classmethod(corrupted))
    with pytest.raises(RuntimeError, match="sanity check failed at context 64: paged"):
        decode_latency(tiny_llama, [64], steps=1, repeats=1, warmup=0)
    assert tiny_llama.config._attn_implementation == "sdpa"


def test_compressed_check_uses_the_real_position(tiny_llama, monkeypatch) -> None:
    """A compressed cache whose seen count is wrong gets RoPE positions wrong; the check must notice."""
    build = latency.PagedDecoder.build.__func__

    def wrong_seen(cls, name, model, kv, positions, seen, *args, **kwargs):
        return build(cls, name, model, kv, positions, seen if name == "paged" else len(positions), *args, **kwargs)

    monkeypatch.setattr(latency.PagedDecoder, "build", classmethod(wrong_seen))
    with pytest.raises(RuntimeError, match="paged_x8 and hf_dense disagree"):
        decode_latency(tiny_llama, [128], steps=1, repeats=1, warmup=0)


def test_batch_of_two(tiny_llama) -> None:
    out = decode_latency(tiny_llama, [64], ratio=4.0, steps=1, repeats=1, batch=2, warmup=0)
    assert [r["system"] for r in out] == ["hf_dense", "paged", "paged_x4"]
    assert all(r["batch"] == 2 for r in out)
    assert out[2]["kept_tokens_per_head"] == 16


def test_check_same_logits_tolerance() -> None:
    ref = torch.tensor([[0.0, 1.0, 5.0]])
    check_same_logits("paged", 8, ref, ref + 5e-4, atol=1e-3)
    with pytest.raises(RuntimeError, match="max \\|logit diff\\| = 0.002"):
        check_same_logits("paged", 8, ref, ref + 2e-3, atol=1e-3)
    with pytest.raises(RuntimeError, match="argmax differs: True"):
        check_same_logits("paged", 8, ref, torch.tensor([[0.0, 3.1, 2.9]]), atol=float("inf"))


def test_kept_positions_are_evenly_spaced() -> None:
    pos = kept_positions(1000, 8.0)
    assert pos.numel() == 125 and pos[0] == 0 and pos[-1] < 1000
    assert bool((pos.diff() == 8).all())
    assert kept_positions(100, 3.0).unique().numel() == 33
