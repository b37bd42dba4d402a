"""PyramidKV: SnapKV scores with layer budgets that shrink linearly with depth (``budget.allocation=pyramid``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvcompress.policies.snapkv import SnapKVPolicy


@dataclass
class PyramidKVPolicy(SnapKVPolicy):
    """SnapKV scoring restricted to the pyramid allocation."""

    allocations: ClassVar[tuple[str, ...]] = ("pyramid",)
