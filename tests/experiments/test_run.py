"""End-to-end runs of ``experiments/run.py`` on the tiny model: outputs, modes, resume, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from experiment_helpers import read_predictions, read_summary

CONTRACT_KEYS = {
    "model",
    "policy",
    "task",
    "mode",
    "compression_ratio",
    "logical_compression",
    "physical_compression",
    "score",
    "n_samples",
    "kv_bytes_allocated_peak",
    "wall_s",
}
RECORD_KEYS = {
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
}


def test_run_writes_predictions_and_summary(run_cli, tiny: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(*tiny, "policy=lfu", "budget.ratio=2", "budget.protected_window=16", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    records = read_predictions(run_dir)
    assert len(records) == 3 and all(RECORD_KEYS <= set(r) for r in records)
    summary = read_summary(run_dir)
    assert CONTRACT_KEYS <= set(summary)
    assert summary["complete"] is True
    assert (summary["policy"], summary["task"], summary["mode"]) == ("lfu", "niah_single", "query_aware")
    assert summary["model"] == "tiny-llama0"
    assert summary["n_samples"] == 3 and summary["compression_ratio"] == 2.0
    assert 1.8 < summary["logical_compression"] < 2.2  # ratio 2 of ~200-token prompts, block rounding aside
    assert summary["physical_compression"] > 1.5
    assert summary["per_task"]["niah_single"]["n_samples"] == 3
    assert summary["score"] == pytest.approx(sum(r["score"] for r in records) / 3)
    assert summary["kv_bytes_allocated_peak"] == max(r["kv_bytes_end"] for r in records)
    assert summary["tokens_per_s"] > 0
    # one readable line per run on the console
    assert "lfu x2 [uniform, query_aware] on niah_single/tiny-llama0" in proc.stdout + proc.stderr


def test_full_cache_score_is_recorded_and_reused(run_cli, tiny: list[str], tmp_path: Path) -> None:
    full_dir, lfu_dir = tmp_path / "full", tmp_path / "lfu"
    assert run_cli(*tiny, "policy=full", f"hydra.run.dir={full_dir}").returncode == 0
    full = read_summary(full_dir)
    assert full["full_cache_score"] == full["score"] and full["logical_compression"] == 1.0
    assert full["compression_ratio"] == 1.0 and full["budget_ratio"] == 4.0  # config.yaml's ratio, unused by full
    assert (
        run_cli(
            *tiny, "policy=lfu", "budget.ratio=2", "budget.protected_window=16", f"hydra.run.dir={lfu_dir}"
        ).returncode
        == 0
    )
    lfu = read_summary(lfu_dir)
    assert lfu["baseline_key"] == full["baseline_key"]
    assert lfu["full_cache_score"] == full["score"]


def test_query_agnostic_shares_contexts_and_token_ids(run_cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    context_a = "Alice lives in Paris. " * 20 + "\n\n"
    context_b = "The meeting is on Tuesday. " * 20 + "\n\n"
    lines = [
        {"context": context_a, "question": "Where does Alice live?", "answers": ["Paris"], "id": "a1"},
        {"context": context_a, "question": "Who lives in Paris?", "answers": ["Alice"], "id": "a2"},
        {"context": context_b, "question": "When is the meeting?", "answers": ["Tuesday"], "id": "b1"},
    ]
    import json

    data.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    common = [
        "model=hf",
        f"model.path={tiny_model_dir}",
        "task=jsonl",
        f"task.path={data}",
        "task.max_new_tokens=3",
        "policy=lfu",
        "budget.ratio=2",
        "budget.protected_window=8",
    ]
    by_mode = {}
    for mode in ("query_aware", "query_agnostic"):
        run_dir = tmp_path / mode
        proc = run_cli(*common, f"task.mode={mode}", f"hydra.run.dir={run_dir}")
        assert proc.returncode == 0, proc.stderr
        assert read_summary(run_dir)["mode"] == mode
        by_mode[mode] = {r["sample_id"]: r for r in read_predictions(run_dir)}
    aware, agnostic = by_mode["query_aware"], by_mode["query_agnostic"]
    assert set(aware) == set(agnostic) == {"a1", "a2", "b1"}
    for sid in aware:  # the same token ids in both modes
        assert aware[sid]["prompt_tokens"] == agnostic[sid]["prompt_tokens"]
        assert aware[sid]["context_tokens"] == agnostic[sid]["context_tokens"]
        assert aware[sid]["tokens_seen"] == agnostic[sid]["tokens_seen"]
    assert agnostic["a1"]["context_id"] == agnostic["a2"]["context_id"] != agnostic["b1"]["context_id"]
    # query-agnostic compresses only the context: the question rides on top uncompressed, so less compression
    assert agnostic["a1"]["logical_compression"] < aware["a1"]["logical_compression"]


def test_resume_after_kill(run_cli, tiny: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        *tiny,
        "task.n_samples=4",
        "policy=lfu",
        "budget.ratio=2",
        "budget.protected_window=16",
        f"hydra.run.dir={run_dir}",
    ]
    killed = run_cli(*args, env={"KVCOMPRESS_TEST_KILL_AFTER": "2"})
    assert killed.returncode == -9  # SIGKILL after the second prediction was written
    assert len(read_predictions(run_dir)) == 2
    assert not (run_dir / "summary.json").exists()

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    ids = [r["sample_id"] for r in read_predictions(run_dir)]
    assert len(ids) == len(set(ids)) == 4
    summary = read_summary(run_dir)
    assert summary["complete"] and summary["n_samples"] == 4 and summary["n_resumed"] == 2

    before = (run_dir / "predictions.jsonl").read_bytes()
    again = run_cli(*args)
    assert again.returncode == 0 and "already complete, skipping" in again.stdout + again.stderr
    assert (run_dir / "predictions.jsonl").read_bytes() == before


def test_resume_refuses_a_different_config(run_cli, tiny: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*tiny, "policy=lfu", "budget.protected_window=16", f"hydra.run.dir={run_dir}"]
    assert run_cli(*args, "budget.ratio=2", env={"KVCOMPRESS_TEST_KILL_AFTER": "1"}).returncode == -9
    proc = run_cli(*args, "budget.ratio=3")
    assert proc.returncode == 2
    assert "holds predictions of a different config" in proc.stderr


def test_torn_last_line_is_dropped(run_cli, tiny: list[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*tiny, "policy=full", f"hydra.run.dir={run_dir}"]
    assert run_cli(*args, env={"KVCOMPRESS_TEST_KILL_AFTER": "1"}).returncode == -9
    with (run_dir / "predictions.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"sample_id": "niah_single-200-s0-0001", "pred')  # a write cut short by the kill
    assert run_cli(*args).returncode == 0
    assert [r["sample_id"][-4:] for r in read_predictions(run_dir)] == ["0000", "0001", "0002"]
