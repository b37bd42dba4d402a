"""No compression: the full-cache baseline every other policy is compared against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvcompress.policies.base import Policy


@dataclass
class FullPolicy(Policy):
    """Keeps every token whatever the budget says."""

    evicts: ClassVar[bool] = False
