"""``logger=wandb`` logs offline into the run directory: summary metrics, per-sample table, chart axes; the
offline record file is read back with :mod:`kvcompress.experiment.wandb_offline`."""

from __future__ import annotations

import json
from pathlib import Path

from experiment_helpers import read_predictions, read_summary
from hydra import compose, initialize_config_dir

from kvcompress.experiment.tracking import SUMMARY_METRICS, log_run
from kvcompress.experiment.wandb_offline import iter_chunks, read_offline_run

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
    run = read_offline_run(files[0].parent)  # config and summary live only in the record file while offline
    summary = read_summary(run_dir)
    for key, source in SUMMARY_METRICS.items():
        if source.startswith("answer_"):  # answer fidelity: only with fidelity=true
            assert source not in summary and key not in run["summary"], key
            continue
        assert run["summary"][key] == summary[source], key
    assert run["summary"]["per_task/niah_single"] == summary["per_task"]["niah_single"]["score"]
    assert run["summary"]["samples/_type"] == "table-file" and run["summary"]["samples/nrows"] == 3
    assert run["config"]["budget.ratio"] == 2 and run["config"]["policy.name"] == "lfu"
    assert run["config"]["policy.window"] == 32 and "logger.mode" not in run["config"]
    assert run["group"] == "run" and set(run["tags"]) >= {"lfu", "uniform", "niah_single", "query_aware"}
    assert run["name"] == "lfu-x2-niah_single-s0"
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


def test_reader_joins_records_split_across_blocks() -> None:
    import struct
    import zlib

    def chunk(kind: int, payload: bytes) -> bytes:
        return struct.pack("<IHB", zlib.crc32(payload), len(payload), kind) + payload

    header = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    big = bytes(range(256)) * 200  # 51200 bytes: FIRST in block 0, LAST in block 1
    first_len = 32768 - len(header) - 7
    data = header + chunk(2, big[:first_len]) + chunk(4, big[first_len:]) + chunk(1, b"small")
    assert list(iter_chunks(data)) == [big, b"small"]


def test_finished_run_is_logged_when_rerun_with_wandb(run_cli, tiny: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [*tiny, "policy=lfu", "budget.ratio=2", "budget.protected_window=16", f"hydra.run.dir={run_dir}"]
    assert run_cli(*overrides).returncode == 0
    assert not (run_dir / "wandb").exists()
    for _ in range(2):  # the first re-run logs the finished run, the second finds it logged
        proc = run_cli(*overrides, "logger=wandb", env={"WANDB_SILENT": "true"})
        assert proc.returncode == 0 and "already complete, skipping" in proc.stdout + proc.stderr
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    run = read_offline_run(offline)
    assert run["summary"]["score"] == read_summary(run_dir)["score"] and run["summary"]["samples/nrows"] == 3
