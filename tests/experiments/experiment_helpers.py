"""Readers for a run directory's output files, shared by the experiment tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_predictions(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``predictions.jsonl`` in ``run_dir``."""
    lines = (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The ``summary.json`` of ``run_dir``."""
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
