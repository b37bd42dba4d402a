"""Shared test set-up. TRITON_INTERPRET must be set before any kernel module (triton) is imported."""

import importlib.util
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped (not failed) where there is no CUDA device, so ``-m gpu`` on a GPU node
    selects exactly the checks that need one and the CPU suite still collects them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    """A random 2-layer GQA Llama (6 query heads, 2 kv heads, head_dim 16): no download, runs in milliseconds."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (converted once, then cached). Tests using it skip where the model is not
    installed (e.g. offline GPU nodes, which get random-weight checkpoints instead: docs/GPU.md)."""
    from kvcompress.model import ModelNotFoundError, load_model

    try:
        return load_model("smollm2")
    except ModelNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded model's tokenizer, read straight from its GGUF (seconds; no model weights, no download)."""
    from transformers import AutoTokenizer

    from kvcompress.model import ModelNotFoundError, embedded_gguf

    try:
        gguf = embedded_gguf("smollm2")
    except ModelNotFoundError as err:
        pytest.skip(str(err))
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def script_module():
    """``script_module("quality_table")``: ``scripts/quality_table.py`` imported as a module (scripts/ is no
    package), registered in ``sys.modules`` so its dataclasses resolve their module by name."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    return load
