"""Core data types shared by every evaluation task: :class:`Sample`, :class:`Task`, :class:`TaskDataError`."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

T = TypeVar("T")


class TaskDataError(ValueError):
    """Malformed or missing task data. Messages start with ``path:line:`` (or ``path:``) when a file is involved."""


@dataclass
class Sample:
    """One evaluation prompt.

    The model sees ``context + question`` as a single user turn. In query-agnostic mode only ``context`` is
    prefilled and compressed; ``question`` is appended afterwards, so ``context`` ends at a natural boundary.
    """

    sample_id: str  # unique, stable across runs (used to resume)
    context_id: str  # samples sharing one context share it (query-agnostic mode compresses the context once)
    context: str  # the part of the user prompt that gets compressed in query-agnostic mode
    question: str  # the rest of the prompt (appended after compression in query-agnostic mode)
    answers: list[str]
    task: str  # sub-task name for per-task breakdown
    metric: str  # name in kvcompress.tasks.metrics.METRICS
    max_new_tokens: int
    all_classes: list[str] | None = None  # LongBench classification

    @property
    def prompt(self) -> str:
        """The full user prompt: ``context + question``."""
        return self.context + self.question


def spread(items: Sequence[T], n: int | None) -> list[T]:
    """``n`` items spread evenly over ``items`` (so every sub-task of a mixed suite is represented), or all."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


@runtime_checkable
class Task(Protocol):
    """Anything with a ``name`` and a ``samples()`` method returning :class:`Sample` objects."""

    name: str

    def samples(self) -> list[Sample]: ...


def context_id_for(context: str, prefix: str = "ctx") -> str:
    """A stable id derived from the context text, so identical contexts share one id across runs."""
    digest = hashlib.sha1(context.encode("utf-8")).hexdigest()[:16]
    return f"{prefix}-{digest}"
