"""Backend selection for the kvcompress kernels.

Every op in this package exists twice: a Triton kernel (``*_triton``) and a plain PyTorch reference
(``*_torch``) with the same signature. The dispatcher (the op's plain name) picks one per call:

* ``"auto"`` (default): Triton for CUDA tensors, PyTorch for CPU tensors.
* ``"triton"``: always Triton. On CPU tensors this only works under the Triton interpreter
  (``TRITON_INTERPRET=1`` set before ``triton`` is imported); otherwise a ``RuntimeError`` explains why.
* ``"torch"``: always the PyTorch reference.

The initial value comes from the environment variable ``KVCOMPRESS_KERNEL_BACKEND``; ``set_backend``
overrides it for the rest of the process, and ``use_backend`` overrides it inside a ``with`` block.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import numpy as np
import torch
import triton
import triton.language as tl

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "KVCOMPRESS_KERNEL_BACKEND"

_backend: str | None = None  # None: read ENV_VAR lazily (it may be set after import)


def _validate(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    return name


def set_backend(name: str) -> None:
    """Select the kernel backend for this process: ``"auto"``, ``"triton"`` or ``"torch"``."""
    global _backend
    _backend = _validate(name)


def get_backend() -> str:
    """The configured backend name (``set_backend`` wins over ``$KVCOMPRESS_KERNEL_BACKEND``)."""
    if _backend is not None:
        return _backend
    return _validate(os.environ.get(ENV_VAR, "auto"))


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily select a backend (restores the previous setting on exit)."""
    global _backend
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        _backend = previous


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(device: torch.device) -> bool:
    """Decide whether an op whose tensors live on ``device`` runs the Triton kernel.

    Raises ``RuntimeError`` when Triton is forced on a non-CUDA device without the interpreter, rather
    than letting Triton fail later with a less obvious message.
    """
    backend = get_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda"
    if device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"kernel backend 'triton' was forced for {device.type} tensors, but Triton only runs them under "
            "the interpreter: set TRITON_INTERPRET=1 before importing triton, or use backend 'auto'/'torch'."
        )
    if device.type != "cuda" and (problem := interpreter_problem()):
        raise RuntimeError(problem)
    return True


@triton.jit
def _count_to(n_ptr, out_ptr):
    """``out[0] = n[0]`` by a loop whose bound is a loaded value, as every kernel's key-tile loop has."""
    total = 0
    for _ in range(0, tl.load(n_ptr)):
        total += 1
    tl.store(out_ptr, total)


@functools.cache
def interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run the kernels, or None when it can.

    Triton 3.6's interpreter turns a loop bound into a Python int with ``int()`` of a one-element array, which
    NumPy >= 2.4 refuses; later Triton releases (3.9 here) squeeze it first. Probed by running a tiny kernel, so
    that the answer does not hang on version numbers.
    """
    if not interpreter_enabled():
        return "TRITON_INTERPRET=1 is not set, so Triton compiles kernels for a GPU instead of interpreting them"
    n = torch.tensor([3], dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_to[(1,)](n, out)
    except Exception as err:  # the interpreter wraps the TypeError in its InterpreterError
        return (
            f"Triton {triton.__version__}'s interpreter cannot run loops over loaded bounds with NumPy "
            f"{np.__version__} ({err}); for TRITON_INTERPRET=1 runs use a newer Triton (3.9 works) or NumPy < 2.4"
        )
    return None if int(out) == 3 else f"Triton {triton.__version__}'s interpreter miscounts a loop ({int(out)} != 3)"
