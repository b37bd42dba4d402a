"""Sweep bookkeeping for ``experiments/run.py``: resumable default directories, a closing summary, Ctrl-C.

:class:`SweepCallback` is a Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``); it runs in the process
that launches the jobs, whatever the launcher:

* ``on_multirun_start``: a sweep whose ``hydra.sweep.dir`` is still the config's timestamped default is moved to
  ``multirun/<its overrides>`` (:func:`sweep_name`), so the same command run again resumes the same directory.
  The directory is pinned as a ``hydra.sweep.dir=...`` override, which Hydra applies to every job it composes.
  It also exports a sweep id (:data:`SWEEP_ID_ENV`) that the jobs copy into their status files.
* every job writes ``job_status.json`` (:func:`write_status`): ``ran``, ``skipped`` (already complete) or
  ``failed`` with its one-line reason;
* ``on_multirun_end``: :func:`sweep_summary` reads the status files of this sweep id and prints
  ``ran / skipped as complete / failed`` with each failure's reason; :func:`exit_status` is then non-zero.

:func:`interrupted_message` is the one line ``experiments/run.py`` prints on Ctrl-C: what finished and the exact
command that resumes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from kvcompress.experiment.records import PREDICTIONS, read_json, write_json_atomic

STATUS = "job_status.json"
ERROR = "error.txt"
SWEEP_ID_ENV = "KVCOMPRESS_SWEEP_ID"
# the config.yaml default that marks "no directory chosen": such sweeps get a name from their overrides
TIMESTAMP_DIR = "multirun/${now:%Y-%m-%d_%H-%M-%S}"
# override keys that do not change results and stay out of the directory name (paths are kept by their last part)
NAME_EXCLUDE = ("logger", "progress", "threads", "baselines_dir", "hydra/launcher", "hydra.launcher.")
NAME_MAX = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@-]+")


@dataclass
class LaunchState:
    """What the launching process knows about the current run or sweep (read by the Ctrl-C handler)."""

    mode: str | None = None  # "run" | "multirun"
    directory: Path | None = None
    sweep_id: str | None = None
    pinned: bool = False  # hydra.sweep.dir was chosen here, from the overrides
    failed: int = 0


STATE = LaunchState()


def sweep_name(task_overrides: list[str]) -> str:
    """A directory name for a sweep from its command-line overrides: sorted, bookkeeping keys left out.

    ``["policy=full,lfu", "budget.ratio=2,4", "model.path=/m/qwen"]`` ->
    ``budget.ratio=2,4_model.path=qwen_policy=full,lfu``; no overrides -> ``defaults``. Names longer than
    :data:`NAME_MAX` are cut and end in a hash of the whole.
    """
    parts = []
    for item in sorted(task_overrides):
        key, _, value = item.partition("=")
        bare = key.lstrip("+~")
        if bare.startswith(NAME_EXCLUDE) or bare in NAME_EXCLUDE:
            continue
        if bare.endswith(".path") or bare.endswith("_dir") or "/" in value:  # a file (summary_offset, head_bias)
            value = Path(value.rstrip("/")).name
        parts.append(_UNSAFE.sub("_", f"{key}={value}" if value or "=" in item else key).strip("_"))
    name = "_".join(p for p in parts if p) or "defaults"
    if len(name) > NAME_MAX:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: NAME_MAX - 9]}-{digest}"
    return name


def write_status(job_dir: Path, status: str, reason: str | None = None) -> None:
    """Record how this job ended in ``job_dir/job_status.json`` (``ran``, ``skipped`` or ``failed``)."""
    write_json_atomic(
        job_dir / STATUS,
        {"status": status, "reason": reason, "sweep_id": os.environ.get(SWEEP_ID_ENV), "time": time.time()},
    )


def clear_stale(job_dir: Path) -> None:
    """Remove the status and ``error.txt`` an earlier attempt left in ``job_dir``."""
    for name in (STATUS, ERROR):
        (job_dir / name).unlink(missing_ok=True)


def job_statuses(sweep_dir: Path, sweep_id: str | None) -> dict[str, list[tuple[str, str | None]]]:
    """``{status: [(job dir name, reason), ...]}`` of the jobs below ``sweep_dir`` written under ``sweep_id``."""
    out: dict[str, list[tuple[str, str | None]]] = {"ran": [], "skipped": [], "failed": []}
    for path in sorted(sweep_dir.glob(f"*/{STATUS}"), key=lambda p: _job_number(p.parent.name)):
        data = read_json(path)
        if data and data.get("sweep_id") == sweep_id and data.get("status") in out:
            out[data["status"]].append((path.parent.name, data.get("reason")))
    return out


def _job_number(name: str) -> tuple[int, str]:
    head = name.split("_", 1)[0]
    return (int(head), name) if head.isdigit() else (sys.maxsize, name)


def count_line(statuses: dict[str, list[tuple[str, str | None]]]) -> str:
    """``3 ran, 2 skipped as complete, 1 failed``."""
    return (
        f"{len(statuses['ran'])} ran, {len(statuses['skipped'])} skipped as complete, {len(statuses['failed'])} failed"
    )


def sweep_summary(sweep_dir: Path, sweep_id: str | None) -> tuple[list[str], int]:
    """The closing lines of a sweep and its number of failed jobs."""
    statuses = job_statuses(sweep_dir, sweep_id)
    lines = [f"sweep {sweep_dir}: {count_line(statuses)}"]
    lines += [f"  failed {name}: {reason}" for name, reason in statuses["failed"]]
    return lines, len(statuses["failed"])


def resume_command(argv: list[str] | None = None, extra: list[str] | None = None) -> str:
    """The command line that re-runs this invocation (plus ``extra`` overrides), shell-quoted."""
    argv = list(sys.argv if argv is None else argv)
    return shlex.join(["python", *argv, *(extra or [])])


def _has_override(argv: list[str], key: str) -> bool:
    return any(a.lstrip("+").startswith(f"{key}=") for a in argv)


def interrupted_message(argv: list[str] | None = None) -> str:
    """One line after Ctrl-C: what is finished and the exact command that resumes."""
    argv = list(sys.argv if argv is None else argv)
    if STATE.mode == "multirun" and STATE.directory is not None:
        done = count_line(job_statuses(STATE.directory, STATE.sweep_id))
        extra = [] if STATE.pinned or _has_override(argv, "hydra.sweep.dir") else [f"hydra.sweep.dir={STATE.directory}"]
        return (
            f"interrupted: sweep {STATE.directory}: {done} before the interrupt (finished samples are kept); "
            f"resume with: {resume_command(argv, extra)}"
        )
    if STATE.mode == "run" and STATE.directory is not None:
        preds = STATE.directory / PREDICTIONS
        n = sum(1 for line in preds.read_text(encoding="utf-8").splitlines() if line.strip()) if preds.exists() else 0
        extra = [] if _has_override(argv, "hydra.run.dir") else [f"hydra.run.dir={STATE.directory}"]
        return f"interrupted: {STATE.directory} keeps {n} finished samples; resume with: {resume_command(argv, extra)}"
    return "interrupted before any run started"


def exit_status() -> int:
    """1 when the sweep that just ended had a failed job, else 0."""
    return 1 if STATE.failed else 0


class SweepCallback(Callback):
    """Hydra callback: default sweep directory from the overrides, sweep id, closing summary (module docstring)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        STATE.mode, STATE.directory = "run", Path(str(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        raw = OmegaConf.to_container(config.hydra.sweep, resolve=False)["dir"]
        STATE.pinned = raw == TIMESTAMP_DIR
        if STATE.pinned:
            task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
            directory = f"multirun/{sweep_name([str(t) for t in task])}"
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.sweep.dir = directory
                # the jobs are composed again from the overrides: this pins the directory in every job too
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{directory}'")
        STATE.mode, STATE.directory = "multirun", Path(str(config.hydra.sweep.dir))
        STATE.sweep_id = os.environ[SWEEP_ID_ENV] = uuid.uuid4().hex[:12]
        STATE.failed = 0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        lines, STATE.failed = sweep_summary(Path(str(config.hydra.sweep.dir)), STATE.sweep_id)
        print("\n".join(lines), flush=True)
