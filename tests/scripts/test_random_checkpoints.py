"""scripts/build_random_checkpoints.py: the checkpoints load through transformers and kvcompress.model.load_model,
have the geometry they claim, carry a working tokenizer, and are reproducible from their seed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvcompress.model import load_model

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_random_checkpoints.py"
TEXT = "The pass key is 71432. Remember it."


@pytest.fixture(scope="module")
def script(script_module):
    return script_module("build_random_checkpoints")


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


def test_tiny_loads_and_is_seeded(script, smollm2_tokenizer, tmp_path):
    a = script.build("tiny", tmp_path / "a", smollm2_tokenizer, torch.bfloat16, seed=0, max_shard_bytes=1 << 30)
    b = script.build("tiny", tmp_path / "b", smollm2_tokenizer, torch.bfloat16, seed=0, max_shard_bytes=1 << 30)
    c = script.build("tiny", tmp_path / "c", smollm2_tokenizer, torch.bfloat16, seed=1, max_shard_bytes=1 << 30)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    wa, wc = _weights(a), _weights(c)
    assert not torch.equal(wa["model.layers.0.self_attn.q_proj.weight"], wc["model.layers.0.self_attn.q_proj.weight"])
    assert "lm_head.weight" not in wa  # tied: stored once
    assert torch.all(wa["model.norm.weight"] == 1)
    assert wa["model.embed_tokens.weight"].float().std().item() == pytest.approx(0.02, rel=0.05)

    model, info = AutoModelForCausalLM.from_pretrained(a, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert model.dtype == torch.bfloat16 and model.config.num_key_value_heads == 2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    loaded = load_model(str(a))  # kvcompress's own loader: fp32, tokenizer from the directory
    ids = loaded.tokenizer(TEXT, return_tensors="pt").input_ids
    assert ids.tolist() == smollm2_tokenizer(TEXT, return_tensors="pt").input_ids.tolist()
    logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_cli_smollm2_geometry_with_carried_tokenizer(smollm2_tokenizer, tmp_path):
    """The CLI path of a node: export the tokenizer, build from the carried copy, sharded; SmolLM2's own geometry."""
    run = lambda *args: subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, check=True
    )
    run("--tokenizer-only", str(tmp_path / "tok"))
    run(
        "--out",
        str(tmp_path / "ck"),
        "--names",
        "smollm2",
        "--tokenizer",
        str(tmp_path / "tok"),
        "--max-shard-mb",
        "100",
    )
    ckpt = tmp_path / "ck" / "smollm2"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # 270 MB of bf16 in 100 MiB shards

    loaded = load_model(str(ckpt), dtype=torch.bfloat16)
    cfg = loaded.model.config
    geometry = (
        cfg.model_type,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.vocab_size,
        cfg.tie_word_embeddings,
    )
    assert geometry == ("llama", 30, 576, 1536, 9, 3, 64, 49152, True)
    assert sum(p.numel() for p in loaded.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert cfg.eos_token_id == smollm2_tokenizer.eos_token_id
    carried = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.tokenizer(TEXT).input_ids == carried(TEXT).input_ids == smollm2_tokenizer(TEXT).input_ids
    ids = torch.tensor([loaded.tokenizer(TEXT).input_ids])
    assert torch.isfinite(loaded.model(ids).logits.float()).all()


@pytest.mark.parametrize(
    ("name", "heads", "params"), [("llama8b-w8", (32, 8, 128), 2.148e9), ("qwen-28-4-128", (28, 4, 128), 2.217e9)]
)
def test_large_geometries_on_meta(script, smollm2_tokenizer, name, heads, params):
    """The big checkpoints are only built on GPU nodes; here their configs and tensor lists are checked on meta."""
    config = script.make_config(name, smollm2_tokenizer, torch.bfloat16)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == heads
    assert config.hidden_size == config.num_attention_heads * config.head_dim
    shapes = script.tensor_shapes(config)
    assert sum(s.numel() for s in shapes.values()) == pytest.approx(params, rel=1e-3)
    assert "lm_head.weight" in shapes and len(list(script.shards(shapes, torch.bfloat16, 2 << 30))) >= 2
