"""quality_table's record of what each setup label ran (kvcompress.experiment.setup_record): a rerun into a results
directory refuses to resume a label whose config changed since its rows were written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvcompress.budget import Budget
from kvcompress.experiment.policy_config import load_policy
from kvcompress.experiment.setup_record import (
    check_resume,
    config_record,
    differences,
    non_default,
    read_records,
    write_records,
)
from kvcompress.experiment.setups import resolve_setup

ROOT = Path(__file__).resolve().parents[2]
# a directory whose label 'recommended_query_agnostic' ran the preset before it kept the sketch (slot alone)
OLD_PRESET_DIR = ROOT / "docs" / "results" / "heldout9-4k-agnostic"


def _record(label: str, qt, protected: int = 32) -> dict:
    return qt.setup_records([resolve_setup(label)], protected, None)[label]


def test_a_record_holds_only_what_differs_from_the_defaults() -> None:
    """A field added later at its default leaves an older record equal; a policy nested in a hybrid is recorded by
    its own fields."""
    assert non_default(Budget()) == {}
    assert config_record(load_policy("kvzip"), Budget(ratio=8)) == {"policy": {"class": "KVzipPolicy"}, "budget": {}}
    record = config_record(load_policy("kvzip", window=32), Budget(summary_slots=1, protected_window=16))
    assert record == {
        "policy": {"class": "KVzipPolicy", "window": 32},
        "budget": {"summary_slots": 1, "protected_window": 16},
    }
    hybrid = config_record(load_policy("hybrid"), Budget())["policy"]
    assert hybrid["class"] == "HybridPolicy" and hybrid["a"]["class"] == "LFUPolicy"


def test_the_preset_as_it_ran_before_the_sketch_is_told_from_the_preset_now(script_module) -> None:
    """The hazard this guards: rows of 'recommended_query_agnostic' written before the preset kept its sketch."""
    qt = script_module("quality_table")
    recorded = read_records(OLD_PRESET_DIR)
    label = "recommended_query_agnostic"
    assert differences(recorded[label], _record(label, qt)) == ["budget.summary_sketch: recorded the default, now 8"]
    sketched = f"{label}:budget.summary_sketch=8"  # the same rows' sketch label resolves as it ran
    assert differences(recorded[sketched], _record(sketched, qt)) == []
    with pytest.raises(ValueError, match=f"setup '{label}': its rows in .* ran another config \\(budget.summary"):
        check_resume(OLD_PRESET_DIR, recorded, {label: _record(label, qt)}, {label})


def test_rows_without_a_record_are_refused_unless_adopted(script_module, tmp_path: Path) -> None:
    qt = script_module("quality_table")
    now = {"kvzip+global": _record("kvzip+global", qt)}
    with pytest.raises(ValueError, match="holds its rows but no record .* pass --adopt-rows"):
        check_resume(tmp_path, {}, now, {"kvzip+global", "full"})
    assert check_resume(tmp_path, {}, now, {"kvzip+global"}, adopt=True) == now
    assert check_resume(tmp_path, {"other": {}}, now, {"other"}) == {"other": {}, **now}  # other labels stay
    protected = {"kvzip+global": _record("kvzip+global", qt, protected=16)}
    with pytest.raises(ValueError, match="budget.protected_window: recorded the default, now 16"):
        check_resume(tmp_path, now, protected, set())
    write_records(tmp_path, now)
    assert read_records(tmp_path) == now
    (tmp_path / "setups.json").write_text("[1]")
    with pytest.raises(ValueError, match="setups.json: not a map of setup label -> config record"):
        read_records(tmp_path)


def test_quality_table_refuses_to_resume_a_changed_label_before_the_model_loads(tmp_path: Path) -> None:
    out = tmp_path / "old"
    shutil.copytree(OLD_PRESET_DIR, out)
    cmd = [sys.executable, str(ROOT / "scripts" / "quality_table.py"), "--out", str(out), "--task", "jsonl",
           "--path", str(ROOT / "docs" / "results" / "suites" / "heldout9-4k.jsonl"), "--samples", "40",
           "--ratios", "4", "--modes", "query_agnostic", "--protected", "32",
           "--setups", "recommended_query_agnostic"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "budget.summary_sketch: recorded the default, now 8" in run.stderr
    assert json.loads((out / "setups.json").read_text()) == read_records(OLD_PRESET_DIR)  # left as it was
