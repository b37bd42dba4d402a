"""Bad input ends with one specific ``error:`` line (exit 2) or Hydra's own message, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest


def _assert_clean_error(proc, expected: str, run_dir: Path) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert not (run_dir / "summary.json").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["budget.ratio=0.5"], "budget.ratio must be a number >= 1"),
        (["budget.ratio=4", "budget.protected_window=100"], "smaller than the protected tokens"),
        (["task.target_tokens=1500"], "exceeds the model context of 1024 positions"),
        (["task.mode=sideways"], "task.mode must be one of query_aware, query_agnostic"),
        (["policy=lfu", "policy.metric=L3"], "policy=lfu: lfu metric must be one of"),
        (["budget.allocation=nope"], "unknown budget.allocation 'nope'; accepted: uniform"),
        (
            ["budget.allocation=global", "budget.allocator_args={alpha:0.2}"],
            "budget.allocator_args: allocation 'global' has no field 'alpha'; "
            "its fields: floor, floor_from, floor_layers, cap, normalize",
        ),
    ],
    ids=[
        "ratio-below-1",
        "budget-below-protected-window",
        "prompt-too-long",
        "bad-mode",
        "bad-policy-param",
        "bad-allocation",
        "bad-allocator-arg",
    ],
)
def test_bad_budget_prompt_or_option(run_cli, tiny: list[str], tmp_path: Path, overrides, expected: str) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(*tiny, *overrides, f"hydra.run.dir={run_dir}")
    _assert_clean_error(proc, expected, run_dir)


def test_malformed_jsonl_names_file_line_and_field(run_cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"context": "c", "question": "q", "answers": ["a"]}\n{"context": "c", "question": "q"}\n')
    run_dir = tmp_path / "run"
    proc = run_cli(
        "model=hf", f"model.path={tiny_model_dir}", "task=jsonl", f"task.path={data}", f"hydra.run.dir={run_dir}"
    )
    _assert_clean_error(proc, f"{data}:2: missing field 'answers'", run_dir)


def test_missing_model_directory(run_cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli("model=hf", f"model.path={tmp_path / 'nowhere'}", f"hydra.run.dir={run_dir}")
    _assert_clean_error(proc, "is neither an embedded model", run_dir)


def test_jsonl_without_path(run_cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli("model=hf", f"model.path={tiny_model_dir}", "task=jsonl", f"hydra.run.dir={run_dir}")
    _assert_clean_error(proc, "missing mandatory value task.path", run_dir)


@pytest.mark.parametrize("group", ["policy", "task", "model", "logger"])
def test_unknown_group_option_lists_choices(run_cli, group: str) -> None:
    proc = run_cli(f"{group}=nope")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"Could not find '{group}/nope'" in proc.stderr and "Available options" in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["policy.windw=3"], "policy.windw: LFUPolicy (policy=lfu) has no field 'windw'; its fields: window, metric"),
        (["model.dtype=fp8"], "model.dtype='fp8' is not supported; accepted: auto, float32, bfloat16, float16"),
        pytest.param(
            ["model.device=cuda"],
            "model.device='cuda': ",
            marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only error"),
        ),
    ],
    ids=["policy-field-typo", "bad-dtype", "cuda-without-cuda"],
)
def test_bad_policy_field_or_model_setting(run_cli, tiny: list[str], tmp_path: Path, overrides, expected) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(*tiny, *overrides, f"hydra.run.dir={run_dir}")
    _assert_clean_error(proc, expected, run_dir)
    if "device" in expected:
        assert "available: cpu" in proc.stderr
