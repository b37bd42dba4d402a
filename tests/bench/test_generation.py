"""The generation benchmark's check against HF: exact in fp32, a located report of where greedy paths part."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from kvcompress.bench.generation import divergence, generation_speed

_spec = importlib.util.spec_from_file_location("bench_script", Path(__file__).parents[2] / "experiments" / "bench.py")
bench_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_script)


def test_divergence_locates_the_first_differing_step(tiny_llama: LlamaForCausalLM) -> None:
    model, ids = tiny_llama, list(range(5, 45))
    rows = generation_speed(model, ids, new_tokens=6, repeats=1)
    hf = next(r for r in rows if r["system"] == "hf_dense")
    assert [r["system"] for r in rows] == ["hf_dense", "paged"] and all(r["same_tokens_as_hf"] for r in rows)
    assert "first_divergent_step" not in hf
    tokens = [int(t) for t in model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, 40:]]
    assert divergence(model, ids, tokens, tokens, None) is None
    other = [*tokens[:3], (tokens[3] + 1) % 128, *tokens[4:]]
    parted = divergence(model, ids, other, tokens, None)
    assert parted["first_divergent_step"] == 3
    assert parted["max_abs_logit_diff"] < 1e-4 and parted["hf_top2_margin"] > 0  # both sides' logits at step 3
    row = {**hf, "system": "paged", "same_tokens_as_hf": False, **parted}
    assert "no: from step 3, |Δlogit| ≤" in bench_script.generation_table([hf, row])
