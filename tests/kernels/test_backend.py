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


def test_interpreter_probe_and_its_error(monkeypatch):
    """The probe runs a real kernel under the interpreter (CI's Triton passes it); a failing probe becomes the
    error of any forced-Triton call on CPU instead of an interpreter traceback deep inside a kernel."""
    problem = backend.interpreter_problem()
    if backend.interpreter_enabled():  # the test run's own setting, fixed when triton was imported
        assert problem is None or "NumPy" in problem
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backend, "interpreter_problem", lambda: "Triton 0.1's interpreter is broken")
    with use_backend("triton"), pytest.raises(RuntimeError, match="Triton 0.1's interpreter is broken"):
        backend.use_triton(torch.device("cpu"))
    assert backend.use_triton(torch.device("cuda", 0)) is True  # compiled kernels are not the interpreter's
