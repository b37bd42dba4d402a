"""Task names the experiment runner accepts (``task=<name>``) and :func:`build_task`."""

from __future__ import annotations

from typing import Any

from kvcompress.tasks.base import Task
from kvcompress.tasks.jsonl import JsonlTask
from kvcompress.tasks.longbench import LongBenchTask
from kvcompress.tasks.passkey import Passkey
from kvcompress.tasks.ruler import RULER_TASKS, RulerMix

TASKS: dict[str, type] = {
    **RULER_TASKS,
    "passkey": Passkey,
    "jsonl": JsonlTask,
    "longbench": LongBenchTask,
    "ruler": RulerMix,
}


def build_task(name: str, **kwargs: Any) -> Task:
    """Instantiate task ``name`` with ``kwargs`` (e.g. ``tokenizer``, ``target_tokens``, ``path``, ``data_dir``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; accepted: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)
