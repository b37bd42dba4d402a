"""Decode steps replayed from CUDA graphs equal eager decode steps.

On every device the padded, static-buffer step that a graph records (``DecodeGraphs(capture=False)``) is checked
against the plain eager step; on CUDA the captured graphs themselves are. The workload shrinks its batch (4, 3, 2,
1 sequences: buckets 4, 4, 2, 1, so a padding row follows a finished sequence's row) and compresses every few
decode steps, so block tables and lengths change between replays. Block allocation is deterministic, so the whole
pool (keys, values, positions, scores) must end up the same.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from kvcompress.budget import Budget
from kvcompress.compressor import Compressor
from kvcompress.decode_graphs import DecodeGraphs, batch_buckets
from kvcompress.engine import Engine, Request
from kvcompress.policies.h2o import H2OPolicy
from kvcompress.policies.kvzip import KVzipPolicy
from kvcompress.policies.lfu import LFUPolicy
from kvcompress.policies.tova import TOVAPolicy


def _budget() -> Budget:
    return Budget(ratio=2, protected_window=8, compress_every=5)


POLICIES = {
    "full": lambda: None,
    "lfu": lambda: Compressor(LFUPolicy(window=8), _budget()),  # squared probabilities accumulated in the kernel
    "h2o": lambda: Compressor(H2OPolicy(), _budget()),  # plain probabilities accumulated in the kernel
    "tova": lambda: Compressor(TOVAPolicy(), _budget()),  # a Python hook on the probabilities: never replayed
    # one summary slot per head with a sketch: each replayed query adds its sketch's term to the slot
    "kvzip-sketch": lambda: Compressor(
        KVzipPolicy(repeat_ids=[5, 9, 17]),
        Budget(ratio=2, protected_window=8, allocation="global", summary_slots=1, summary_sketch=2),
    ),
}
REQUESTS = [(40, 9), (57, 14), (71, 21), (33, 26)]  # (prompt tokens, new tokens): the batch goes 4 -> 3 -> 2 -> 1


def _run(model: LlamaForCausalLM, policy: str, graphs: str) -> tuple[list, Engine]:
    """``graphs``: "off" (eager), "static" (the recorded step run eagerly) or "cuda" (captured graphs)."""
    engine = Engine(model, POLICIES[policy](), max_seqs=4, max_tokens_per_head=160, keep_logits=True,
                    cuda_graphs=graphs == "cuda")  # fmt: skip
    if graphs == "static":
        engine.runner.graphs = DecodeGraphs(engine.runner, engine.max_seqs, capture=False)
        engine.runner.graphs.record_all(engine._decode_powers())  # what the engine does on CUDA
    requests = [Request(i, [(7 * i + 3 * j) % 120 + 1 for j in range(n)], new) for i, (n, new) in enumerate(REQUESTS)]
    return engine.run(requests), engine


def _assert_same(eager: tuple[list, Engine], graphed: tuple[list, Engine], policy: str, atol: float) -> None:
    (outs_e, eng_e), (outs_g, eng_g) = eager, graphed
    assert [o.tokens for o in outs_g] == [o.tokens for o in outs_e]
    for a, b in zip(outs_g, outs_e, strict=True):
        torch.testing.assert_close(a.last_logits, b.last_logits, atol=atol, rtol=0)
    assert eng_g.stats.compressions == eng_e.stats.compressions
    pools_g = (eng_g.cache.k_cache, eng_g.cache.v_cache, eng_g.cache.slot_pos, eng_g.cache.slot_score)
    pools_e = (eng_e.cache.k_cache, eng_e.cache.v_cache, eng_e.cache.slot_pos, eng_e.cache.slot_score)
    for g, e in zip(pools_g, pools_e, strict=True):  # the last block is the scratch block padding rows write into
        torch.testing.assert_close(g[:-1], e[:-1], atol=atol, rtol=0)
    if eng_e.cache.slot_sketch is not None:
        assert eng_e.stats.compressions and eng_g.runner.graphs.token_seqs is not None
    graphs = eng_g.runner.graphs
    assert graphs.replays == 0 if policy == "tova" else graphs.replays > 0, graphs.replays
    # every graph was recorded when the engine was built: no decode step paused to record one
    assert set(graphs._recorded) == {(b, p) for b in graphs.buckets for p in eng_g._decode_powers()}


def test_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(4) == [1, 2, 4]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        batch_buckets(0)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_the_recorded_step_equals_the_eager_step(policy: str, tiny_llama: LlamaForCausalLM) -> None:
    _assert_same(_run(tiny_llama, policy, "off"), _run(tiny_llama, policy, "static"), policy, atol=1e-5)


def test_cuda_graphs_on_a_cpu_model_is_a_clear_error(tiny_llama: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device, but it is on cpu"):
        Engine(tiny_llama, cuda_graphs=True)
    assert Engine(tiny_llama).runner.graphs is None  # default: graphs only where CUDA is


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", list(POLICIES))
def test_replayed_graphs_equal_eager_steps_on_cuda(policy: str, tiny_llama: LlamaForCausalLM) -> None:
    model = copy.deepcopy(tiny_llama).cuda()  # the fixture is shared: leave it on the CPU
    eager = _run(model, policy, "off")
    graphed = _run(model, policy, "cuda")
    assert eager[1].runner.graphs is None and graphed[1].runner.graphs is not None
    # the graph's kernels are launched for the pool's capacity (more splits): fp32 sums in another order
    _assert_same(eager, graphed, policy, atol=1e-4)
