"""A decode step reads nothing back from the device but the sampled tokens, whatever the number of layers,
sequences and the policy (on CUDA each read is a host sync; on CPU the same calls are counted)."""

from __future__ import annotations

import pytest
import torch
from host_reads import count_host_reads
from transformers import LlamaConfig, LlamaForCausalLM

from kvcompress.budget import Budget
from kvcompress.compressor import Compressor
from kvcompress.engine import Engine, Request
from kvcompress.policies.h2o import H2OPolicy
from kvcompress.policies.lfu import LFUPolicy
from kvcompress.policies.tova import TOVAPolicy


def _llama(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


POLICIES = {
    "full": lambda: None,
    "lfu": lambda: Compressor(LFUPolicy(window=8), Budget(ratio=2, protected_window=8)),  # fused accumulation
    "h2o": lambda: Compressor(H2OPolicy(), Budget(ratio=2, protected_window=8)),
    "tova": lambda: Compressor(TOVAPolicy(), Budget(ratio=2, protected_window=8)),  # a probability hook per layer
}


def test_the_counter_sees_reads() -> None:
    with count_host_reads() as calls:
        t = torch.arange(4)
        t.sum().item(), t.tolist(), bool(t.any())
    assert calls == ["item", "tolist", "__bool__"]


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("layers", [2, 6])
@pytest.mark.parametrize("batch", [1, 4])
def test_decode_step_reads_only_the_sampled_tokens(policy: str, layers: int, batch: int) -> None:
    engine = Engine(_llama(layers), POLICIES[policy](), max_seqs=batch, max_tokens_per_head=256)
    for i in range(batch):
        engine.add_request(Request(i, list(range(3, 60 + 7 * i)), 12))
    engine.step()  # prefill, compression, first decode forward
    for _ in range(4):
        with count_host_reads() as calls:
            assert engine.step() == []
        assert engine.stats.decode_tokens > 0 and calls == ["tolist"], calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", list(POLICIES))
def test_cuda_decode_steps_make_no_sync_but_the_sample(policy: str, monkeypatch) -> None:
    """On CUDA the same steps run under ``set_sync_debug_mode("error")``; only the sampled-token read is allowed."""
    from kvcompress.model_runner import ModelRunner

    model = _llama(4).cuda()
    engine = Engine(model, POLICIES[policy](), max_seqs=3, max_tokens_per_head=256)
    for i in range(3):
        engine.add_request(Request(i, list(range(3, 60 + 7 * i)), 12))
    engine.step()
    sample = ModelRunner.sample

    def allowed(logits):
        torch.cuda.set_sync_debug_mode("default")
        try:
            return sample(logits)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(ModelRunner, "sample", staticmethod(allowed))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            assert engine.step() == []
    finally:
        torch.cuda.set_sync_debug_mode("default")
