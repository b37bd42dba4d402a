"""scripts/inspect_allocation.py: the ranks it records are the ones the compressor evicted by, what it reports as
kept is the cache the request decoded from, and answers are found in the prompt's tokens."""

from __future__ import annotations

import pytest
import torch

from kvcompress.budget import Budget
from kvcompress.generate import as_request
from kvcompress.policies.kvzip import KVzipPolicy


@pytest.fixture(scope="module")
def ia(script_module):
    return script_module("inspect_allocation")


def test_recorded_ranks_separate_what_each_head_kept_from_what_it_evicted(ia, tiny_llama) -> None:
    context = [(7 * i) % 120 + 3 for i in range(60)]
    comp = ia.RecordingCompressor(KVzipPolicy(repeat_ids=[5, 9, 17]), Budget(ratio=4, protected_window=4))
    request = as_request("r", context, [11, 12], "query_aware", 3)
    out, kept = ia.run_recorded(tiny_llama, comp, request)
    assert len(out.tokens) == 3 and len(kept) == len(comp.before) == tiny_llama.config.num_hidden_layers
    n = len(context) + 2
    for (positions, valid), (ranks, before) in zip(kept, comp.before, strict=True):
        assert ranks.shape == before.shape and ranks.shape[-1] == n  # every prompt token, before eviction
        for h in range(ranks.shape[0]):
            held = positions[h][valid[h]]
            assert 0 < held.numel() < n
            r = ranks[h][torch.argsort(before[h])]  # by position
            open_ = torch.arange(n) < n - 4  # outside the protected window
            is_kept = torch.isin(torch.arange(n), held)
            assert r[open_ & is_kept].min() >= r[open_ & ~is_kept].max()
            assert r[open_].std() > 0, "KVzip's scores were recorded after reconstruction, not before it"


def test_percentile_is_the_lowest_over_heads_and_tokens(ia) -> None:
    ranks = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, float("nan")]])
    positions = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 0]])
    assert ia.percentile(ranks, positions, [1]) == pytest.approx(25.0)  # head 0; head 1 gives 1 of 3 below
    assert ia.percentile(ranks, positions, [3]) == pytest.approx(75.0)  # head 1's padded slot is no position 3
    assert ia.percentile(ranks, positions, [1, 2]) == pytest.approx(0.0)  # head 1's 0.2 is its lowest


def test_answers_are_found_as_they_are_tokenized_in_the_text(ia, smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    ids = tok("Everyone knew that Yusuf had been born in Bergen. Luca was born in Accra.").input_ids
    pos = ia.answer_positions(tok, ids, "Bergen")
    assert pos and tok.decode([ids[p] for p in pos]).strip() == "Bergen"
    assert ia.answer_positions(tok, ids, "Oslo") == []
