"""Shared fixtures: the embedded SmolLM2 tokenizer (no download) and fixture paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="session")
def tokenizer(smollm2_tokenizer: Any) -> Any:
    """The embedded model's tokenizer (see the root conftest)."""
    return smollm2_tokenizer


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``tests/fixtures``."""
    return FIXTURES
