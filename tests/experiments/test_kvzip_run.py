"""``policy=kvzip`` through ``experiments/run.py`` on the tiny model: the runner tokenizes the repeat prompt, sizes
the engine for the reconstruction, and records its extra prefill beside the score."""

from __future__ import annotations

from pathlib import Path

import pytest
from experiment_helpers import read_predictions, read_summary


@pytest.mark.parametrize("mode", ["query_agnostic", "query_aware"])
def test_kvzip_run_records_the_reconstruction(run_cli, tiny: list[str], tmp_path: Path, mode: str) -> None:
    run_dir = tmp_path / mode
    proc = run_cli(*tiny, "policy=kvzip", "budget.ratio=2", f"task.mode={mode}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    records = read_predictions(run_dir)
    assert records and all(r["reconstruct_s"] > 0 for r in records)
    for r in records:
        assert r["time_s"] == pytest.approx(r["prefill_s"] + r["decode_s"] + r["compress_s"] + r["reconstruct_s"])
    summary = read_summary(run_dir)
    assert summary["reconstruct_s"] == pytest.approx(sum(r["reconstruct_s"] for r in records))
    assert summary["logical_compression"] > 1.5
