"""Policy configs: one Hydra structured config per policy dataclass, and :func:`load_policy` outside a Hydra app.

Every policy class in :mod:`kvcompress.policies` is a dataclass; :func:`policy_schema` turns its init fields
(leading-underscore and ``init=False`` fields left out) into a structured config with ``_target_`` set to the
class. :func:`register_policy_configs` stores them in Hydra's ConfigStore (done on import of this module):

* ``schema/policy/<name>``: the schema of each ``conf/policy/<name>.yaml`` (the class its ``_target_`` names) and
  of each policy module. ``conf/config.yaml`` merges it under the chosen yaml
  (``- schema/policy@policy: ${policy}``), so every field of the class is overridable without ``+`` and values
  are type-checked, whatever the yaml lists;
* ``policy/<module>``: a policy module with no yaml is still selectable (``policy=<module>``), with its class
  defaults.

The yamls (``conf/policy/*.yaml``) ship inside the package as ``kvcompress/_conf/policy`` (see pyproject.toml),
so :func:`load_policy` works from a wheel or a non-editable install as well as from a checkout.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import pkgutil
import types
import typing
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

import kvcompress
import kvcompress.policies
from kvcompress.policies.base import Policy

SCHEMA_GROUP = "schema/policy"
# where the Hydra configs are: inside the installed package (wheel / non-editable install), else the checkout's
CONF_DIRS = (
    Path(kvcompress.__file__).resolve().parent / "_conf",
    Path(__file__).resolve().parents[2] / "conf",
)
# types OmegaConf can check; any other annotation becomes Any
_SIMPLE_TYPES = (int, float, bool, str)


def config_dir(group: str) -> Path:
    """The directory of a config group's yamls (``conf/<group>``; first of :data:`CONF_DIRS` that has it)."""
    for path in CONF_DIRS:
        if (path / group).is_dir():
            return path / group
    return CONF_DIRS[-1] / group


def policy_dir() -> Path:
    """The directory holding the policy yamls."""
    return config_dir("policy")


def policy_classes() -> dict[str, type[Policy]]:
    """Policy dataclasses of :mod:`kvcompress.policies` by module name (``lfu`` -> ``LFUPolicy``)."""
    found: dict[str, type[Policy]] = {}
    for info in pkgutil.iter_modules(kvcompress.policies.__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{kvcompress.policies.__name__}.{info.name}")
        classes = [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Policy) and obj.__module__ == module.__name__
        ]
        if len(classes) == 1 and dataclasses.is_dataclass(classes[0]):
            found[info.name] = classes[0]
    return found


def policy_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The configurable fields of a policy dataclass: init fields without a leading underscore."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def _config_type(annotation: Any) -> Any:
    """An annotation OmegaConf can validate (int, float, bool, str or Optional of one), else Any."""
    if annotation in _SIMPLE_TYPES:
        return annotation
    args = typing.get_args(annotation)
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    if is_union and len(args) == 2 and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        if inner in _SIMPLE_TYPES:
            return typing.Optional[inner]  # noqa: UP045 (make_dataclass needs a runtime type object)
    return Any


def _default(f: dataclasses.Field) -> dataclasses.Field:
    """The schema field's default: the class field's default (a copy per instance for factories), else ``???``."""
    if f.default is not dataclasses.MISSING:
        return dataclasses.field(default=f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value))
    return dataclasses.field(default=MISSING)


def target_of(cls: type) -> str:
    """The ``_target_`` string of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.cache
def policy_schema(cls: type) -> type:
    """A structured-config dataclass ``<Class>Config`` with ``_target_`` and the class's configurable fields."""
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, Any, dataclasses.Field]] = [("_target_", str, dataclasses.field(default=target_of(cls)))]
    for name, f in policy_fields(cls).items():
        fields.append((name, _config_type(hints.get(name, Any)), _default(f)))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


def _target_class(target: str) -> type | None:
    """The class a ``_target_`` string names, or None when it cannot be imported."""
    module_name, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        return None


