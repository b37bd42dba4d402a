"""Setup names (kvcompress.experiment.setups, read by scripts/quality_table.py and scripts/inspect_allocation.py),
with allocator arguments after a colon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvcompress.experiment import setups


def test_setups_carry_allocator_args() -> None:
    names = setups.split_setups("snapkv,lfu+global:floor=0.2,normalize=sum,hybrid")
    assert names == ["snapkv", "lfu+global:floor=0.2,normalize=sum", "hybrid"]
    assert setups.split_setups("") == setups.split_setups(" ") == []  # only the full cache
    assert setups.resolve_setup(names[1]) == (names[1], "lfu", "global", {}, {"floor": 0.2, "normalize": "sum"}, {})
    assert setups.resolve_setup("hybrid") == ("hybrid", "hybrid", "uniform", {}, {}, {})
    with pytest.raises(ValueError, match="unknown setup 'nope'; accepted: lfu\\+global"):
        setups.resolve_setup("nope:floor=1")
    with pytest.raises(ValueError, match="is not key=value"):
        setups.resolve_setup("lfu+global:floor")


def test_setups_name_a_policy_config_and_a_budget_config() -> None:
    """``<policy>+<allocation>`` takes any conf/policy name and an allocator or a named conf/budget config, whose
    allocator args the colon's override."""
    assert setups.resolve_setup("lfu_avg+global") == ("lfu_avg+global", "lfu_avg", "global", {}, {}, {})
    floor = setups.resolve_setup("lfu+global_floor_normalized:floor=0.2")
    assert floor == (
        "lfu+global_floor_normalized:floor=0.2",
        "lfu",
        "global",
        {},
        {"floor": 0.2, "normalize": "sum"},
        {},
    )
    with pytest.raises(ValueError, match="unknown allocation 'globl'; accepted: an allocator .*global_floor"):
        setups.resolve_setup("lfu+globl")
    with pytest.raises(ValueError, match="unknown setup 'lfux\\+global'; .* <policy>\\+<allocation>"):
        setups.resolve_setup("lfux+global")


def test_setups_carry_policy_fields() -> None:
    """``policy.key=value`` after the colon sets the policy's fields, beside allocator arguments."""
    names = setups.split_setups("kvzip+global:policy.prefix_keep=4,floor=0.5,kvzip")
    assert names == ["kvzip+global:policy.prefix_keep=4,floor=0.5", "kvzip"]
    assert setups.resolve_setup(names[0]) == (names[0], "kvzip", "global", {"prefix_keep": 4}, {"floor": 0.5}, {})
    assert setups.resolve_setup("kvzip:policy.skip_prefix=true")[3] == {"skip_prefix": True}
    assert setups.VARIANTS["kvzip"][2] == {}, "a setup's policy fields do not leak into the variant"
    with pytest.raises(ValueError, match="is not key=value, policy.key=value or budget.key=value"):
        setups.resolve_setup("kvzip+global:policy.=4")


def test_setups_carry_budget_fields() -> None:
    """``budget.key=value`` sets the budget's fields, all but those the script and the label decide."""
    assert setups.resolve_setup("kvzip+global:budget.summary_slots=1,policy.window=32")[3:] == (
        {"window": 32},
        {},
        {"summary_slots": 1},
    )
    with pytest.raises(ValueError, match="the budget has no field 'ratio' a setup may set; accepted: .*summary_slots"):
        setups.resolve_setup("kvzip+global:budget.ratio=4")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("kvzip+global:policy.prefix_kep=4", "KVzipPolicy (policy=kvzip) has no field 'prefix_kep'; its fields: "),
        ("tova+global", "setup 'tova+global': policy TOVAPolicy does not compose with budget.allocation='global'"),
        ("lfu+global:flor=2", "setup 'lfu+global:flor=2': budget.allocator_args: allocation 'global' has no field"),
        ("kvzip+global:budget.summary_slots=-1", "budget.summary_slots must be >= 0"),
    ],
)
def test_a_setup_that_cannot_run_fails_before_the_model_loads(tmp_path: Path, setup: str, message: str) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "quality_table.py"
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--setups", setup],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert message in run.stderr
    assert not out.exists(), "nothing is written for a run that cannot start"


def test_jsonl_without_a_path_fails_before_anything_is_written(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "quality_table.py"
    out = tmp_path / "out"
    cmd = [sys.executable, str(script), "--out", str(out), "--task", "jsonl", "--setups", "tova"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--task jsonl needs --path FILE.jsonl" in run.stderr
    assert not out.exists()


def test_check_setup_accepts_what_composes() -> None:
    setups.check_setup(*setups.resolve_setup("kvzip+global:policy.window=32"))
    setups.check_setup(*setups.resolve_setup("tova"))
    with pytest.raises(ValueError, match="setup 'tova\\+adakv': policy TOVAPolicy does not compose"):
        setups.check_setup(*setups.resolve_setup("tova+adakv"))
