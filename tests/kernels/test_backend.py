"""Backend selection: set_backend / env var / auto, and the interpreter guard."""

from __future__ import annotations

import pytest
import torch
from kvcompress_kernels import backend, get_backend, set_backend, use_backend


def test_env_var_and_set_backend(monkeypatch):
    monkeypatch.setattr(backend, "_backend", None)
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert get_backend() == "torch"
    monkeypatch.setenv(backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        get_backend()
    set_backend("TRITON")
    assert get_backend() == "triton"
    with pytest.raises(ValueError):
        set_backend("cuda")


def test_auto_picks_by_device(monkeypatch):
    monkeypatch.setattr(backend, "_backend", None)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert get_backend() == "auto"
    assert backend.use_triton(torch.device("cpu")) is False
    assert backend.use_triton(torch.device("cuda", 0)) is True
    with use_backend("torch"):
        assert backend.use_triton(torch.device("cuda", 0)) is False
    assert get_backend() == "auto"


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch):
    with use_backend("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backend.use_triton(torch.device("cpu")) is True
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            backend.use_triton(torch.device("cpu"))
