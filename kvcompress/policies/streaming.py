"""StreamingLLM: keep the first ``sinks`` tokens and the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcompress.cache.paged import HeadView
from kvcompress.policies.base import Policy


@dataclass
class StreamingPolicy(Policy):
    """Rank = position, so the budget keeps the most recent tokens; attention sinks are always kept."""

    n_sinks: int = 4
    allocations: ClassVar[tuple[str, ...]] = ("uniform", "pyramid")

    def __post_init__(self) -> None:
        self.sinks = self.n_sinks

    def rank(self, view: HeadView, seen: torch.Tensor) -> torch.Tensor:
        return view.positions.float()
