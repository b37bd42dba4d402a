"""Weights & Biases logging of a finished run (``logger=wandb``; offline unless ``logger.mode`` says otherwise).

The run lives in ``<run dir>/wandb/``; ``wandb sync <run dir>/wandb/offline-run-*`` uploads it later. Summary
metrics go into ``run.summary``; the per-sample records become a ``wandb.Table``; one logged step per run with
``compression/logical`` as its x-axis (``define_metric``) lets a project chart score against compression,
grouped by the sweep (``group``) and coloured by policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

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


def log_run(cfg: DictConfig, run_dir: Path, group: str, summary: dict[str, Any], records: list[dict[str, Any]]) -> Any:
    """Create the wandb run and log summary, table and chart point; returns the run (the caller finishes it).

    ``run.summary`` can only be read back before ``run.finish()``.
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


def _cell(value: Any) -> Any:
    return ", ".join(value) if isinstance(value, list) else value
