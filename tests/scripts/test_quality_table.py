"""scripts/quality_table.py's table: each cell's % of full, and what of the full cache's score it retained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _row(setup: str, sample: str, ratio: float, score: float) -> dict:
    return {
        "setup": setup,
        "mode": "query_aware",
        "sample_id": sample,
        "ratio": ratio,
        "score": score,
        "logical": ratio,
        "physical": ratio,
    }


def test_table_splits_the_percent_of_full_into_what_was_retained(script_module, tmp_path: Path) -> None:
    qt = script_module("quality_table")
    # full answers s0 and s1 only; at 8x the setup loses s1 and answers s2 and s3, which full misses.
    rows = [_row("full", f"s{i}", 1.0, s) for i, s in enumerate([100.0, 100.0, 0.0, 0.0])]
    rows += [_row("kvzip+global", f"s{i}", 8.0, s) for i, s in enumerate([100.0, 0.0, 100.0, 100.0])]
    rows_path = tmp_path / "rows.jsonl"
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    qt.write_table(rows_path, tmp_path / "table.md", [8.0, 16.0])
    table = (tmp_path / "table.md").read_text()
    assert "### query_aware (full cache: 50.0, n=4)" in table
    assert "| kvzip+global | 75 (150%, retained 50%) [8.0/8.0] | - |" in table


def test_table_without_full_rows_gives_scores_only(script_module, tmp_path: Path) -> None:
    qt = script_module("quality_table")
    rows_path = tmp_path / "rows.jsonl"
    rows_path.write_text(json.dumps(_row("tova", "s0", 4.0, 100.0)) + "\n", encoding="utf-8")
    qt.write_table(rows_path, tmp_path / "table.md", [4.0])
    assert "| tova | 100 (n/a) [4.0/4.0] |" in (tmp_path / "table.md").read_text()


def test_table_of_the_full_cache_alone_says_so(script_module, tmp_path: Path) -> None:
    """``--setups ''`` runs only the full cache: the table gives its score and says no compressed setup ran."""
    qt = script_module("quality_table")
    rows_path = tmp_path / "rows.jsonl"
    rows_path.write_text(json.dumps(_row("full", "s0", 1.0, 100.0)) + "\n", encoding="utf-8")
    qt.write_table(rows_path, tmp_path / "table.md", [])
    table = (tmp_path / "table.md").read_text()
    assert "### query_aware (full cache: 100.0, n=1)" in table and "no compressed setup has run" in table
    assert "| policy |" not in table


def test_table_only_rewrites_the_table_without_running(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "quality_table.py"
    rows = [_row("full", "s0", 1.0, 100.0), _row("tova", "s0", 4.0, 0.0), _row("tova", "s0", 32.0, 100.0)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cmd = [sys.executable, str(script), "--out", str(tmp_path), "--table-only"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # without --ratios the columns are the ratios the rows hold
    assert (
        "| tova | 0 (0%, retained 0%) [4.0/4.0] | 100 (100%, retained 100%) [32.0/32.0] |"
        in (tmp_path / "table.md").read_text()
    )
    missing = subprocess.run([*cmd[:3], str(tmp_path / "none"), *cmd[4:]], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--table-only: no rows in " in missing.stderr
    (tmp_path / "rows.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"side": "kvpress"}) + "\n")
    other = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "rows.jsonl:2: not a quality_table row (missing mode, ratio, sample_id, score, setup)" in other.stderr


def test_ids_pick_samples_by_id_in_suite_order(script_module) -> None:
    from types import SimpleNamespace

    qt = script_module("quality_table")
    samples = [SimpleNamespace(sample_id=f"s{i}") for i in range(5)]
    picked = qt.select_samples(samples, None, "s3, s1")
    assert [s.sample_id for s in picked] == ["s1", "s3"]
    assert [s.sample_id for s in qt.select_samples(samples, 2, None)] == ["s0", "s1"]
    refused = [(2, "s3", "s3 not among the 2 samples"), (None, "s1,x", "x not among"), (None, ",", "no id given")]
    for first, ids, named in refused:
        with pytest.raises(ValueError, match=named) as err:
            qt.select_samples(samples, first, ids)
        assert "s0, s1" in str(err.value)


def test_full_from_takes_the_chosen_samples_full_rows_once(script_module, tmp_path: Path) -> None:
    """``--full-from``: a screen copies the full cache's rows of its samples from the draw's own results instead of
    running the full cache again; rows already in the screen's file, other samples and other setups stay out."""
    from types import SimpleNamespace

    qt = script_module("quality_table")
    rows = [_row("full", f"s{i}", 1.0, 100.0 * i) for i in range(3)] + [_row("kvzip+global", "s1", 4.0, 0.0)]
    samples = [SimpleNamespace(sample_id=i) for i in ("s1", "s2")]
    assert qt.full_rows_from(rows, samples, ["query_aware"], set()) == rows[1:3]
    assert qt.full_rows_from(rows, samples, ["query_aware"], qt.written(rows[1:2])) == rows[2:3]
    assert qt.full_rows_from(rows, samples, ["query_agnostic"], set()) == []
    assert qt.full_rows_from(rows + rows[1:2], samples, ["query_aware"], set()) == rows[1:3]  # a row copied once


def test_full_from_a_directory_without_rows_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "quality_table.py"
    cmd = [sys.executable, str(script), "--out", str(tmp_path / "out"), "--full-from", str(tmp_path / "nowhere")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"--full-from: no {tmp_path / 'nowhere' / 'rows.jsonl'} (give the results directory" in run.stderr
