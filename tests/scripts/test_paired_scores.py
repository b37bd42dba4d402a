"""scripts/paired_scores.py and kvcompress.experiment.paired: both result formats pair sample by sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcompress.experiment.paired import (
    bootstrap_percent,
    full_cells,
    load_cells,
    lost_samples,
    pair_cells,
    render,
    render_retained,
    retained_pairs,
    signed_rank_p,
)


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


@pytest.fixture
def with_full(tmp_path: Path) -> tuple[Path, Path]:
    """Both formats with their full caches (the same per-sample scores, 100 / 100 / 0 / 50 on s0-s3). At 8x ours
    scores 100 / 0 / 100 / 50 (gains s2, which full misses; loses s1), kvpress 0 / 100 / 0 / 100 (loses s0; gains
    half of s3)."""
    full, ours_8, theirs_8 = [100.0, 100.0, 0.0, 50.0], [100.0, 0.0, 100.0, 50.0], [0.0, 100.0, 0.0, 100.0]
    ours = [
        {"setup": setup, "mode": "query_aware", "sample_id": f"s{i}", "ratio": ratio, "score": s}
        for setup, ratio, scores in (("full", 1.0, full), ("kvzip+global", 8.0, ours_8))
        for i, s in enumerate(scores)
    ]
    theirs = [
        {
            "side": "kvpress",
            "mode": "query_aware",
            "policy": policy,
            "ratio": ratio,
            "predictions": [{"id": f"s{i}", "score": s} for i, s in enumerate(scores)],
        }
        for policy, ratio, scores in (("full", 1.0, full), ("kvzip", 8.0, theirs_8))
    ]
    return _write(tmp_path / "full-ours", ours), _write(tmp_path / "full-kvpress", theirs)


def test_retained_and_gained_split_each_cell_against_its_full_cache(with_full) -> None:
    ours, theirs = with_full
    a, b = load_cells(ours, "kvzip+global"), load_cells(theirs, "kvpress/kvzip")
    full_a, full_b = full_cells(ours, "kvzip+global"), full_cells(theirs, "kvpress/kvzip")
    assert full_a == full_b == {("query_aware", 1.0): {"s0": 100.0, "s1": 100.0, "s2": 0.0, "s3": 50.0}}
    (cell,) = retained_pairs(a, b, full_a, full_b)
    # ours keeps 150 of full's 250 points and gains 100; kvpress keeps 150 and gains 50: level on the raw means'
    # retained part; on losses against full 1 / 1 (s0 ahead, s1 behind; s2 and s3 lose nothing on either side).
    assert (cell.retained_a, cell.gained_a, cell.retained_b, cell.gained_b) == pytest.approx((60.0, 40.0, 60.0, 20.0))
    assert (cell.losses.ratio, cell.losses.n, cell.losses.ahead, cell.losses.behind) == (8.0, 4, 1, 1)
    assert "| query_aware | 8 | 4 | 60% / +40% | 60% / +20% | 1 / 1 | 1.00 |" in render_retained([cell], "a", "b")


def test_script_adds_the_split_when_both_files_hold_a_full_cache(script_module, with_full, sides, capsys) -> None:
    ps = script_module("paired_scores")
    ours, theirs = with_full
    assert ps.main([f"{ours}:kvzip+global", f"{theirs}:kvpress/kvzip"]) == 0
    out = capsys.readouterr().out
    assert "| query_aware | 8 | 4 | 62.5 | 50.0 | 2 / 2 | 1.00 |" in out
    assert "| query_aware | 8 | 4 | 60% / +40% | 60% / +20% | 1 / 1 | 1.00 |" in out
    old_ours, old_theirs = sides  # the kvpress file there holds no kvpress/full rows
    assert ps.main([f"{old_ours}:kvzip+global", f"{old_theirs}:kvpress/kvzip"]) == 0
    assert "no split against the full cache: " in capsys.readouterr().out


def test_losses_are_counted_against_each_sides_own_full_cache() -> None:
    # s0: a's full cache answers it and b's misses it; both answer it compressed. Neither lost anything, so it ties
    # (a capped-score comparison would count a ahead). s1: both full caches answer it, only b loses it.
    key, full = ("query_aware", 8.0), ("query_aware", 1.0)
    a, b = {key: {"s0": 100.0, "s1": 100.0}}, {key: {"s0": 100.0, "s1": 0.0}}
    full_a, full_b = {full: {"s0": 100.0, "s1": 100.0}}, {full: {"s0": 0.0, "s1": 100.0}}
    (cell,) = retained_pairs(a, b, full_a, full_b)
    assert (cell.losses.ahead, cell.losses.behind) == (1, 0)
    assert (cell.retained_a, cell.gained_a, cell.retained_b, cell.gained_b) == pytest.approx((100.0, 0.0, 0.0, 100.0))


def test_a_mode_without_full_rows_is_left_out_of_the_split() -> None:
    aware, agnostic = ("query_aware", 8.0), ("query_agnostic", 8.0)
    cells = {aware: {"s0": 100.0}, agnostic: {"s0": 100.0}}
    full = {("query_aware", 1.0): {"s0": 100.0}}
    assert [(k.losses.mode, k.losses.ratio) for k in retained_pairs(cells, cells, full, full)] == [aware]


def test_full_cells_of_an_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="rows.jsonl is empty"):
        full_cells(tmp_path, "kvzip+global")


def test_signed_rank_weighs_how_far_apart_each_sample_is() -> None:
    """Ten large wins and six tiny losses: the sign test sees 10 / 6 (p = 0.45), the signed-rank test sees that
    every win outweighs every loss."""
    a = {f"s{i}": (-0.1 if i < 10 else -0.501) for i in range(16)}
    b = {f"s{i}": (-0.9 if i < 10 else -0.5) for i in range(16)}
    ((pair,),) = [pair_cells({("query_agnostic", 8.0): a}, {("query_agnostic", 8.0): b})]
    assert (pair.ahead, pair.behind) == (10, 6) and pair.p == pytest.approx(0.4545, abs=1e-3)
    assert pair.p_ranks < 0.05 and pair.p_ranks == signed_rank_p(a, b)
    assert signed_rank_p(a, a) == 1.0  # every sample ties
    assert "signed-rank p" in render([pair], "a", "b", samples=False)
    assert "signed-rank p" not in render([pair], "a", "b")


def _draw(tmp_path: Path, name: str, full: list[float], cut: list[float], label: str = "kvzip+global") -> Path:
    """A quality_table directory of one draw: its full cache and ``label`` at 8x, one sample per score."""
    rows = [
        {"setup": setup, "mode": "query_aware", "sample_id": f"{name}-{i}", "ratio": ratio, "score": s}
        for setup, ratio, scores in (("full", 1.0, full), (label, 8.0, cut))
        for i, s in enumerate(scores)
    ]
    return _write(tmp_path / name, rows)


def test_pooled_scores_sum_over_every_sample_before_dividing(script_module, tmp_path: Path, capsys) -> None:
    """Two draws, 100% of a full score of 50 and 0% of one of 150: pooled 25%, not the 50% a mean of the two
    percentages gives; retained caps each sample at its full score (a gain above it does not count)."""
    pooled = script_module("pooled_scores")
    a = _draw(tmp_path, "d1", [100.0, 0.0], [0.0, 100.0])  # one answer lost, one gained: 100%, retained 0%
    b = _draw(tmp_path, "d2", [100.0, 100.0, 100.0], [0.0, 0.0, 0.0], label="kvzip+global:floor=0.5")
    assert pooled.main([f"{a}:kvzip+global", f"{b}:kvzip+global:floor=0.5"]) == 0
    out = capsys.readouterr().out

    def interval(scores: list[float], full: list[float]) -> str:
        low, high = bootstrap_percent(scores, full)
        return f"{low:.1f}–{high:.1f}%"

    pooled_ci = interval([0.0, 100.0, 0.0, 0.0, 0.0], [100.0, 0.0, 100.0, 100.0, 100.0])
    first_ci = interval([0.0, 100.0], [100.0, 0.0])
    assert f"| query_aware | 8 | **pooled, 2 directories** | 5 | 80.0 | 20.0 | 25.0% | {pooled_ci} | 0.0% |" in out
    assert f"| query_aware | 8 | {a}:kvzip+global | 2 | 50.0 | 50.0 | 100.0% | {first_ci} | 0.0% |" in out
    assert pooled.main([f"{a}:kvzip+global"]) == 0  # one draw: its own row and the pool's, in the singular
    row = f"| query_aware | 8 | **pooled, 1 directory** | 2 | 50.0 | 50.0 | 100.0% | {first_ci} | 0.0% |"
    assert row in capsys.readouterr().out

    c = _draw(tmp_path / "other", "d1", [100.0, 0.0], [100.0, 0.0])  # the first draw under another setup
    assert pooled.main([f"{a}:kvzip+global", f"{b}:kvzip+global:floor=0.5", "--against", f"{c}:kvzip+global"]) == 0
    out = capsys.readouterr().out
    assert "| query_aware | 8 | 2 | 50.0 | 50.0 | 1 / 1 | 1.00 |" in out  # d1's samples only: d2 has no match


def test_bootstrap_interval_holds_the_pooled_figure_and_narrows_with_more_samples() -> None:
    """Samples that all keep the same share give a point interval; a 3-of-4 split's interval holds 75% and is
    wider than the same split over ten times the samples; a resample with no full-cache score is left out."""
    assert bootstrap_percent([50.0] * 8, [100.0] * 8) == (50.0, 50.0)
    small = bootstrap_percent([100.0, 100.0, 100.0, 0.0], [100.0] * 4)
    large = bootstrap_percent([100.0, 100.0, 100.0, 0.0] * 10, [100.0] * 40)
    assert small[0] < 75.0 < small[1] and large[0] < 75.0 < large[1]
    assert large[1] - large[0] < small[1] - small[0]
    # resamples: the first sample twice 50%, one of each 150%, the second twice none (left out, not infinite)
    assert bootstrap_percent([50.0, 100.0], [100.0, 0.0]) == (50.0, 150.0)
    with pytest.raises(ValueError, match="paired, non-empty"):
        bootstrap_percent([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="the full cache scores nothing on these samples"):
        bootstrap_percent([100.0, 0.0], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"draws >= 1 and 0 < level < 1 \(got 10000 and 95\)"):
        bootstrap_percent([1.0], [1.0], level=95)


def test_pooled_scores_refuse_a_sample_scored_twice_differently(script_module, tmp_path: Path, capsys) -> None:
    pooled = script_module("pooled_scores")
    a = _draw(tmp_path, "d1", [100.0], [100.0])
    b = _draw(tmp_path / "again", "d1", [100.0], [0.0])  # the same sample id, another score
    assert pooled.main([f"{a}:kvzip+global", f"{b}:kvzip+global"]) == 2
    assert "sample d1-0 (query_aware, 8x) scores 100 in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pooled.main(["no-label-here"])
    assert "expected PATH:LABEL" in capsys.readouterr().err


def test_lost_samples_lists_what_each_cell_lost_against_its_full_cache(script_module, tmp_path: Path, capsys) -> None:
    """s1 lost whole and s3 by half at 8x, s2 gained (not lost), s0 kept; 16x lost only s0. ``--ids-only`` prints
    one cell's ids to pass to quality_table's --ids, and refuses two cells in one line naming them."""
    full = [100.0, 100.0, 0.0, 100.0]
    scores = {8.0: [100.0, 0.0, 100.0, 50.0], 16.0: [0.0, 100.0, 0.0, 100.0]}
    rows = [
        {"setup": "full", "mode": "query_aware", "sample_id": f"s{i}", "ratio": 1.0, "score": s}
        for i, s in enumerate(full)
    ] + [
        {"setup": "kvzip+global", "mode": "query_aware", "sample_id": f"s{i}", "ratio": r, "score": s}
        for r, cell in scores.items()
        for i, s in enumerate(cell)
    ]
    path = _write(tmp_path / "run", rows)
    assert lost_samples(load_cells(path, "kvzip+global"), full_cells(path, "kvzip+global")) == {
        ("query_aware", 8.0): ["s1", "s3"],
        ("query_aware", 16.0): ["s0"],
    }
    ls = script_module("lost_samples")
    assert ls.main([f"{path}:kvzip+global", "--ratios", "8", "--ids-only"]) == 0
    assert capsys.readouterr().out == "s1,s3\n"
    assert ls.main([f"{path}:kvzip+global"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{path} query_aware 8x 2 s1,s3", f"{path} query_aware 16x 1 s0"]
    assert ls.main([f"{path}:kvzip+global", "--ids-only"]) == 2
    assert "--ids-only needs one cell; these results hold 2" in capsys.readouterr().err
    assert ls.main([f"{path}:kvzip", "--ratios", "8"]) == 2
    assert "has no rows for 'kvzip'; it holds: full, kvzip+global" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ls.main([f"{path}:kvzip+global", "--ratios", "eight"])
    assert "argument --ratios: expected comma-separated numbers, got 'eight'" in capsys.readouterr().err
