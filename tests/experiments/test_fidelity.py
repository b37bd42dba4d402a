"""Answer fidelity (kvcompress.experiment.fidelity): its per-sample fields, its table in quality_table, its paired
comparison, and one real run of ``quality_table.py --fidelity`` on the embedded model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvcompress.experiment.fidelity import fidelity_fields, fidelity_row, metric_value
from kvcompress.experiment.paired import load_cells, pair_cells, render
from kvcompress.sequence import RequestOutput

ROOT = Path(__file__).resolve().parents[2]


def _output(tokens: list[int], greedy: list[int] | None, logprobs: list[float] | None) -> RequestOutput:
    return RequestOutput("r", 10, tokens, "length", 0, 0, 1, None, None, 0.0, 0.0, 0.0,
                         forced_logprobs=logprobs, greedy_tokens=greedy)  # fmt: skip


def test_fidelity_row_counts_the_nll_matches_and_first_miss() -> None:
    row = fidelity_row(_output([5, 6, 7, 8], [5, 6, 9, 8], [math.log(0.5), math.log(0.25), -3.0, 0.0]))
    assert row["tokens"] == 4 and row["match"] == 0.75 and row["first_miss"] == 2
    assert row["nll"] == pytest.approx((math.log(2) + math.log(4) + 3.0) / 4)
    assert fidelity_row(_output([5], [5], [-0.1]))["first_miss"] == 1  # none missed: the answer's length
    assert row["worst"] == 3.0 and row["logprobs"] == [-0.6931, -1.3863, -3.0, 0.0]
    assert metric_value(row, "nll") == -row["nll"] and metric_value(row, "match") == 75.0
    assert metric_value(row, "worst") == -3.0
    with pytest.raises(ValueError, match="has no 'worst' \\(written before it was recorded\\)"):
        metric_value({"nll": 0.1, "match": 1.0}, "worst")
    with pytest.raises(ValueError, match="was not teacher-forced"):
        fidelity_row(_output([5], None, None))
    with pytest.raises(ValueError, match="unknown fidelity metric 'kl'; choose from nll, match, worst"):
        metric_value(row, "kl")
    with pytest.raises(ValueError, match="2 tokens, 1 log-probs and 2 greedy tokens differ"):
        fidelity_fields([5, 6], [-0.1], [5, 6])


def _fidelity(setup: str, sample: str, ratio: float, nll: float, match: float) -> dict:
    return {"setup": setup, "mode": "query_agnostic", "sample_id": sample, "ratio": ratio, "tokens": 8,
            "nll": nll, "match": match, "first_miss": 8}  # fmt: skip


def test_table_and_pairs_read_fidelity_rows(script_module, tmp_path: Path) -> None:
    """quality_table's fidelity table (NLL over the full cache's own, greedy match) and paired_scores' sign test
    on NLL, where ahead means the lower NLL; a missing fidelity file says how to make one."""
    qt = script_module("quality_table")
    score = {"mode": "query_agnostic", "ratio": 1.0, "score": 100.0, "logical": 1.0, "physical": 1.0}
    scores = [{**score, "setup": setup, "sample_id": "s0", "ratio": r} for setup, r in (("full", 1.0), ("a", 8.0))]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scores))
    rows = [_fidelity("full", "s0", 1.0, 0.5, 1.0), _fidelity("full", "s1", 1.0, 0.7, 1.0)]
    rows += [_fidelity("a", "s0", 8.0, 0.9, 0.5), _fidelity("a", "s1", 8.0, 1.1, 1.0)]
    rows += [_fidelity("b", "s0", 8.0, 1.0, 0.5), _fidelity("b", "s1", 8.0, 2.0, 0.25)]
    (tmp_path / "fidelity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    qt.write_table(tmp_path / "rows.jsonl", tmp_path / "table.md", [8.0], tmp_path / "fidelity.jsonl")
    table = (tmp_path / "table.md").read_text()
    assert "its own NLL 0.600, n=2" in table
    assert "| a | 1.000 (+0.400) / 75% |" in table and "| b | 1.500 (+0.900) / 38% |" in table
    (cell,) = pair_cells(load_cells(tmp_path, "a", "nll"), load_cells(tmp_path, "b", "nll"))
    assert (cell.n, cell.ahead, cell.behind) == (2, 2, 0) and cell.mean_a == pytest.approx(-1.0)
    assert "| query_agnostic | 8 | 2 | -1.000 | -1.500 | 2 / 0 | 0.5 | 0.5 |" in render([cell], "a", "b", samples=False)
    with pytest.raises(ValueError, match="run its quality_table command again with --fidelity"):
        load_cells(tmp_path / "elsewhere", "a", "match")
    kvpress = tmp_path / "kvpress.jsonl"  # a compare_kvpress row holds scores, not fidelity
    kvpress.write_text(json.dumps({"side": "kvpress", "mode": "query_agnostic", "policy": "kvzip", "ratio": 8.0}))
    with pytest.raises(ValueError, match="reads fidelity rows \\(quality_table, compare_kvpress\\), not this"):
        load_cells(kvpress, "kvpress/kvzip", "nll")
    with pytest.raises(ValueError, match="has no 'match'"):
        load_cells(tmp_path / "rows.jsonl", "a", "match")
    (tmp_path / "fidelity.jsonl").write_text(json.dumps({"setup": "a"}) + "\n")
    missing = r"fidelity.jsonl:1: not a fidelity row \(missing match, mode, nll, ratio, sample_id\)"
    with pytest.raises(ValueError, match=missing):
        qt.read_fidelity(tmp_path / "fidelity.jsonl")


@pytest.mark.slow
def test_quality_table_fidelity_on_the_embedded_model(smollm2, tmp_path: Path) -> None:
    """One dev-1k sample, query-agnostic, StreamingLLM at 4x: the full cache forced through itself (the token ids
    its row records) matches its own greedy answer token for token; the compressed cache scores it at a higher
    NLL; a rerun adds nothing, a rerun with one ratio more runs only that ratio, and one with another protected window
    is refused (setups.json records what the label ran)."""
    cmd = [sys.executable, str(ROOT / "scripts" / "quality_table.py"), "--out", str(tmp_path), "--task", "jsonl",
           "--path", str(ROOT / "docs" / "results" / "suites" / "dev-1k.jsonl"), "--samples", "40", "--first", "1",
           "--setups", "streaming", "--modes", "query_agnostic", "--ratios", "4", "--fidelity"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["setup"]: r for r in map(json.loads, (tmp_path / "fidelity.jsonl").read_text().splitlines())}
    assert set(rows) == {"full", "streaming"}
    assert rows["full"]["match"] == 1.0 and rows["full"]["tokens"] > 0
    scored = {r["setup"]: r for r in map(json.loads, (tmp_path / "rows.jsonl").read_text().splitlines())}
    assert rows["full"]["tokens"] == len(scored["full"]["output_ids"])  # as many tokens as its row's ids
    assert rows["streaming"]["nll"] > rows["full"]["nll"] and rows["streaming"]["ratio"] == 4.0
    assert "Answer fidelity (the full cache's answer forced" in (tmp_path / "table.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "done at" not in again.stdout
    assert len((tmp_path / "fidelity.jsonl").read_text().splitlines()) == 2
    cmd[cmd.index("--ratios") + 1] = "4,8"  # a ratio more: only its score and fidelity run
    more = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert more.returncode == 0, more.stderr[-3000:]
    assert more.stdout.count("streaming score done") == 1 and more.stdout.count("streaming fidelity done") == 1
    assert " full score done" not in more.stdout and " full fidelity done" not in more.stdout
    for name in ("rows.jsonl", "fidelity.jsonl"):
        added = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()[2:]]
        assert [(r["setup"], r["ratio"]) for r in added] == [("streaming", 8.0)]
    assert json.loads((tmp_path / "setups.json").read_text())["streaming"]["budget"] == {"protected_window": 16}
    changed = subprocess.run([*cmd, "--protected", "8"], capture_output=True, text=True, timeout=900)
    assert changed.returncode == 2 and "budget.protected_window: recorded 16, now 8" in changed.stderr


def test_hydra_runs_record_fidelity_against_the_full_cache_run(run_cli, tiny: list[str], tmp_path: Path) -> None:
    """``experiments/run.py fidelity=true``: a compressed run needs the full-cache run first (one error line); the
    full run forces its own answers, the compressed run the full run's, each into fidelity.jsonl and the summary;
    turning fidelity on for a finished run computes only the fidelity."""
    from experiment_helpers import read_predictions, read_summary

    full_dir, lfu_dir = tmp_path / "full", tmp_path / "lfu"
    lfu = [*tiny, "policy=lfu", "budget.ratio=2", "budget.protected_window=16", f"hydra.run.dir={lfu_dir}"]
    early = run_cli(*lfu, "fidelity=true")
    assert early.returncode == 2 and "records no full-cache run of this model, task, mode and seed" in early.stderr
    assert "Traceback" not in early.stderr
    assert run_cli(*tiny, "policy=full", "fidelity=true", f"hydra.run.dir={full_dir}").returncode == 0
    full = read_summary(full_dir)
    assert full["answer_n"] == 3 and full["answer_nll_full"] == full["answer_nll"] > 0
    assert full["answer_match"] == 1.0  # its own greedy tokens, forced back through the same cache
    assert run_cli(*lfu).returncode == 0  # finished without fidelity
    assert "answer_nll" not in read_summary(lfu_dir)
    again = run_cli(*lfu, "fidelity=true")
    assert again.returncode == 0, again.stderr
    summary = read_summary(lfu_dir)
    assert summary["answer_n"] == 3 and summary["answer_nll_full"] == full["answer_nll"]
    assert 0 <= summary["answer_match"] <= 1 and summary["answer_worst"] >= summary["answer_nll"]
    assert len(read_predictions(lfu_dir)) == 3  # the predictions were kept, not recomputed
    rows = [json.loads(line) for line in (lfu_dir / "fidelity.jsonl").read_text().splitlines()]
    answers = {r["sample_id"]: r["output_ids"] for r in read_predictions(full_dir)}
    assert {r["sample_id"]: r["tokens"] for r in rows} == {k: len(v) for k, v in answers.items()}
    assert "answer NLL" in again.stdout + again.stderr


def test_missing_ratios_groups_samples_by_the_ratios_they_lack(script_module) -> None:
    """quality_table's resume: a rerun with one ratio more runs only that ratio; a sample cut short runs all of its
    own; the full cache has ratio 1 only; the fidelity pass leaves out samples whose full answer is empty."""
    qt = script_module("quality_table")
    samples = [SimpleNamespace(sample_id=i) for i in ("s0", "s1", "s2")]
    done = {("a", "m", "s0", 4.0), ("a", "m", "s1", 4.0), ("full", "m", "s0", 1.0)}
    assert qt.missing_ratios(samples, "a", "m", [4.0, 8.0], done) == {(8.0,): samples[:2], (4.0, 8.0): samples[2:]}
    assert qt.missing_ratios(samples, "a", "m", [4.0], done) == {(4.0,): samples[2:]}
    assert qt.missing_ratios(samples, "full", "m", [4.0, 8.0], done) == {(1.0,): samples[1:]}
    answers = {("m", "s0"): [5], ("m", "s1"): [], ("m", "s2"): [7]}
    assert qt.missing_ratios(samples, "a", "m", [8.0], done, answers) == {(8.0,): [samples[0], samples[2]]}
    assert qt.missing_ratios(samples, "a", "other", [4.0], done) == {(4.0,): samples}
