"""Knorm: keep keys with the smallest L2 norm (low-norm keys tend to draw attention)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcompress.cache.paged import HeadView
from kvcompress.policies.base import Policy


@dataclass
class KnormPolicy(Policy):
    """Rank = -‖k‖."""

    needs_kv: ClassVar[bool] = True

    def rank(self, view: HeadView, seen: torch.Tensor) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)
