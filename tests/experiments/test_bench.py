"""``experiments/bench.py`` end to end on a tiny random Llama: every section writes its rows and tables, a
re-run resumes instead of re-measuring, and bad input gets one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "experiments" / "bench.py"
TINY = [
    "repeats=2",
    "threads=1",
    "budget.protected_window=4",
    "throughput.ratios=[1,4]",
    "throughput.workload.n_requests=4",
    "throughput.workload.prompt_tokens=256",
    "throughput.workload.new_tokens=6",
    "throughput.workload.pool_seqs=1.5",
    "latency.contexts=[64,128]",
    "latency.steps=2",
    "generation.prompt_tokens=256",
    "generation.new_tokens=4",
    "overhead.policies=[lfu,snapkv]",
    "overhead.context=256",
    "overhead.steps=6",
    "overhead.compress_every=3",
    "evaluation.n_samples=3",
    "evaluation.prompt_tokens=200",
    "evaluation.ratio=2",
    "evaluation.max_seqs=3",
]


def _bench(tmp_path: Path, model_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        str(BENCH),
        "model=hf",
        f"model.path={model_dir}",
        f"hydra.run.dir={tmp_path}/b",
        *overrides,
    ]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_bench_all_sections_then_resume(tmp_path, tiny_model_dir):
    run = _bench(tmp_path, tiny_model_dir, *TINY)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "b" / "rows.jsonl").read_text().splitlines()]
    through = [r for r in rows if r["section"] == "throughput"]
    assert sorted((r["ratio"], r["repeat"]) for r in through) == [(1.0, 0), (1.0, 1), (4.0, 0), (4.0, 1)]
    assert all(r["generated_tokens"] == 4 * 6 for r in through)
    dense = [r for r in through if r["ratio"] == 1]
    packed = [r for r in through if r["ratio"] == 4]
    # the pool holds 1.5 uncompressed requests: compression must let more of them run at once
    assert max(r["peak_running"] for r in dense) == 1 < min(r["peak_running"] for r in packed)
    assert {(r["system"], r["context"]) for r in rows if r["section"] == "latency"} >= {
        ("hf_dense", 64),
        ("paged", 128),
    }
    assert {r["policy"] for r in rows if r["section"] == "overhead"} == {"lfu", "snapkv"}
    generation = {r["system"]: r for r in rows if r["section"] == "generation"}
    assert set(generation) == {"hf_dense", "paged", "paged_x8"} and generation["paged"]["same_tokens_as_hf"]
    evaluation = {r["system"]: r for r in rows if r["section"] == "evaluation"}
    assert set(evaluation) == {"engine_batched", "engine_one_at_a_time", "hf_loop"}
    assert evaluation["engine_one_at_a_time"]["time_vs_one_at_a_time"] == 1.0
    assert evaluation["engine_batched"]["max_seqs"] == 3 and evaluation["engine_batched"]["n_samples"] == 3
    tables = (tmp_path / "b" / "tables.md").read_text()
    for title in ("Throughput", "Decode step latency", "End-to-end generation", "Compression overhead", "Evaluation"):
        assert title in tables
    assert "| 4 |" in tables and "Command: `python experiments/bench.py model=hf" in tables
    assert "warm-up runs of each system before the timed ones: 0" in tables  # CPU: no JIT to warm up
    assert {r["warmup"] for r in rows if r["section"] in ("throughput", "generation", "evaluation")} == {0}

    again = _bench(tmp_path, tiny_model_dir, *TINY)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((tmp_path / "b" / "rows.jsonl").read_text().splitlines()) == len(rows)  # nothing re-measured


def test_bench_rejects_unknown_section_and_policy(tmp_path, tiny_model_dir):
    bad = _bench(tmp_path, tiny_model_dir, "sections=[speed]")
    assert bad.returncode == 2 and "unknown bench section(s) ['speed']; accepted: throughput" in bad.stderr
    bad = _bench(tmp_path, tiny_model_dir, "sections=[overhead]", "overhead.policies=[nope]")
    assert bad.returncode == 2 and "unknown policy 'nope'; accepted:" in bad.stderr
    bad = _bench(tmp_path, tiny_model_dir, "sections=[generation]", "warmup=-1")
    assert bad.returncode == 2 and "warmup=-1: give the number of untimed runs" in bad.stderr
