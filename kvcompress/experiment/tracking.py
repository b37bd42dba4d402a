"""Weights & Biases logging of a finished run (``logger=wandb``; offline unless ``logger.mode`` says otherwise).

The run lives in ``<run dir>/wandb/``; ``wandb sync <run dir>/wandb/offline-run-*`` uploads it later. Summary
metrics go into ``run.summary``; the per-sample records become a ``wandb.Table``; one logged step per run with
``compression/logical`` as its x-axis (``define_metric``) lets a project chart score against compression,
grouped by the sweep (``group``) and coloured by policy.

A run's wandb id is derived from its directory and config hash (:func:`wandb_run_id`), so logging the same
finished run again (``logger=wandb`` on a re-run, or ``scripts/report.py --wandb``) updates one wandb run rather
than adding a copy; :func:`log_finished_run` logs a run from its files alone (``.hydra/config.yaml``,
``summary.json``, ``predictions.jsonl``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kvcompress.experiment.records import finished_summary, read_records

SUMMARY_METRICS = {
    "score": "score",
    "compression/nominal": "compression_ratio",
    "compression/logical": "logical_compression",
    "compression/physical": "physical_compression",
    "kv_bytes/peak": "kv_bytes_allocated_peak",
    "kv_bytes/mean": "kv_bytes_mean",
    "tokens_per_s": "tokens_per_s",
    "prefill_tokens_per_s": "prefill_tokens_per_s",
    "wall_s": "wall_s",
    "answer/nll": "answer_nll",
    "answer/match": "answer_match",
    "answer/worst": "answer_worst",
}
TABLE_COLUMNS = (
    "sample_id",
    "task",
    "prediction",
    "answers",
    "score",
    "prompt_tokens",
    "logical_compression",
    "physical_compression",
    "kv_bytes",
    "time_s",
)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are kept as values)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def wandb_run_id(run_dir: Path, summary: dict[str, Any]) -> str:
    """A stable wandb id for the run in ``run_dir``: its config hash and a hash of the directory's absolute path."""
    where = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]
    return f"{summary.get('config_hash', 'nohash')}-{where}"


def already_logged(run_dir: Path, run_id: str, mode: str) -> bool:
    """Whether ``run_dir/wandb`` holds a run with this id in this mode (``offline-run-*`` or ``run-*``)."""
    prefix = "offline-run" if mode == "offline" else "run"
    return any((run_dir / "wandb").glob(f"{prefix}-*-{run_id}"))


def log_run(
    cfg: DictConfig,
    run_dir: Path,
    group: str,
    summary: dict[str, Any],
    records: list[dict[str, Any]],
    run_id: str | None = None,
) -> Any:
    """Create the wandb run and log summary, table and chart point; returns the run (the caller finishes it).

    ``run_id`` defaults to :func:`wandb_run_id`. ``run.summary`` can only be read back before ``run.finish()``.
    """
    import wandb  # imported lazily: logger=none never pays its import time

    logger_cfg = cfg.logger
    config = flatten({k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "logger"})
    run = wandb.init(
        mode=logger_cfg.mode,
        dir=str(run_dir),
        project=logger_cfg.project,
        entity=logger_cfg.get("entity"),
        group=logger_cfg.get("group") or group,
        name=f"{summary['policy']}-x{summary['compression_ratio']:g}-{summary['task']}-s{summary['seed']}",
        tags=[
            summary["policy"],
            summary["allocation"],
            summary["task"],
            summary["mode"],
            *(logger_cfg.get("tags") or []),
        ],
        config={**config, "policy.name": summary["policy"]},
        id=run_id or wandb_run_id(run_dir, summary),
        resume="allow",
        reinit="finish_previous",
    )
    run.define_metric("compression/logical")
    run.define_metric("score", step_metric="compression/logical")
    run.define_metric("score_pct_of_full", step_metric="compression/logical")
    point = {key: summary[src] for key, src in SUMMARY_METRICS.items() if summary.get(src) is not None}
    if summary.get("score_pct_of_full") is not None:
        point["score_pct_of_full"] = summary["score_pct_of_full"]
    point["samples"] = wandb.Table(
        columns=list(TABLE_COLUMNS), data=[[_cell(r.get(c)) for c in TABLE_COLUMNS] for r in records]
    )
    run.log(point)
    for key, value in point.items():
        if key != "samples":
            run.summary[key] = value
    run.summary["full_cache_score"] = summary.get("full_cache_score")
    for task, entry in summary["per_task"].items():
        run.summary[f"per_task/{task}"] = entry["score"]
    return run


def log_finished_run(
    run_dir: Path, group: str, mode: str, project: str, entity: str | None = None, force: bool = False
) -> Path | None:
    """Log a finished run from its files to wandb (``mode`` offline/online); returns its local wandb directory.

    Returns None, logging nothing, when the run is not complete or (unless ``force``) was already logged in this
    mode. Config: the run's ``.hydra/config.yaml`` with ``logger`` set to wandb/``mode``/``project``.
    """
    summary = finished_summary(run_dir)
    config_path = run_dir / ".hydra" / "config.yaml"
    if summary is None or not config_path.is_file():
        return None
    run_id = wandb_run_id(run_dir, summary)
    if not force and already_logged(run_dir, run_id, mode):
        return None
    cfg = OmegaConf.load(config_path)
    cfg.logger = {"name": "wandb", "mode": mode, "project": project, "entity": entity, "group": None, "tags": []}
    run = log_run(cfg, run_dir, group, summary, read_records(run_dir), run_id)
    run.finish()
    return Path(run.dir).parent


def _cell(value: Any) -> Any:
    return ", ".join(value) if isinstance(value, list) else value
