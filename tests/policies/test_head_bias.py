"""KV-Compress's head bias: the file format, the lookup by sequence-length bin, what it does to LFU's ranks and to
the global allocation, and the calibration script's centring."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kvcompress.budget import Budget
from kvcompress.compressor import Compressor
from kvcompress.model_runner import ModelRunner, make_cache
from kvcompress.policies.head_bias import HeadBias
from kvcompress.policies.lfu import LFUPolicy

PROMPT = 160


def prompt(seed: int = 0) -> list[int]:
    return torch.randint(3, 128, (PROMPT,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefilled(model, policy: LFUPolicy) -> tuple[ModelRunner, int]:
    runner = ModelRunner(model, make_cache(model, 1, PROMPT + 8))
    s = runner.cache.add_sequence(PROMPT)
    comp = Compressor(policy, Budget(ratio=4, protected_window=8, allocation="global"))
    runner.forward([s], [prompt()], comp, comp.window)
    return runner, s


def test_file_round_trip_and_bins(tmp_path) -> None:
    bias = HeadBias(np.arange(12, dtype=np.float32).reshape(2, 2, 3), np.array([0, 100, 1000]))
    bias.save(tmp_path / "b.npz")
    back = HeadBias.load(tmp_path / "b.npz")
    assert np.array_equal(back.bias, bias.bias) and back.pos_bins.tolist() == [0, 100, 1000]
    assert bias.bins_of(torch.tensor([0, 99, 100, 999, 5000])).tolist() == [0, 0, 1, 1, 2]
    seen = torch.tensor([50, 2000])
    assert bias.for_layer(1, seen, 2).tolist() == [[6.0, 9.0], [8.0, 11.0]]  # [S, H]: bins 0 and 2 of layer 1


def test_bad_files_say_what_is_wrong(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="calibrate_head_bias.py"):
        HeadBias.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "nobins.npz", bias=np.zeros((2, 2, 1)))
    with pytest.raises(ValueError, match=r"lacks \['pos_bins'\]"):
        HeadBias.load(tmp_path / "nobins.npz")
    with pytest.raises(ValueError, match="must start at 0 and increase"):
        HeadBias(np.zeros((1, 1, 2)), np.array([0, 0]))
    with pytest.raises(ValueError, match=r"\[num_layers, num_kv_heads, num_bins\]"):
        HeadBias(np.zeros((2, 2)), np.array([0]))


def test_bias_adds_to_lfu_ranks_and_moves_the_global_budget(tiny_llama, tmp_path) -> None:
    """A large bias on one head of layer 0 lifts its ranks by exactly that much, and the global threshold then
    gives that head every token the others' protected windows leave it, while the uniform split is unchanged
    (an offset per head does not reorder a head's own slots)."""
    bias = np.zeros((2, 2, 2), dtype=np.float32)
    bias[0, 1, 0] = 100.0  # lengths < 1000: the prompt's bin
    bias[0, 0, 1] = -100.0  # another bin: must not apply
    HeadBias(bias, np.array([0, 1000])).save(tmp_path / "b.npz")
    plain, biased = LFUPolicy(), LFUPolicy(head_bias=str(tmp_path / "b.npz"))
    runner, s = prefilled(tiny_llama, plain)
    view = runner.cache.view(0, [s], with_kv=False)
    seen = torch.as_tensor(runner.cache.seen[[s]])
    diff = biased.rank(view, seen) - plain.rank(view, seen)
    assert torch.allclose(diff[0, 0], torch.zeros(())) and torch.allclose(diff[0, 1], torch.full((), 100.0))

    kept = {}
    for name, policy in (("plain", plain), ("biased", biased)):
        for allocation in ("global", "uniform"):
            runner, s = prefilled(tiny_llama, policy)
            Compressor(policy, Budget(ratio=4, protected_window=8, allocation=allocation)).compress(runner.cache, [s])
            kept[name, allocation] = runner.cache.lengths[:, s].tolist()
    total = PROMPT  # 4 heads x PROMPT / 4
    others = [n for i, row in enumerate(kept["biased", "global"]) for j, n in enumerate(row) if (i, j) != (0, 1)]
    assert kept["biased", "global"][0][1] == total - sum(others) > kept["plain", "global"][0][1]
    assert max(others) <= 16  # protected window (8) rounded to a block
    assert kept["biased", "uniform"] == kept["plain", "uniform"]


def test_calibrated_bias_gives_each_head_its_uniform_share_on_its_prompt(tiny_llama, script_module, tmp_path) -> None:
    """Calibrated on one prompt, the biased global threshold on that prompt keeps about a uniform split per head
    (within a block), where the unbiased one does not."""
    calibrate = script_module("calibrate_head_bias")
    runner = ModelRunner(tiny_llama, make_cache(tiny_llama, 1, PROMPT))
    per_head, pooled = calibrate.head_quantiles(runner, LFUPolicy(), prompt(), 4.0, 8)
    assert runner.cache.num_free_seqs == 1  # the calibration sequence was released
    HeadBias((pooled - per_head)[..., None], np.array([0])).save(tmp_path / "b.npz")
    kept = {}
    for name, policy, allocation in (
        ("uniform", LFUPolicy(), "uniform"),
        ("global", LFUPolicy(), "global"),
        ("biased", LFUPolicy(head_bias=str(tmp_path / "b.npz")), "global"),
    ):
        runner, s = prefilled(tiny_llama, policy)
        Compressor(policy, Budget(ratio=4, protected_window=8, allocation=allocation)).compress(runner.cache, [s])
        kept[name] = runner.cache.lengths[:, s].astype(int)
    off = {name: int(np.abs(kept[name] - kept["uniform"]).max()) for name in ("global", "biased")}
    assert off["biased"] <= 16 < off["global"], off


def test_calibration_script_writes_a_bias_the_policy_loads(smollm2, script_module, tmp_path) -> None:
    calibrate = script_module("calibrate_head_bias")
    filler = " ".join(f"The box number {i} is red and the lamp number {i} is blue." for i in range(30))
    with (tmp_path / "cal.jsonl").open("w") as f:
        for i in range(2):
            f.write(json.dumps({"context": filler, "question": f" What colour is box {i}?", "answers": ["red"]}) + "\n")
    out = tmp_path / "bias.npz"
    assert (
        calibrate.main(
            [
                "--path",
                str(tmp_path / "cal.jsonl"),
                "--out",
                str(out),
                "--ratio",
                "4",
                "--protected",
                "8",
                "--bins",
                "0,4096",
            ]
        )
        == 0
    )
    bias = HeadBias.load(out)
    assert bias.bias.shape == (30, 3, 2) and np.array_equal(bias.bias[..., 0], bias.bias[..., 1])  # empty bin copied
    assert np.abs(bias.bias).max() > 0
    LFUPolicy(head_bias=str(out))  # loads
    assert calibrate.main(["--path", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
