"""scripts/gaussian_sketch.py: the sketch is the evicted keys' top principal directions, and the oracle's dense
attention is the paged kernels' own with the sketch's term added to each summary slot's logit, query by query."""

from __future__ import annotations

import pytest
import torch

from kvcompress.budget import Budget
from kvcompress.generate import as_request
from kvcompress.policies.kvzip import KVzipPolicy


@pytest.fixture(scope="module")
def gs(script_module):
    return script_module("gaussian_sketch")


@pytest.fixture(scope="module")
def ia(script_module):
    return script_module("inspect_allocation")


def test_the_sketch_is_the_covariances_top_principal_directions(gs) -> None:
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(50, 6, generator=gen) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1])
    cov = torch.cov(keys.T, correction=0)
    lam, u = torch.linalg.eigh(cov)
    w = gs.sketch(keys, 6)
    torch.testing.assert_close(w.T @ w, cov, atol=1e-5, rtol=1e-5)
    top2 = u[:, -2:] @ torch.diag(lam[-2:]) @ u[:, -2:].T
    torch.testing.assert_close(w[:2].T @ w[:2], top2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gs.sketch(keys, 2), w[:2])
    assert not gs.sketch(keys[:1], 3).any()  # one key has no spread
    q = torch.randn(4, 6, generator=gen)
    torch.testing.assert_close(gs.sketch_term(q, w, 0.5), 0.125 * torch.einsum("md,de,me->m", q, cov, q))


def test_uniform_tails_match_the_gaussian_for_small_spreads_and_are_exact_on_uniform_keys(gs) -> None:
    """Each direction uniform: the term is log(sinh(x)/x) per direction, t^2/2 to second order, and on keys
    uniform and independent along their axes it is their exact summed weight, where the Gaussian's overshoots."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(3, 5, generator=gen)
    q = torch.randn(7, 5, generator=gen) * 1e-2
    torch.testing.assert_close(
        gs.sketch_term(q, w, 1.0, "uniform"), gs.sketch_term(q, w, 1.0, "gaussian"), atol=1e-7, rtol=1e-3
    )
    D, n = 4, 200000
    half = torch.tensor([2.0, 1.5, 1.0, 0.5])  # each axis uniform on [-half, half]
    keys = (torch.rand(n, D, generator=gen) * 2 - 1) * half
    q = torch.randn(6, D, generator=gen) * 2
    exact = (q @ keys.T).logsumexp(-1) - torch.log(torch.tensor(float(n))) - q @ keys.mean(0)
    w = gs.sketch(keys, D)
    torch.testing.assert_close(gs.sketch_term(q, w, 1.0, "uniform"), exact, atol=0.05, rtol=0)
    assert (gs.sketch_term(q, w, 1.0, "gaussian") - exact).min() > 0.1
    with pytest.raises(ValueError, match="tails must be one of gaussian, uniform, got 'heavy'"):
        gs.sketch_term(q, w, 1.0, "heavy")


@pytest.mark.parametrize("sketched", [False, True], ids=["zero-sketch", "rank-2"])
def test_the_dense_attention_is_the_kernels_with_the_term_on_the_summary_slot(
    gs, ia, tiny_llama, sketched: bool
) -> None:
    """Every dense forward is checked against the paged attention, run with each query head's term added to the
    bias of its kv head's summary slot (a zero sketch: the bias as it is). With a zero sketch the request also
    decodes the tokens the plain run decodes."""
    from transformers import AttentionInterface

    from kvcompress.attention import ATTN_IMPLEMENTATION, paged_attention_forward

    class Checked(gs.SketchedAttention):
        worst = 0.0

        def record(self, cache, views, keep, *args, **kwargs):
            out = super().record(cache, views, keep, *args, **kwargs)
            if not sketched:
                self.sketches = {layer: torch.zeros_like(w) for layer, w in self.sketches.items()}
            return out

        def __call__(self, module, query, key, value, mask, **kwargs):
            calls = self.dense_calls
            out, _ = super().__call__(module, query, key, value, mask, **kwargs)
            if self.dense_calls == calls:
                return out, None
            cache, plan = kwargs["kvc_step"].cache, kwargs["kvc_step"].plan
            view = cache.view(module.layer_idx, plan.seq_ids, with_kv=False)
            slots = view.slots[0][cache.slot_bias.view(-1)[view.slots[0]].masked_fill(~view.valid[0], 0) > 0]
            H, D = key.shape[1], query.shape[-1]
            group = query.shape[1] // H
            saved = cache.slot_bias
            for t in range(query.shape[2]):
                for j in range(query.shape[1]):
                    w = self.sketches[module.layer_idx][j // group]
                    bias = saved.clone()
                    head_slots = slots[torch.isin(slots, view.slots[0, j // group])]
                    bias.view(-1)[head_slots] += gs.sketch_term(query[0, j, t].float(), w, D**-0.5)
                    cache.slot_bias = bias
                    try:
                        ref, _ = paged_attention_forward(module, query, key, value, mask, **kwargs)
                    finally:
                        cache.slot_bias = saved
                    Checked.worst = max(Checked.worst, float((out[0, t, j] - ref[0, t, j]).abs().max()))
            return out, None

    budget = Budget(ratio=4, protected_window=4, allocation="global", summary_slots=1)
    context = [(7 * i) % 120 + 3 for i in range(80)]
    request = as_request("r", context, [11, 12], "query_agnostic", 4)
    plain = ia.run_recorded(tiny_llama, ia.RecordingCompressor(KVzipPolicy(repeat_ids=[5, 9, 17]), budget), request)
    comp = ia.RecordingCompressor(KVzipPolicy(repeat_ids=[5, 9, 17]), budget)
    comp.sketched = Checked(2, ia.compressor_module.fold_evicted, paged_attention_forward)
    AttentionInterface.register(ATTN_IMPLEMENTATION, comp.sketched)
    try:
        out = ia.run_recorded(tiny_llama, comp, request)
    finally:
        AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    assert ia.compressor_module.fold_evicted is comp.sketched.fold  # the hook is undone
    assert comp.sketched.dense_calls >= 2 * tiny_llama.config.num_hidden_layers  # the question and each decode
    assert any(w.any() for w in comp.sketched.sketches.values()) == sketched
    assert Checked.worst < 1e-5
    if not sketched:
        assert out.tokens == plain.tokens
