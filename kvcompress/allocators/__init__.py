"""Allocators: how many tokens each (layer, kv_head) keeps. Selected by ``budget.allocation``, parameterised by
``budget.allocator_args`` (the allocator dataclass's fields, e.g. ``{floor: 0.2, normalize: sum}`` for global)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kvcompress.allocators.adakv import AdaKVAllocator
from kvcompress.allocators.base import Allocator
from kvcompress.allocators.global_threshold import GlobalAllocator
from kvcompress.allocators.pyramid import PyramidAllocator
from kvcompress.allocators.uniform import UniformAllocator

ALLOCATORS: dict[str, type[Allocator]] = {
    "uniform": UniformAllocator,
    "pyramid": PyramidAllocator,
    "adakv": AdaKVAllocator,
    "global": GlobalAllocator,
}


def build_allocator(name: str, args: Mapping[str, Any] | None = None) -> Allocator:
    """The allocator registered under ``name``, built with ``args`` (its dataclass fields); the errors list the
    accepted names / fields."""
    if name not in ALLOCATORS:
        raise ValueError(f"unknown budget.allocation {name!r}; accepted: {', '.join(ALLOCATORS)}")
    cls = ALLOCATORS[name]
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [key for key in args or {} if key not in fields]
    if unknown:
        accepted = ", ".join(fields) or "none (it takes no parameters)"
        raise ValueError(
            f"budget.allocator_args: allocation {name!r} has no field {unknown[0]!r}; its fields: {accepted}"
        )
    return cls(**(args or {}))


__all__ = ["ALLOCATORS", "Allocator", "build_allocator"]
