"""Allocators: how many tokens each (layer, kv_head) keeps. Selected by ``budget.allocation``."""

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


def build_allocator(name: str) -> Allocator:
    """The allocator registered under ``name``; the error lists the accepted names."""
    if name not in ALLOCATORS:
        raise ValueError(f"unknown budget.allocation {name!r}; accepted: {', '.join(ALLOCATORS)}")
    return ALLOCATORS[name]()


__all__ = ["ALLOCATORS", "Allocator", "build_allocator"]
