"""Multirun sweeps through the joblib and submitit-local launchers, and ``scripts/report.py`` on the result."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from experiment_helpers import read_summary

REPORT = Path(__file__).resolve().parents[2] / "scripts" / "report.py"


def test_joblib_sweep_and_report(run_cli, tiny: list[str], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        *tiny,
        "policy=full,lfu,streaming",
        "budget.ratio=2,4",
        "budget.protected_window=8",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 6
    # readable, flat job directories: number + overrides (paths left out)
    assert len(list(sweep.glob("*_budget.protected_window=8,budget.ratio=4,model=hf,policy=lfu,*/summary.json"))) == 1

    out = subprocess.run(
        [sys.executable, str(REPORT), str(sweep), "--wandb", "offline"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WANDB_SILENT": "true"},
    )
    assert out.returncode == 0, out.stderr
    with (sweep / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6
    assert {r["policy"] for r in rows} == {"full", "lfu", "streaming"}
    full_score = float(next(r for r in rows if r["policy"] == "full")["score"])
    for row in rows:  # every run is compared with the full-cache run of the sweep
        assert float(row["full_cache_score"]) == full_score
    markdown = (sweep / "report.md").read_text()
    for column in ("policy", "allocation", "nominal ratio", "logical compression", "physical compression", "% of full"):
        assert column in markdown
    assert (sweep / "report.png").stat().st_size > 10_000
    (record,) = (sweep / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"score_vs_compression" in record.read_bytes()

    # re-running the same sweep into the same directory skips every finished run
    again = run_cli(
        "-m",
        *tiny,
        "policy=full,lfu,streaming",
        "budget.ratio=2,4",
        "budget.protected_window=8",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
    )
    assert again.returncode == 0
    assert (again.stdout + again.stderr).count("already complete, skipping") == 6


def test_multirun_job_error_does_not_stop_the_sweep(run_cli, tiny: list[str], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", *tiny, "policy=lfu", "budget.ratio=2,100", "budget.protected_window=8", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(*args)
    assert proc.returncode == 1, proc.stderr  # the sweep went on, then says it had a failure
    done, failed = (next(sweep.glob(f"{n}_*")) for n in (0, 1))
    assert read_summary(done)["complete"]
    assert "smaller than the protected tokens" in (failed / "error.txt").read_text()
    assert not (failed / "summary.json").exists()
    assert f"sweep {sweep}: 1 ran, 0 skipped as complete, 1 failed" in proc.stdout
    (reason,) = [line for line in proc.stdout.splitlines() if line.startswith(f"  failed {failed.name}: ")]
    assert "smaller than the protected tokens" in reason

    again = run_cli(*args)  # the finished job is skipped, the failing one fails again
    assert again.returncode == 1
    assert f"sweep {sweep}: 0 ran, 1 skipped as complete, 1 failed" in again.stdout


def test_report_without_runs_fails_cleanly(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPORT), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no complete run" in out.stderr and "Traceback" not in out.stderr


def test_submitit_local_launcher(run_cli, tiny: list[str], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        *tiny,
        "task.n_samples=1",
        "policy=lfu",
        "budget.ratio=2",
        "budget.protected_window=8",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    summary = read_summary(next(sweep.glob("0_*")))
    assert summary["complete"] and summary["n_samples"] == 1
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))  # the job really went through submitit
