"""Evaluations batch through the engine: on the embedded SmolLM2, a run's samples evaluated together give the same
predictions (and, compressed, the same kept tokens per sample) as the same samples one at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from experiment_helpers import read_predictions, read_summary

pytestmark = pytest.mark.slow

FACTS = [
    ("The red key opens the attic. The blue key opens the cellar. The green key opens the garage. ", "red", "attic"),
    ("Mara keeps bees in Oslo. Tomas grows pears in Lyon. Ines builds boats in Porto. ", "Tomas", "Lyon"),
]
FILLER = "The afternoon was quiet and the river moved slowly past the old mill while clouds drifted by. "


def _shared_contexts(path: Path) -> Path:
    """Two contexts of ~400 tokens, each asked two questions (query-agnostic runs share a context's prefill)."""
    lines = []
    for i, (facts, who, where) in enumerate(FACTS):
        context = FILLER * 10 + facts + FILLER * 10
        lines.append(
            {
                "context": context,
                "question": f"What does the {who} key open?" if i == 0 else f"Where does {who} live?",
                "answers": [where],
                "id": f"c{i}-a",
            }
        )
        lines.append(
            {
                "context": context,
                "question": "Repeat the second sentence of the facts.",
                "answers": [facts.split(". ")[1]],
                "id": f"c{i}-b",
            }
        )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _kept(run_dir: Path) -> dict[str, tuple[str, int]]:
    return {r["sample_id"]: (r["prediction"], r["tokens_kept"]) for r in read_predictions(run_dir)}


@pytest.mark.parametrize(
    "setup",
    [
        ["policy=full", "task=niah_single", "task.n_samples=4", "task.target_tokens=400"],
        [
            "policy=lfu",
            "budget.ratio=4",
            "budget.allocation=global",
            "task=niah_single",
            "task.n_samples=4",
            "task.target_tokens=400",
        ],
        ["policy=snapkv", "budget.ratio=4", "task=jsonl", "task.mode=query_agnostic"],
    ],
    ids=["full", "lfu-global-4x", "snapkv-4x-agnostic-shared"],
)
def test_batched_equals_one_at_a_time(run_cli, tmp_path: Path, setup: list[str]) -> None:
    if "task=jsonl" in setup:
        setup = [*setup, f"task.path={_shared_contexts(tmp_path / 'shared.jsonl')}"]
    dirs = {}
    for max_seqs in (1, 4):
        dirs[max_seqs] = tmp_path / f"seqs{max_seqs}"
        proc = run_cli(*setup, f"engine.max_seqs={max_seqs}", f"hydra.run.dir={dirs[max_seqs]}", timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
    one, batched = _kept(dirs[1]), _kept(dirs[4])
    assert len(one) == 4 and batched == one
    assert read_summary(dirs[4])["score"] == read_summary(dirs[1])["score"]
