"""Files a run leaves in its directory: ``predictions.jsonl`` (durable, resumable), ``summary.json`` (atomic) and,
with ``fidelity=true``, ``fidelity.jsonl`` (as durable and resumable as the predictions).

``predictions.jsonl`` gets one line per finished sample, flushed and fsync'd at once, so a run killed at any
point keeps every completed sample. Re-running the same config into the same directory reads it back and skips
those samples; a torn last line (killed mid-write) is cut off first. ``summary.json`` is written only when every
sample is done, through a temporary file and ``os.replace``, so its presence with ``complete: true`` means the run
finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvcompress.experiment.prompts import ExperimentError

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
FIDELITY = "fidelity.jsonl"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so readers see either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a completed run in ``run_dir``, else None."""
    summary = read_json(run_dir / SUMMARY)
    return summary if summary and summary.get("complete") else None


def read_records(run_dir: Path, name: str = PREDICTIONS) -> list[dict[str, Any]]:
    """The per-sample records of ``run_dir/<name>`` (the last one per sample id), in file order; none when the
    file does not exist."""
    path = run_dir / name
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    by_id = {r["sample_id"]: r for r in (json.loads(line) for line in lines if line.strip())}
    return list(by_id.values())


class PredictionsLog:
    """Append-only ``predictions.jsonl`` of one run (or another per-sample file ``name``: ``fidelity.jsonl``),
    tagged with the run's config fingerprint.

    Opening an existing file loads its records (keyed by ``sample_id``); records written under a different
    fingerprint mean the directory belongs to another config, which is refused rather than mixed.
    """

    def __init__(self, run_dir: Path, fingerprint: str, name: str = PREDICTIONS) -> None:
        self.path = run_dir / name
        self.fingerprint = fingerprint
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line torn by a kill mid-write: drop it
            with self.path.open("r+b") as handle:
                handle.truncate(end)
        for lineno, line in enumerate(data[:end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ExperimentError(f"{self.path}:{lineno}: unreadable prediction record ({err})") from err
            if record.get("config_hash") != self.fingerprint:
                raise ExperimentError(
                    f"{self.path} holds predictions of a different config (hash {record.get('config_hash')} != "
                    f"{self.fingerprint}); use a new hydra.run.dir or delete the file"
                )
            self.records[record["sample_id"]] = record

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.records

    def append(self, record: dict[str, Any]) -> None:
        """Add one sample's record and make it durable before returning."""
        record = {**record, "config_hash": self.fingerprint}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records[record["sample_id"]] = record

    def ordered(self, sample_ids: Iterable[str]) -> list[dict[str, Any]]:
        """Records of ``sample_ids`` in that order (all must be present)."""
        return [self.records[s] for s in sample_ids]


class BaselineStore:
    """Full-cache scores keyed by (model, task config, mode, seed), one JSON file per key in ``directory``.

    Every complete run whose cache was not compressed (``policy=full`` or ratio 1) records its score here; a
    compressed run with the same key reads it as ``full_cache_score``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> float | None:
        data = read_json(self._path(key))
        return None if data is None else data.get("score")

    def source(self, key: str) -> Path | None:
        """The run directory the stored score of ``key`` came from (its predictions are the full cache's answers)."""
        data = read_json(self._path(key))
        return Path(data["source"]) if data and data.get("source") else None

    def put(self, key: str, score: float, source: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._path(key), {"score": score, "source": source})
