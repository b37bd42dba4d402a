"""HybridPolicy: two scorers fused per head through within-head rank quantiles, every hook forwarded."""

import pytest
import torch

from kvcompress.allocators import ALLOCATORS
from kvcompress.budget import Budget
from kvcompress.compressor import Compressor
from kvcompress.experiment.policy_config import load_policy
from kvcompress.generate import generate
from kvcompress.model_runner import ModelRunner, make_cache
from kvcompress.policies.full import FullPolicy
from kvcompress.policies.hybrid import HybridPolicy, head_quantiles
from kvcompress.policies.keydiff import KeyDiffPolicy
from kvcompress.policies.knorm import KnormPolicy
from kvcompress.policies.lfu import LFUPolicy
from kvcompress.policies.snapkv import SnapKVPolicy
from kvcompress.policies.streaming import StreamingPolicy

PROMPT = 150


def prompt(n: int = PROMPT, seed: int = 0) -> list[int]:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def kept_after_compress(model, policy, budget: Budget) -> list[list[set[int]]]:
    """Prefill one prompt observed by ``policy``, compress to ``budget``; the kept positions per layer and head."""
    comp = Compressor(policy, budget)
    runner = ModelRunner(model, make_cache(model, 1, PROMPT + 8))
    s = runner.cache.add_sequence()
    runner.forward([s], [prompt()], comp, comp.window)
    comp.compress(runner.cache, [s])
    kept = []
    for layer in range(runner.cache.num_layers):
        v = runner.cache.view(layer, [s], with_kv=False)
        kept.append([set(v.positions[0, h][v.valid[0, h]].tolist()) for h in range(runner.cache.num_kv_heads)])
    return kept


def test_yaml_forwards_the_observer_hooks() -> None:
    p = load_policy("hybrid")
    assert isinstance(p.a, LFUPolicy) and isinstance(p.b, KeyDiffPolicy)
    assert (p.window, p.window_power, p.decode_power, p.wants_decode_probs) == (32, 2, 2, False)
    assert p.needs_kv and p.sinks == 0 and p.allocations is None
    assert load_policy("hybrid", mode="product", weight=0.3).mode == "product"


def test_sinks_and_allocations_combine() -> None:
    p = HybridPolicy(LFUPolicy(), StreamingPolicy(n_sinks=3))
    assert p.sinks == 3 and p.allocations == ("uniform", "pyramid")
    with pytest.raises(ValueError, match="does not compose with budget.allocation='global'"):
        Compressor(p, Budget(ratio=2, allocation="global"))


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="both observe attention"):
        HybridPolicy(LFUPolicy(), SnapKVPolicy())
    with pytest.raises(ValueError, match="never evicts"):
        HybridPolicy(FullPolicy(), KeyDiffPolicy())
    with pytest.raises(ValueError, match="mode must be one of rank_fusion, product"):
        HybridPolicy(LFUPolicy(), KeyDiffPolicy(), mode="sum")
    with pytest.raises(ValueError, match="must be a policy config"):
        HybridPolicy({"metric": "L2-sum"}, KeyDiffPolicy())


def test_fork_and_release_reach_the_children() -> None:
    p = HybridPolicy(LFUPolicy(), KeyDiffPolicy())
    p.a._window_start[1] = 5
    p.fork(1, 2)
    p.release(1)
    assert p.a._window_start == {2: 5}


def test_head_quantiles_are_scale_free_with_shared_ties() -> None:
    ranks = torch.tensor([[[3.0, 1.0, 1.0, 7.0, 0.0]]])
    valid = torch.tensor([[[True, True, True, True, False]]])
    q = head_quantiles(ranks, valid)
    assert q.tolist() == [[[0.75, 0.375, 0.375, 1.0, 0.0]]]  # ties share their mid-rank
    assert torch.equal(head_quantiles(-1000 * ranks, valid), head_quantiles(-ranks, valid))


def test_each_child_ranks_every_layer_as_it_would_alone() -> None:
    """A child whose ranking of a layer draws on the other layers (KVzip's ``token_prior``) keeps that rule in a
    hybrid: the hybrid fuses the children's :meth:`rank_layers`, not their per-layer :meth:`rank`."""
    from kvcompress.cache.paged import HeadView
    from kvcompress.policies.kvzip import KVzipPolicy

    pos, valid = torch.arange(4).view(1, 1, 4), torch.ones(1, 1, 4, dtype=torch.bool)
    views = [
        HeadView(layer, [0], torch.empty(0), torch.empty(0), pos, torch.tensor([[s]]), valid, pos, valid.sum(-1))
        for layer, s in enumerate([[0.4, 0.3, 0.2, 0.1], [0.0, 0.0, 1.0, 0.9]])
    ]
    seen = torch.tensor([4])
    prior, plain = KVzipPolicy(token_prior=1.0), KVzipPolicy()
    hybrid = HybridPolicy(prior, StreamingPolicy(), weight=0.5)
    fused = hybrid.rank_layers(views, seen)
    for v, f, a in zip(views, fused, prior.rank_layers(views, seen), strict=True):
        assert torch.equal(f, hybrid.fuse(a, StreamingPolicy().rank(v, seen), v.valid))
    assert not torch.equal(fused[0], hybrid.fuse(plain.rank(views[0], seen), pos.float(), valid))


def test_weight_one_keeps_exactly_what_the_first_child_keeps(tiny_llama) -> None:
    budget = Budget(ratio=3, protected_window=8)
    alone = kept_after_compress(tiny_llama, LFUPolicy(), budget)
    fused = kept_after_compress(tiny_llama, HybridPolicy(LFUPolicy(), KeyDiffPolicy(), weight=1.0), budget)
    assert fused == alone
    mixed = kept_after_compress(tiny_llama, HybridPolicy(LFUPolicy(), KeyDiffPolicy(), weight=0.5), budget)
    assert mixed != alone  # the second scorer changes the kept set
    for heads in mixed:
        for pos in heads:
            assert len(pos) == PROMPT // 3
            assert set(range(PROMPT - 8, PROMPT)) <= pos, "protected window evicted"


@pytest.mark.parametrize("mode", ["query_aware", "query_agnostic"])
def test_hybrids_generate(tiny_llama, mode) -> None:
    ctx, q = prompt(96), prompt(12, seed=1)
    for policy in (load_policy("hybrid"), HybridPolicy(load_policy("h2o"), KnormPolicy(), mode="product")):
        comp = Compressor(policy, Budget(ratio=4, protected_window=8))
        out = generate(tiny_llama, [(ctx, q), (ctx[:80], q)], comp, max_new_tokens=3, mode=mode)
        assert [len(o.tokens) for o in out] == [3, 3]
        assert out[0].memory.logical_compression >= 3.0 * (1 if mode == "query_aware" else 0.8)


@pytest.mark.parametrize("allocation", list(ALLOCATORS))
def test_every_allocation_honours_the_budget(tiny_llama, allocation) -> None:
    kept = kept_after_compress(
        tiny_llama, load_policy("hybrid"), Budget(ratio=4, protected_window=8, allocation=allocation)
    )
    counts = torch.tensor([[len(pos) for pos in heads] for heads in kept])
    assert abs(counts.sum().item() - PROMPT / 4 * counts.numel()) <= max(counts.numel(), 16)
    assert all(set(range(PROMPT - 8, PROMPT)) <= pos for heads in kept for pos in heads)
