"""``logger=wandb`` logs offline into the run directory: summary metrics, per-sample table, chart axes."""

from __future__ import annotations

import json
from pathlib import Path

from experiment_helpers import read_predictions, read_summary
from hydra import compose, initialize_config_dir

from kvcompress.experiment.tracking import SUMMARY_METRICS, log_run

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_offline_run_files_hold_the_summary(run_cli, tiny: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        *tiny,
        "policy=lfu",
        "budget.ratio=2",
        "budget.protected_window=16",
        "logger=wandb",
        f"hydra.run.dir={run_dir}",
        env={"WANDB_SILENT": "true"},
    )
    assert proc.returncode == 0, proc.stderr
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()
    for key in [*SUMMARY_METRICS, "samples"]:
        assert key.encode() in data, key
    for tag in (b"lfu", b"uniform", b"query_aware"):
        assert tag in data
    # the per-sample table is stored beside the record file, one row per prediction
    tables = list(files[0].parent.glob("files/media/table/samples_*.table.json"))
    assert len(tables) == 1
    rows = json.loads(tables[0].read_text())["data"]
    assert [row[0] for row in rows] == [r["sample_id"] for r in read_predictions(run_dir)]


def test_run_summary_in_process(run_cli, tiny: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [*tiny, "policy=lfu", "budget.ratio=2", "budget.protected_window=16", "logger=wandb"]
    assert run_cli(*overrides, f"hydra.run.dir={run_dir}", env={"WANDB_SILENT": "true"}).returncode == 0
    summary, records = read_summary(run_dir), read_predictions(run_dir)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    wandb_dir = tmp_path / "again"
    wandb_dir.mkdir()
    run = log_run(cfg, wandb_dir, "test-group", summary, records)
    try:
        assert run.summary["score"] == summary["score"]
        assert run.summary["compression/logical"] == summary["logical_compression"]
        assert run.summary["compression/physical"] == summary["physical_compression"]
        assert run.summary["kv_bytes/peak"] == summary["kv_bytes_allocated_peak"]
        assert run.summary["tokens_per_s"] == summary["tokens_per_s"]
        assert run.summary["per_task/niah_single"] == summary["per_task"]["niah_single"]["score"]
        assert run.group == "test-group"
        assert set(run.tags) >= {"lfu", "uniform", "niah_single", "query_aware"}
        assert run.config["budget.ratio"] == 2
    finally:
        run.finish()
