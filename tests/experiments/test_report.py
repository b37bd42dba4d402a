"""``scripts/report.py`` on synthetic run directories: fixed 0-100 y-axis, the baseline command when no full-cache
run exists, and no pandas warnings from all-None columns."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[2] / "scripts" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(root: Path, name: str, policy: str, ratio: float, score: float, overrides: list[str]) -> None:
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    summary = {
        "model": "tiny",
        "policy": policy,
        "task": "niah_single",
        "mode": "query_aware",
        "allocation": "uniform",
        "compression_ratio": ratio,
        "logical_compression": ratio * 0.99,
        "physical_compression": ratio * 0.9,
        "score": score,
        "n_samples": 5,
        "kv_bytes_allocated_peak": 1000,
        "wall_s": 1.0,
        "max_cache_tokens": None,
        "baseline_key": "k",
        "full_cache_score": None,
        "complete": True,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_axes_fixed_and_baseline_command_without_full_run(report, tmp_path: Path) -> None:
    for i, (ratio, score) in enumerate([(2, 100.0), (4, 60.0), (8, 50.0)]):
        overrides = ["model=hf", "model.path=/m/tiny", "task.n_samples=5", f"budget.ratio={ratio}", "policy=lfu"]
        _run(tmp_path, f"{i}_lfu", "lfu", ratio, score, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. pandas' fillna downcasting warning on the all-None column
        df = report.collect(tmp_path)
        fig = report.figure(df, tmp_path)
    ax_score, ax_pct = fig.axes
    assert ax_score.get_ylim() == (-2.0, 102.0) and ax_pct.get_ylim() == (-2.0, 102.0)  # not autoscaled to 50-100
    (note,) = [t.get_text() for t in ax_pct.texts]
    assert "no full-cache run" in note
    command = " ".join(note.split())
    assert "python experiments/run.py -m policy=full model=hf model.path=/m/tiny task.n_samples=5 " in command
    assert f"hydra.sweep.dir={tmp_path}" in command and "budget.ratio" not in command


def test_full_run_fills_pct_and_no_note(report, tmp_path: Path) -> None:
    _run(tmp_path, "0_full", "full", 1, 80.0, ["policy=full"])
    _run(tmp_path, "1_lfu", "lfu", 4, 40.0, ["policy=lfu"])
    df = report.collect(tmp_path)
    assert df.loc[df["policy"] == "lfu", "pct_of_full"].item() == 50.0
    fig = report.figure(df, tmp_path)
    assert not fig.axes[1].texts and fig.axes[0].get_ylim() == (-2.0, 102.0)
