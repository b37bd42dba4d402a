"""scripts/paired_scores.py and kvcompress.experiment.paired: both result formats pair sample by sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcompress.experiment.paired import load_cells, pair_cells, render


def _write(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def sides(tmp_path: Path) -> tuple[Path, Path]:
    """A quality_table result (setup 'kvzip+global', 10 samples at 8x: 8 right, s8 wrong, s9 half) and a
    compare_kvpress result (kvpress/kvzip at 8x: only s9 right, ids in another order; plus a 4x cell ours lacks)."""
    ours = [
        {"setup": "kvzip+global", "mode": "query_aware", "sample_id": f"s{i}", "ratio": 8.0, "score": s}
        for i, s in enumerate([100.0] * 8 + [0.0, 50.0])
    ]
    ours.append({"setup": "full", "mode": "query_aware", "sample_id": "s0", "ratio": 1.0, "score": 100.0})
    preds = [{"id": f"s{i}", "score": 100.0 if i == 9 else 0.0} for i in reversed(range(10))]
    theirs = [
        {"side": "kvpress", "mode": "query_aware", "policy": "kvzip", "ratio": r, "predictions": preds}
        for r in (4.0, 8.0)
    ]
    return _write(tmp_path / "ours", ours), _write(tmp_path / "kvpress", theirs)


def test_pairs_by_id_across_formats(sides) -> None:
    ours, theirs = sides
    (cell,) = pair_cells(load_cells(ours, "kvzip+global"), load_cells(theirs / "rows.jsonl", "kvpress/kvzip"))
    assert (cell.mode, cell.ratio, cell.n, cell.ahead, cell.behind) == ("query_aware", 8.0, 10, 8, 1)
    assert cell.mean_a == pytest.approx(85.0) and cell.mean_b == pytest.approx(10.0)
    assert cell.p == pytest.approx(20 / 512)  # 2 * P(X <= 1), X ~ Bin(9, 1/2)
    table = render([cell], "ours", "kvpress")
    assert "| query_aware | 8 | 10 | 85.0 | 10.0 | 8 / 1 | 0.04 |" in table
    assert "ahead on 8 sample-cells, behind on 1; +7.5 samples" in table


def test_unknown_label_lists_the_labels_held(sides) -> None:
    ours, theirs = sides
    with pytest.raises(ValueError, match="no rows for 'kvzip'; it holds: full, kvzip\\+global"):
        load_cells(ours, "kvzip")
    with pytest.raises(ValueError, match="no results at"):
        load_cells(ours / "missing", "kvzip")


def test_script_prints_the_table_and_reports_bad_input(script_module, sides, capsys) -> None:
    ps = script_module("paired_scores")
    ours, theirs = sides
    assert ps.main([f"{ours}:kvzip+global", f"{theirs}:kvpress/kvzip"]) == 0
    assert "| query_aware | 8 | 10 | 85.0 | 10.0 | 8 / 1 | 0.04 |" in capsys.readouterr().out
    assert ps.main([f"{ours}:kvzip+global", f"{theirs}:ours/kvzip"]) == 2
    assert "no rows for 'ours/kvzip'; it holds: kvpress/kvzip" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ps.main([str(ours), f"{theirs}:kvpress/kvzip"])
    assert "expected PATH:LABEL" in capsys.readouterr().err
