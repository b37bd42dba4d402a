"""Policy configs generated from the policy dataclasses: every field overridable, typos name the real fields,
and :func:`load_policy` keeps working on names, overrides and errors."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kvcompress.experiment.policy_config import (
    check_policy_overrides,
    load_policy,
    policy_classes,
    policy_fields,
    policy_schema,
    register_policy_configs,
)
from kvcompress.policies.lfu import LFUPolicy

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_schema_mirrors_the_dataclass() -> None:
    schema = OmegaConf.structured(policy_schema(LFUPolicy))
    assert schema._target_ == "kvcompress.policies.lfu.LFUPolicy"
    assert set(schema) - {"_target_"} == {"metric", "window", "pool_kernel", "decode_accumulate", "decay", "head_bias"}
    assert "_window_start" not in schema and "_bias" not in schema  # init=False / private fields are not config
    for name, cls in policy_classes().items():  # every policy module gets one, defaults as in the class
        fields = policy_fields(cls)
        built = OmegaConf.structured(policy_schema(cls))
        for field in fields.values():
            if field.default is not dataclasses.MISSING:
                assert built[field.name] == field.default, (name, field.name)


def test_every_policy_yaml_composes_and_instantiates() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for path in sorted((CONF / "policy").glob("*.yaml")):
            cfg = compose(config_name="config", overrides=[f"policy={path.stem}"])
            assert type(instantiate(cfg.policy)).__name__ == cfg.policy._target_.rsplit(".", 1)[1]


def test_field_missing_from_the_yaml_is_overridable_without_plus(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "policy" / "lfu_bare.yaml").write_text("_target_: kvcompress.policies.lfu.LFUPolicy\nwindow: 8\n")
    register_policy_configs(conf / "policy")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["policy=lfu_bare", "policy.decay=0.5"])
        with pytest.raises(ConfigCompositionException):  # values are type-checked against the class
            compose(config_name="config", overrides=["policy=lfu_bare", "policy.window=wide"])
    policy = instantiate(cfg.policy)
    assert isinstance(policy, LFUPolicy) and (policy.window, policy.decay, policy.pool_kernel) == (8, 0.5, 7)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["policy.windw=3"], "policy.windw: LFUPolicy (policy=lfu) has no field 'windw'; its fields: window, metric"),
        (["-m", "policy=lfu,full", "policy.window=3"], "FullPolicy (policy=full) has no field 'window'"),
        (["policy=snapkv", "policy.kernel=3"], None),
        (["+policy.extra=1"], None),  # explicit additions are Hydra's business
        (["experiment=policy_sweep", "policy.window=3"], None),  # the preset picks the policies
    ],
)
def test_override_check_names_the_real_fields(argv: list[str], expected: str | None) -> None:
    message = check_policy_overrides(argv, CONF / "config.yaml")
    assert message == expected if expected is None else expected in message


def test_load_policy_names_overrides_and_errors() -> None:
    policy = load_policy("lfu", window=8)
    assert isinstance(policy, LFUPolicy) and policy.window == 8
    with pytest.raises(ValueError, match="unknown policy 'nope'; accepted: .*lfu.*snapkv"):
        load_policy("nope")
    with pytest.raises(ValueError, match="has no field 'windw'; its fields: window"):
        load_policy("lfu", windw=8)
