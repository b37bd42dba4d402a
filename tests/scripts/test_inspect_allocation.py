"""scripts/inspect_allocation.py: the ranks it records are the ones the compressor evicted by, what it reports as
kept is the cache the request decoded from, and answers are found in the prompt's tokens."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvcompress.budget import Budget
from kvcompress.generate import as_request
from kvcompress.policies.kvzip import KVzipPolicy


@pytest.fixture(scope="module")
def ia(script_module):
    return script_module("inspect_allocation")


@pytest.mark.parametrize("new_tokens", [3, 1], ids=["decodes", "done-on-its-first-token"])
def test_recorded_ranks_separate_what_each_head_kept_from_what_it_evicted(ia, tiny_llama, new_tokens) -> None:
    context = [(7 * i) % 120 + 3 for i in range(60)]
    comp = ia.RecordingCompressor(KVzipPolicy(repeat_ids=[5, 9, 17]), Budget(ratio=4, protected_window=4))
    out = ia.run_recorded(tiny_llama, comp, as_request("r", context, [11, 12], "query_aware", new_tokens))
    assert len(out.tokens) == new_tokens
    assert len(comp.kept) == len(comp.before) == tiny_llama.config.num_hidden_layers
    n = len(context) + 2
    for (positions, valid), (ranks, before) in zip(comp.kept, comp.before, strict=True):
        assert ranks.shape == before.shape and ranks.shape[-1] == n  # every prompt token, before eviction
        for h in range(ranks.shape[0]):
            held = positions[h][valid[h]]
            assert 0 < held.numel() < n and int(held.max()) < n  # right after eviction: nothing appended yet
            r = ranks[h][torch.argsort(before[h])]  # by position
            open_ = torch.arange(n) < n - 4  # outside the protected window
            is_kept = torch.isin(torch.arange(n), held)
            assert r[open_ & is_kept].min() >= r[open_ & ~is_kept].max()
            assert r[open_].std() > 0, "the ranks were recorded before KVzip's reconstruction scored the prompt"


def test_a_setup_past_its_summary_max_ratio_is_recorded_once(ia, tiny_llama) -> None:
    """Past ``summary_max_ratio`` the compressor calls itself again for the sequences that drop what they evict;
    the recording (hooked by the outer call) must see that compression once, not hook the policy twice."""
    budget = Budget(ratio=8, protected_window=4, allocation="global", summary_slots=1, summary_max_ratio=4)
    comp = ia.RecordingCompressor(KVzipPolicy(repeat_ids=[5, 9, 17]), budget)
    context = [(7 * i) % 120 + 3 for i in range(120)]
    ia.run_recorded(tiny_llama, comp, as_request("r", context, [11, 12], "query_agnostic", 2))
    assert len(comp.kept) == len(comp.before) == tiny_llama.config.num_hidden_layers
    assert all(int(valid.sum()) < len(context) * valid.shape[0] for _, valid in comp.kept)


def test_a_drawn_policy_is_recorded_by_the_ranks_it_evicted_with(ia, tiny_llama) -> None:
    """``random`` draws its ranks: the recording must be of the draw eviction used, not of a second draw."""
    from kvcompress.experiment.policy_config import load_policy

    comp = ia.RecordingCompressor(load_policy("random"), Budget(ratio=4, protected_window=4))
    ia.run_recorded(tiny_llama, comp, as_request("r", list(range(3, 63)), [11, 12], "query_aware", 2))
    for (positions, valid), (ranks, before) in zip(comp.kept, comp.before, strict=True):
        for h in range(ranks.shape[0]):
            real = ~ranks[h].isnan()
            is_kept = torch.isin(before[h][real], positions[h][valid[h]])
            open_ = before[h][real] < 62 - 4
            assert ranks[h][real][open_ & is_kept].min() >= ranks[h][real][open_ & ~is_kept].max()


def test_the_oracles_keep_the_text_in_every_head_and_compress_only_the_named_layers(ia, tiny_llama) -> None:
    context = [(7 * i) % 120 + 3 for i in range(60)]
    num_layers = tiny_llama.config.num_hidden_layers
    text = torch.tensor([10, 11, 12])
    budget = Budget(ratio=ia.only_layers_ratio(4, (0, 0), num_layers), protected_window=4, allocation="global")
    runs = {}
    for oracle in (False, True):
        comp = ia.RecordingCompressor(KVzipPolicy(repeat_ids=[5, 9, 17]), budget)
        if oracle:
            comp.keep_positions, comp.only_layers = text.tolist(), (0, 0)
        ia.run_recorded(tiny_llama, comp, as_request("r", context, [11, 12], "query_aware", 2))
        runs[oracle] = [[positions[h][valid[h]] for h in range(len(valid))] for positions, valid in comp.kept]
    n = len(context) + 2
    assert not all(torch.isin(text, held).all() for layer in runs[False] for held in layer)  # the oracle matters
    assert all(torch.isin(text, held).all() for layer in runs[True] for held in layer)
    assert all(held.numel() == n for layer in runs[True][1:] for held in layer)  # outside 0-0: the whole prompt
    kept_in_0 = sum(held.numel() for held in runs[True][0]) / len(runs[True][0])
    assert kept_in_0 < n / 2, "layer 0 was not compressed"


def test_one_stand_in_per_evicted_token_decodes_as_the_full_cache(ia, tiny_llama) -> None:
    """Groups of one token each stand in for themselves: the mass oracle then changes nothing, while it still
    reports what the setup would have kept."""
    from kvcompress.experiment.policy_config import load_policy

    context = [(7 * i) % 120 + 3 for i in range(60)]
    request = as_request("r", context, [11, 12], "query_aware", 6)
    full = ia.run_recorded(tiny_llama, ia.RecordingCompressor(load_policy("full"), Budget(ratio=1)), request)
    comp = ia.RecordingCompressor(KVzipPolicy(repeat_ids=[5, 9, 17]), Budget(ratio=4, protected_window=4))
    comp.mass, comp.mass_groups = "mean", 10**6
    out = ia.run_recorded(tiny_llama, comp, request)
    assert out.tokens == full.tokens
    assert all(int(valid.sum(-1).max()) < len(context) for _, valid in comp.kept)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_stand_ins_replace_each_group_by_its_mean_value(ia, mode) -> None:
    from kvcompress.cache.paged import HeadView, PagedKVCache

    cache = PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=1, block_size=6)
    keys, values = torch.randn(6, 2), torch.randn(6, 2)
    cache.k_cache[0], cache.v_cache[0] = keys, values
    positions = torch.tensor([5, 0, 4, 1, 3, 2])  # slot order is not position order after a compaction
    slots = torch.arange(6)
    view = HeadView(
        0,
        [0],
        keys[None, None],
        values[None, None],
        positions[None, None],
        torch.zeros(1, 1, 6),
        torch.ones(1, 1, 6, dtype=torch.bool),
        slots[None, None],
        torch.tensor([[6]]),
    )
    gone = torch.tensor([True, True, False, True, True, False])  # positions 5, 0, 1, 3 -> groups {0, 1}, {3, 5}
    ia.stand_in(cache, view, gone[None, None], mode, groups=2)
    k, v = cache.k_cache[0], cache.v_cache[0]
    assert torch.equal(k[[2, 5]], keys[[2, 5]]) and torch.equal(v[[2, 5]], values[[2, 5]])  # kept: untouched
    assert torch.equal(k, keys)  # every key stays: the evicted tokens' attention mass is exact
    for group in ([1, 3], [4, 0]):
        want = torch.zeros(2, 2) if mode == "zero" else values[group].mean(0).expand(2, 2)
        assert torch.allclose(v[group], want)


@pytest.mark.parametrize(("mode", "text"), [("query_aware", "Oslo"), ("query_agnostic", "Which city")])
def test_keep_text_outside_what_is_compressed_is_a_clear_error(ia, tiny_llama, smollm2_tokenizer, mode, text) -> None:
    """Query-agnostic, the question is prefilled after compression, so its text cannot be kept."""
    from types import SimpleNamespace

    from kvcompress.tasks.base import Sample

    lm = SimpleNamespace(tokenizer=smollm2_tokenizer, model=tiny_llama)
    sample = Sample(
        sample_id="s",
        context_id="c",
        context="Yusuf had been born in Bergen.",
        question=" Which city was Yusuf born in?",
        answers=["Bergen"],
        task="person",
        metric="string_match_all",
        max_new_tokens=4,
    )
    with pytest.raises(ValueError, match="does not occur in what is compressed"):
        ia.inspect(lm, sample, "kvzip+global", 4, 4, mode, keep=(text,))


def test_only_layers_ratio_holds_the_compressed_layers_at_the_ratio(ia) -> None:
    assert ia.only_layers_ratio(8, (0, 29), 30) == pytest.approx(8)
    assert ia.only_layers_ratio(8, (0, 13), 30) == pytest.approx(30 / (16 + 14 / 8))
    assert ia.parse_layers("14-29", 30) == (14, 29)


def test_percentile_is_the_lowest_over_heads_and_tokens(ia) -> None:
    ranks = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, float("nan")]])
    positions = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])  # head 1's last slot is padding (NaN rank)
    assert ia.percentile(ranks, positions, [1]) == pytest.approx(25.0)  # head 0; head 1 gives 1 of 3 below
    assert ia.percentile(ranks, positions, [3]) == pytest.approx(75.0)  # head 1's padded slot does not count
    assert ia.percentile(ranks, positions, [1, 2]) == pytest.approx(0.0)  # head 1's 0.2 is its lowest


def test_answers_are_found_as_they_are_tokenized_in_the_text(ia, smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    ids = tok("Everyone knew that Yusuf had been born in Bergen. Luca was born in Accra.").input_ids
    pos = ia.answer_positions(tok, ids, "Bergen")
    assert pos and tok.decode([ids[p] for p in pos]).strip() == "Bergen"
    assert ia.answer_positions(tok, ids, "Oslo") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ratio", "1"], "--ratio must be > 1"),
        (["--setups", "kvzip+global:policy.windw=32"], "KVzipPolicy (policy=kvzip) has no field 'windw'"),
        (["--setups", "tova+global"], "does not compose with budget.allocation='global'"),
        (["--setups", "lfu-bias+global"], "needs a head-bias file"),
        (["--only-layers", "3"], "--only-layers takes a layer range A-B, like 0-13, got '3'"),
        (["--only-layers", "5-2"], "--only-layers A-B needs 0 <= A <= B, got '5-2'"),
        (["--mass", "half"], "argument --mass: invalid choice: 'half'"),
        (["--mass", "zero", "--mass-groups", "0"], "--mass-groups must be >= 1, got 0"),
        (["--only-layers", "0-13", "--setups", "kvzip"], "--only-layers needs setups with the global allocation"),
        (["--setups", "recommended_query_agnostic:budget.summary_offset=/no/gap.json"], "no such file: '/no/gap.json'"),
        (["--setups", "kvzip+global:budget.summary_sketch=8"], "it needs budget.summary_slots=1"),
        (
            ["--setups", "recommended_query_agnostic:budget.summary_sketch=8,budget.summary_spread=true"],
            "no summary_fit, no summary_spread and no summary_offset",
        ),
        (
            ["--setups", "recommended_query_agnostic:budget.summary_sketch_tails=heavy"],
            "budget.summary_sketch_tails must be one of uniform, gaussian, got 'heavy'",
        ),
    ],
)
def test_bad_arguments_fail_in_one_line_before_the_model_loads(args, message) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "inspect_allocation.py"
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert message in run.stderr
