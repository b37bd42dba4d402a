"""Fixtures for the experiment-layer tests: a tiny random Llama with the embedded tokenizer, and a CLI runner.

The tiny model (2 layers, hidden 64, 2 kv heads, 1024 positions) makes a run take seconds; its answers are
noise, so tests check files, accounting and control flow, not scores. ``experiments/run.py`` is run as a
subprocess, as users run it, so exit codes and printed errors are what a user sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "experiments" / "run.py"
TINY_MAX_POSITIONS = 1024
# the scripts run as subprocesses import kvcompress from this checkout, whatever checkout is installed editable
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    """A random 2-layer Llama saved with the embedded SmolLM2 tokenizer (chat template included)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = smollm2_tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``experiments/run.py`` with overrides in ``tmp_path`` (baselines and outputs stay there)."""

    def run(*overrides: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **(env or {})}
        flags = [o for o in overrides if o.startswith("-")]  # e.g. -m must precede the overrides
        rest = [o for o in overrides if not o.startswith("-")]
        args = [sys.executable, str(RUN), *flags, f"baselines_dir={tmp_path / 'baselines'}", "progress=false", *rest]
        return subprocess.run(args, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def tiny(tiny_model_dir: Path) -> list[str]:
    """Overrides selecting the tiny model and a small needle task."""
    return [
        "model=hf",
        f"model.path={tiny_model_dir}",
        "task=niah_single",
        "task.n_samples=3",
        "task.target_tokens=200",
        "task.max_new_tokens=4",
    ]