def yaml_targets(directory: Path | None = None) -> dict[str, str]:
    """``{yaml stem: its _target_}`` for the policy yamls in ``directory`` (default: :func:`policy_dir`)."""
    directory = directory or policy_dir()
    out = {}
    for path in sorted(directory.glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if target:
            out[path.stem] = str(target)
    return out


def register_policy_configs(directory: Path | None = None) -> None:
    """Store every policy schema (and the yaml-less policies) in Hydra's ConfigStore; calling it again is harmless."""
    cs = ConfigStore.instance()
    yamls = yaml_targets(directory)
    for name, cls in policy_classes().items():
        cs.store(group=SCHEMA_GROUP, name=name, node=policy_schema(cls), provider="kvcompress")
        if name not in yamls:  # same-named yaml and store entry would trigger Hydra's deprecated schema matching
            cs.store(group="policy", name=name, node=policy_schema(cls), provider="kvcompress")
    for stem, target in yamls.items():
        cls = _target_class(target)
        if cls is not None and dataclasses.is_dataclass(cls):
            node: Any = policy_schema(cls)
        else:  # a user class that is not a dataclass: no schema, the yaml alone decides
            node = {"_target_": target}
        cs.store(group=SCHEMA_GROUP, name=stem, node=node, provider="kvcompress")


def policy_names() -> list[str]:
    """Every accepted ``policy=`` name: the yamls plus the policy modules without one."""
    return sorted(set(yaml_targets()) | set(policy_classes()))


def class_of(name: str) -> type | None:
    """The class behind ``policy=<name>`` (its yaml's ``_target_``, else the module's class), or None."""
    target = yaml_targets().get(name)
    return _target_class(target) if target else policy_classes().get(name)


def unknown_field_message(name: str, key: str) -> str | None:
    """``None`` when ``policy=<name>`` has field ``key``, else the one-line error naming its real fields."""
    cls = class_of(name)
    if cls is None or not dataclasses.is_dataclass(cls):
        return None
    fields = policy_fields(cls)
    if key in fields or key == "_target_":
        return None
    accepted = ", ".join(fields) or "none (it takes no parameters)"
    return f"policy.{key}: {cls.__name__} (policy={name}) has no field {key!r}; its fields: {accepted}"


def load_policy(name: str, **overrides: Any) -> Policy:
    """Instantiate ``conf/policy/<name>.yaml`` with ``overrides`` of its fields; unknown names list the accepted.

    A policy module without a yaml is built from its class defaults; an override that is not a field of the class
    raises ``ValueError`` naming the real fields.
    """
    path = policy_dir() / f"{name}.yaml"
    if path.exists():
        cfg = OmegaConf.load(path)
    elif name in policy_classes():
        cfg = OmegaConf.create({"_target_": target_of(policy_classes()[name])})
    else:
        raise ValueError(f"unknown policy {name!r}; accepted: {', '.join(policy_names())}")
    for key in overrides:
        message = unknown_field_message(name, key)
        if message is not None:
            raise ValueError(message)
    return instantiate(cfg, **overrides)


register_policy_configs()


def default_policy(config_yaml: Path) -> str | None:
    """The ``policy`` entry of a Hydra primary config's defaults list (``conf/config.yaml``: ``lfu``)."""
    for entry in OmegaConf.load(config_yaml).get("defaults") or []:
        if isinstance(entry, dict | DictConfig) and "policy" in entry:
            return str(entry["policy"])
    return None


def check_policy_overrides(argv: list[str], config_yaml: Path | None = None) -> str | None:
    """Check ``policy.<field>=...`` command-line overrides against the chosen policies' classes, before Hydra.

    Returns the one-line error (naming the class's real fields) for the first override that names no field of a
    chosen policy, else None. The policies are those of ``policy=...`` (a sweep counts each), else the primary
    config's default; with an ``experiment=`` preset and no ``policy=`` the check is left to Hydra. ``+``/``~``
    overrides and malformed command lines are left to Hydra as well.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    try:
        args, _ = get_args_parser().parse_known_args(argv)
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # noqa: BLE001 (Hydra reports a malformed command line itself)
        return None
    choices: list[str] | None = None
    keys: list[str] = []
    preset = False
    for o in overrides:
        if o.key_or_group == "policy" and o.package is None:
            choices = [str(v) for v in o.sweep_string_iterator()] if o.is_sweep_override() else [str(o.value())]
        elif o.key_or_group.startswith("policy.") and o.type == OverrideType.CHANGE:
            keys.append(o.key_or_group.split(".")[1])
        elif o.key_or_group == "experiment":
            preset = True
    if not keys or (choices is None and preset):
        return None
    if choices is None:
        default = default_policy(config_yaml or policy_dir().parent / "config.yaml")
        choices = [default] if default else []
    for name in choices:
        for key in keys:
            message = unknown_field_message(name, key)
            if message is not None:
                return message
    return None
