"""Multirun sweeps through the joblib and submitit-local launchers, and ``scripts/report.py`` on the result."""

from __future__ import annotations

import csv
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from experiment_helpers import read_summary

from kvcompress.experiment.sweep import sweep_name
from kvcompress.experiment.wandb_offline import read_offline_run

REPORT = Path(__file__).resolve().parents[2] / "scripts" / "report.py"
RUN = Path(__file__).resolve().parents[2] / "experiments" / "run.py"


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
    # the job statuses written in the joblib workers reach the closing summary
    assert f"sweep {sweep}: 6 ran, 0 skipped as complete, 0 failed" in proc.stdout
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
    # every run is logged from its files, grouped by the sweep, and the report run sits beside them, so one
    # glob catches all of them: <sweep>/*/wandb/offline-run-*
    offline = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert len(offline) == 7 and "wandb: 6 runs logged, 0 already logged" in out.stdout
    (report_run,) = sweep.glob("_report/wandb/offline-run-*")
    assert b"score_vs_compression" in next(report_run.glob("run-*.wandb")).read_bytes()
    job = next(sweep.glob("*policy=lfu*"))
    logged = read_offline_run(next(job.glob("wandb/offline-run-*")))
    assert logged["group"] == sweep.name and logged["summary"]["score"] == read_summary(job)["score"]
    assert logged["config"]["policy.name"] == "lfu" and logged["summary"]["samples/nrows"] == 3

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
    assert f"sweep {sweep}: 1 ran, 0 skipped as complete, 0 failed" in proc.stdout
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))  # the job really went through submitit


def test_plain_sweep_resumes_in_a_directory_named_from_its_overrides(run_cli, tiny: list[str], tmp_path: Path) -> None:
    args = ["-m", *tiny, "task.n_samples=1", "policy=lfu", "budget.ratio=2,0", "budget.protected_window=8"]
    first = run_cli(*args)
    assert first.returncode == 1  # ratio 0 fails: the sweep says so in its exit status
    (sweep,) = (tmp_path / "multirun").iterdir()
    assert sweep.name == sweep_name([a for a in args if a != "-m"]) and "budget.ratio=2,0" in sweep.name
    assert "model.path=tiny-llama" in sweep.name  # paths by their last part
    assert f"sweep multirun/{sweep.name}: 1 ran, 0 skipped as complete, 1 failed" in first.stdout
    assert "budget.ratio must be a number >= 1" in first.stdout
    again = run_cli(*args)
    assert list((tmp_path / "multirun").iterdir()) == [sweep]
    assert "1 skipped as complete, 1 failed" in again.stdout and "1 ran" not in again.stdout


def test_sweep_name_is_stable_and_short() -> None:
    assert sweep_name(["policy=full,lfu", "budget.ratio=2,4", "threads=2", "hydra/launcher=joblib"]) == (
        "budget.ratio=2,4_policy=full,lfu"
    )
    assert sweep_name(["budget.ratio=2,4", "policy=full,lfu"]) == sweep_name(["policy=full,lfu", "budget.ratio=2,4"])
    assert sweep_name([]) == "defaults"
    # a file given by path names the sweep by its file name, so the directory does not nest
    assert sweep_name(["budget.summary_offset=docs/results/slot-share/gap.json"]) == "budget.summary_offset=gap.json"
    long = sweep_name([f"task.opt{i}=value{i}" for i in range(40)])
    assert len(long) <= 120 and long != sweep_name([f"task.opt{i}=value{i}" for i in range(39)])


def test_ctrl_c_prints_what_finished_and_the_resume_command(tiny: list[str], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(RUN), "-m", *tiny, "task.n_samples=40", "policy=full,lfu", "budget.protected_window=8"]
    cmd += [f"baselines_dir={tmp_path / 'baselines'}", "progress=false", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a background job may have SIGINT ignored; a user's terminal does not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while not list(sweep.glob("1_*/predictions.jsonl")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted: sweep {sweep}: 1 ran, 0 skipped as complete, 0 failed before the interrupt")
    command = shlex.split(last.split("resume with: ", 1)[1])
    assert command[0] == "python" and command[1:] == cmd[1:]
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"sweep {sweep}: 1 ran, 1 skipped as complete, 0 failed" in resumed.stdout
    assert read_summary(next(sweep.glob("1_*")))["n_resumed"] >= 1
