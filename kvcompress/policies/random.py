"""Random eviction: the floor every policy should beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompress.cache.paged import HeadView
from kvcompress.policies.base import Policy


@dataclass
class RandomPolicy(Policy):
    """Rank = uniform noise from a seeded generator."""

    seed: int = 0

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    def rank(self, view: HeadView, seen: torch.Tensor) -> torch.Tensor:
        return torch.rand(view.valid.shape, generator=self._gen).to(view.valid.device)
