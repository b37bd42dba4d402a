"""scripts/slot_share.py: the full cache's queries and keys it measures with are the model's own, post-RoPE, and the
shares it reports are the evicted tokens' softmax mass, exactly and through one mean-key slot."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def ss(script_module):
    return script_module("slot_share")


def test_the_tapped_queries_and_keys_are_the_models_post_rope_ones(ss, tiny_llama) -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ids = [(5 * i) % 120 + 3 for i in range(40)]
    queries, keys = ss.full_cache_tensors(tiny_llama, ids, 6)
    cfg = tiny_llama.config
    D = cfg.hidden_size // cfg.num_attention_heads
    seen: dict[str, list[torch.Tensor]] = {"q": [], "k": []}
    hooks = [
        getattr(layer.self_attn, f"{w}_proj").register_forward_hook(lambda m, i, o, w=w: seen[w].append(o))
        for layer in tiny_llama.model.layers
        for w in ("q", "k")
    ]
    with torch.no_grad():
        tiny_llama(torch.tensor([ids]))
        pos = torch.arange(len(ids))[None]
        cos, sin = tiny_llama.model.rotary_emb(seen["q"][0], pos)
    for h in hooks:
        h.remove()
    assert len(queries) == len(keys) == cfg.num_hidden_layers
    for layer in range(cfg.num_hidden_layers):
        q = seen["q"][layer].view(1, len(ids), -1, D).transpose(1, 2)
        k = seen["k"][layer].view(1, len(ids), -1, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        torch.testing.assert_close(queries[layer], q[0, :, -6:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(keys[layer], k[0], atol=1e-5, rtol=1e-4)


def test_shares_are_the_evicted_tokens_softmax_mass_and_the_slots_mean_key_mass(ss) -> None:
    gen = torch.Generator().manual_seed(3)
    T, M, D = 30, 4, 8
    q, keys = torch.randn(2, M, D, generator=gen) * 2, torch.randn(T, D, generator=gen)
    evicted = torch.tensor([1, 4, 5, 9, 17, 20])
    exact, slot, gap = ss.head_shares(q, keys, evicted)
    s = D**-0.5
    for g in range(2):
        for m in range(M):
            visible = T - M + m + 1  # causal: the query at position T - M + m sees positions 0..T - M + m
            p = torch.softmax(s * keys[:visible] @ q[g, m], -1)
            assert exact[g, m].item() == pytest.approx(p[evicted].sum().item(), rel=1e-5)
            kept = torch.ones(visible, dtype=torch.bool)
            kept[evicted] = False
            mass = len(evicted) * math.exp(s * float(keys[evicted].mean(0) @ q[g, m]))
            rest = torch.exp(s * keys[:visible][kept] @ q[g, m]).sum().item()
            assert slot[g, m].item() == pytest.approx(mass / (mass + rest), rel=1e-5)
    assert (gap >= 0).all() and (slot < exact).all()  # Jensen: the mean key under-weighs the evicted tokens


def test_the_gaussian_sketch_is_the_slot_plus_the_top_principal_directions_spread(ss) -> None:
    """Rank r adds s^2/2 times the query's squared projections on the evicted keys' top r principal directions
    (checked against an SVD of the centred keys); on keys drawn from a Gaussian the full-rank sketch is the exact
    summed weight, so its gap is ~0 where the one slot's is not."""
    gen = torch.Generator().manual_seed(5)
    T, M, D = 40, 3, 8
    q, keys = torch.randn(2, M, D, generator=gen) * 2, torch.randn(T, D, generator=gen) * 1.5
    evicted = torch.tensor([0, 2, 3, 7, 11, 12, 19, 25, 31])
    s = D**-0.5
    _, _, slot_gap = ss.head_shares(q, keys, evicted)
    centred = keys[evicted] - keys[evicted].mean(0)
    _, sv, vt = torch.linalg.svd(centred, full_matrices=False)  # descending singular values
    for r, gap in zip([1, 3, D], ss.sketch_gaps(q, keys[evicted], slot_gap, [1, 3, D]), strict=True):
        proj = (q @ vt[:r].T) ** 2 * (sv[:r] ** 2 / len(evicted))
        torch.testing.assert_close(gap, slot_gap - 0.5 * s * s * proj.sum(-1), atol=1e-4, rtol=1e-4)
    mean, scale = torch.randn(D, generator=gen), torch.linspace(0.2, 1.5, D)
    drawn = mean + torch.randn(20000, D, generator=gen) * scale  # Gaussian keys; queries see all of them
    q = torch.randn(2, M, D, generator=gen)
    keys = torch.cat([drawn, torch.randn(M, D, generator=gen)])
    everything = torch.arange(len(drawn))
    one_slot = ss.head_shares(q, keys, everything)[2]
    full = ss.sketch_gaps(q, drawn, one_slot, [D])[0]
    assert full.abs().max() < 0.05 < one_slot.min()


def test_the_saved_gap_has_the_models_geometry_whatever_evicted(ss) -> None:
    """A head that evicted nothing in any sample, even the last layer's, still has its place (0) in the file, so
    the file fits the model it was measured on; ``gap_layers`` zeroes the layers outside it."""
    sums = {
        (0, 0): torch.tensor([0.2, 0.1, 1.0, 0.5, 1.0]) + torch.tensor([0.4, 0.1, 3.0, 0.5, 1.0]),  # two samples
        (1, 1): torch.tensor([0.3, 0.1, 4.0, 1.0, 1.0]),
    }
    table, gap = ss.mean_over_samples(sums, 3, 2, None)
    assert gap == [[2.0, 0.0], [0.0, 4.0], [0.0, 0.0]]
    assert [layer for layer, _ in table] == [0, 1]
    torch.testing.assert_close(table[0][1], torch.tensor([0.3, 0.1, 2.0, 0.5]))
    assert ss.mean_over_samples(sums, 3, 2, (1, 2))[1] == [[0.0, 0.0], [0.0, 4.0], [0.0, 0.0]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ratio", "1"], "--ratio must be > 1, got 1"),
        (["--gap-layers", "6", "--save-gap", "g.json"], "--gap-layers takes a layer range A-B, like 0-13, got '6'"),
        (["--gap-layers", "0-6"], "--gap-layers chooses the layers --save-gap writes: give --save-gap FILE too"),
        (["--setup", "kvzip+global:policy.windw=3"], "KVzipPolicy (policy=kvzip) has no field 'windw'"),
        (["--sketch", "4,x"], "--sketch takes ranks separated by commas, like 4,8,16, got '4,x'"),
        (["--sketch", "0"], "--sketch ranks must be >= 1, got '0'"),
        (["--tails", "heavy"], "argument --tails: invalid choice: 'heavy'"),
    ],
)
def test_bad_arguments_fail_in_one_line(args, message) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "slot_share.py"
    run = subprocess.run(
        [sys.executable, str(script), "--path", "x.jsonl", "--sample-id", "a", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert message in run.stderr
