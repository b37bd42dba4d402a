"""Kernel-test setup: Triton runs in its CPU interpreter when there is no GPU, compiled on CUDA tensors otherwise.

``TRITON_INTERPRET`` must be set before ``triton`` is first imported (``@triton.jit`` reads it when a
kernel is defined), so this happens at conftest import time, before any test module imports the kernels.
The ``device`` fixture is where the Triton tests put their tensors: CUDA when present (so a GPU run checks the
compiled kernels), else the CPU (interpreter). If ``kvcompress_kernels`` is not installed yet (pyproject maps
``kernels/`` to it), it is registered from the repository's ``kernels/`` directory so the tests still import it
by its real name.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if importlib.util.find_spec("kvcompress_kernels") is None:  # pragma: no cover - only before `pip install -e .`
    _pkg_dir = Path(__file__).resolve().parents[2] / "kernels"
    _spec = importlib.util.spec_from_file_location(
        "kvcompress_kernels", _pkg_dir / "__init__.py", submodule_search_locations=[str(_pkg_dir)]
    )
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kvcompress_kernels"] = _module
    _spec.loader.exec_module(_module)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the Triton kernels are tested on: ``cuda`` when available, else ``cpu`` (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
