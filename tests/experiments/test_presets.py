"""The presets (the recommended ones, and KV-Compress for reproduction) set a policy and budget and nothing else: no
task, no sweep, no Hydra settings. A ratio on the command line still wins. The named budget configs of
KV-Compress's improvements compose on top of the defaults and build their allocator."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kvcompress.allocators import build_allocator
from kvcompress.allocators.global_threshold import GlobalAllocator
from kvcompress.budget import Budget, BudgetError
from kvcompress.experiment.policy_config import load_policy, register_policy_configs
from kvcompress.experiment.setups import resolve_setup

CONF = Path(__file__).resolve().parents[2] / "conf"
PRESETS = ["recommended_query_aware", "recommended_query_agnostic", "kv_compress"]
BUDGETS = ["global_floor", "global_cap", "global_normalized", "global_floor_normalized"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_sets_only_policy_and_budget(preset: str) -> None:
    text = (CONF / "experiment" / f"{preset}.yaml").read_text()
    body = yaml.safe_load(text)
    assert text.startswith("# @package _global_")
    assert set(body) <= {"defaults", "budget", "policy"}, "a preset sets the policy and budget only"
    assert all("policy" in str(d) for d in body.get("defaults", [])), "its defaults choose the policy only"
    assert "ratio" not in body.get("budget", {}), "the ratio is the user's (budget.ratio=8)"


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_the_ratio_is_the_users(preset: str) -> None:
    register_policy_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={preset}", "budget.ratio=8"])
        plain = compose(config_name="config")
    assert cfg.budget.ratio == 8
    assert cfg.task == plain.task and cfg.engine == plain.engine  # the task and the run stay the user's
    instantiate(cfg.policy)  # the recommended policy builds
    Budget(**OmegaConf.to_container(cfg.budget, resolve=True))  # and so does its budget


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_as_a_setup_runs_what_experiment_equals_runs(preset: str) -> None:
    """``quality_table.py --setups recommended_query_aware`` builds the policy and budget that ``experiment=`` composes
    (so a table's preset row cannot drift from the preset), and the colon's arguments still override it."""
    register_policy_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={preset}", "budget.ratio=8"])
    _, policy, allocation, overrides, allocator_args, budget_args = resolve_setup(preset)
    assert load_policy(policy, **overrides) == instantiate(cfg.policy)
    setup = Budget(ratio=8, allocation=allocation, allocator_args=allocator_args, **budget_args)
    composed = Budget(**OmegaConf.to_container(cfg.budget, resolve=True))
    assert (setup.allocation, setup.allocator_args) == (composed.allocation, composed.allocator_args)
    assert {k: getattr(composed, k) for k in budget_args} == budget_args
    assert resolve_setup(f"{preset}:budget.summary_slots=2")[5]["summary_slots"] == 2


def test_the_query_agnostic_preset_folds_with_a_sketch_up_to_4x_and_drops_it_past() -> None:
    """The preset RESULTS recommends ("The sketch on all nine draws"): one summary slot per head read through a
    rank-8 sketch up to 4x, plain KVzip past it; and the documented ablation, its slot without the sketch, builds."""
    _, policy, allocation, _, allocator_args, budget_args = resolve_setup("recommended_query_agnostic")
    assert (policy, allocation) == ("kvzip", "global")
    light = Budget(ratio=4, allocation=allocation, allocator_args=allocator_args, **budget_args)
    assert (light.summary_slots, light.summary_sketch) == (1, 8) and light.folds_once and light.ever_folds
    assert not Budget(ratio=8, allocation=allocation, allocator_args=allocator_args, **budget_args).ever_folds
    *_, budget_args = resolve_setup("recommended_query_agnostic:budget.summary_sketch=0")
    assert Budget(ratio=4, allocation=allocation, **budget_args).summary_sketch == 0
    refused = r"summary_sketch=8 sketches .* it needs budget.summary_slots=1.* \(got summary_slots=0"
    with pytest.raises(BudgetError, match=refused):
        Budget(ratio=4, **resolve_setup("recommended_query_agnostic:budget.summary_slots=0")[5])


def test_an_experiment_that_is_not_a_preset_is_no_setup(tmp_path, monkeypatch) -> None:
    from kvcompress.experiment import setups

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "sweep.yaml").write_text("defaults:\n  - override /policy: lfu\ntask:\n  name: x\n")
    (tmp_path / "experiment" / "bare.yaml").write_text("budget:\n  allocation: global\n")
    monkeypatch.setattr(setups, "config_dir", lambda group: tmp_path / group)
    with pytest.raises(ValueError, match="sweep.yaml sets task: not a preset"):
        resolve_setup("sweep")
    with pytest.raises(ValueError, match="bare.yaml names no policy"):
        resolve_setup("bare")


@pytest.mark.parametrize("name", BUDGETS)
def test_named_budget_configs_change_only_the_allocation(name: str) -> None:
    register_policy_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"budget={name}", "budget.ratio=8", "policy=lfu_avg"])
        plain = compose(config_name="config")
    assert cfg.budget.ratio == 8 and cfg.budget.allocation == "global"
    others = {k: v for k, v in cfg.budget.items() if k not in ("ratio", "allocation", "allocator_args")}
    assert others == {k: v for k, v in plain.budget.items() if k in others}, "the rest of the budget is the default's"
    allocator = build_allocator(cfg.budget.allocation, cfg.budget.allocator_args)
    assert isinstance(allocator, GlobalAllocator) and allocator != GlobalAllocator()
    assert instantiate(cfg.policy).metric == "L2-avg"
