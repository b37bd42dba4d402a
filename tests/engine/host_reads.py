"""Counting the reads of tensor values back to Python (on CUDA each one is a host sync)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# every Tensor method that hands a tensor's value to the host (on CPU they are the stand-ins for D2H copies)
READS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero", "numpy", "cpu")


@contextlib.contextmanager
def count_host_reads() -> Iterator[list[str]]:
    """Within the block, record the name of every value-reading Tensor call (nested calls count once)."""
    calls: list[str] = []
    depth = [0]
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            if depth[0] == 0:
                calls.append(name)
            depth[0] += 1
            try:
                return fn(self, *args, **kwargs)
            finally:
                depth[0] -= 1

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
