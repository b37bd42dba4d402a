"""Task registry: names and build_task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvcompress.tasks import TASKS, Task, build_task
from kvcompress.tasks.jsonl import JsonlTask
from kvcompress.tasks.passkey import Passkey


def test_task_names() -> None:
    assert set(TASKS) == {
        "niah_single",
        "niah_multikey",
        "niah_multivalue",
        "niah_multiquery",
        "variable_tracking",
        "frequent_words",
        "passkey",
        "jsonl",
        "longbench",
        "ruler",
    }


def test_build_task(tokenizer: Any, fixtures_dir: Path) -> None:
    task = build_task("passkey", tokenizer=tokenizer, n_samples=2, target_tokens=300)
    assert isinstance(task, Passkey) and isinstance(task, Task)
    assert [s.task for s in task.samples()] == ["passkey", "passkey"]
    jsonl = build_task("jsonl", path=fixtures_dir / "jsonl" / "valid.jsonl")
    assert isinstance(jsonl, JsonlTask) and len(jsonl.samples()) == 3
    assert build_task("niah_multikey", tokenizer=tokenizer).name == "niah_multikey"


def test_unknown_task_lists_names() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'needle'; accepted: .*niah_single.*passkey.*ruler"):
        build_task("needle")
