"""KeyDiff: keep keys that differ most from the head's average key direction (attention-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvcompress.cache.paged import HeadView
from kvcompress.policies.base import Policy


@dataclass
class KeyDiffPolicy(Policy):
    """Rank = -cos(k, mean of the head's normalised keys)."""

    needs_kv: ClassVar[bool] = True

    def rank(self, view: HeadView, seen: torch.Tensor) -> torch.Tensor:
        k = F.normalize(view.keys.float(), dim=-1) * view.valid[..., None]
        anchor = F.normalize(k.sum(-2) / view.valid.sum(-1, keepdim=True).clamp_min(1), dim=-1)  # [S, H, D]
        return -(k * anchor[..., None, :]).sum(-1)
