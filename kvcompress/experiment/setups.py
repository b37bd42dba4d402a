"""Named evaluation setups: a policy config, an allocation and their arguments, under one label.

``scripts/quality_table.py`` runs setups side by side and ``scripts/inspect_allocation.py`` looks inside one. A
label is one of :data:`SETUPS` / :data:`VARIANTS`, ``<policy>+<allocation>`` with any ``conf/policy`` name and an
allocator or a named ``conf/budget`` config, or a preset (``conf/experiment/<name>.yaml`` that sets only the policy
and the budget: ``recommended_query_aware``, ``kv_compress``), run exactly as ``experiment=<name>`` runs it. It may
carry arguments after a colon, each ``key=value`` for the allocator (``budget.allocator_args``),
``policy.key=value`` for the policy's fields or ``budget.key=value`` for the budget's (:data:`BUDGET_FIELDS`):
``lfu+global:floor=0.2,normalize=sum``, ``kvzip+global:policy.window=32``, ``kvzip+global:budget.summary_slots=1``.
"""

from __future__ import annotations

from dataclasses import fields

import yaml
from omegaconf import OmegaConf

from kvcompress.allocators import ALLOCATORS
from kvcompress.budget import Budget
from kvcompress.compressor import Compressor
from kvcompress.experiment.policy_config import config_dir, load_policy, policy_names

# (label, policy config, allocation)
SETUPS = [
    ("lfu+global", "lfu", "global"),
    ("lfu+uniform", "lfu", "uniform"),
    ("snapkv", "snapkv", "uniform"),
    ("snapkv+adakv", "snapkv", "adakv"),
    ("pyramidkv", "pyramidkv", "pyramid"),
    ("h2o", "h2o", "uniform"),
    ("tova", "tova", "uniform"),
    ("streaming", "streaming", "uniform"),
    ("expected_attention", "expected_attention", "uniform"),
    ("keydiff", "keydiff", "uniform"),
    ("knorm", "knorm", "uniform"),
    ("random", "random", "uniform"),
]
# Variants, run only when named in --setups (label -> policy config, allocation, policy overrides).
VARIANTS = {
    "lfu-allq+global": ("lfu", "global", {"window": -1}),
    "lfu-L1avg+global": ("lfu", "global", {"metric": "L1-avg"}),
    "lfu-nopool+global": ("lfu", "global", {"pool_kernel": 1}),
    "hybrid": ("hybrid", "uniform", {}),
    "kvzip": ("kvzip", "uniform", {}),
    "lfu-bias+global": ("lfu", "global", {"head_bias": None}),  # the file comes from --head-bias
}


# Budget fields a setup may set; the ratio and the allocation come from the script and the label
BUDGET_FIELDS = tuple(
    f.name for f in fields(Budget) if f.name not in ("ratio", "max_cache_tokens", "allocation", "allocator_args")
)


def split_setups(text: str) -> list[str]:
    """``--setups`` into setup names: a comma-separated ``key=value`` continues the previous setup's arguments
    (``a,b:floor=0.2,normalize=sum`` -> ``["a", "b:floor=0.2,normalize=sum"]``); setup labels hold no ``=``. An
    empty ``text`` is no setup (a quality table then runs only its full-cache baseline)."""
    names: list[str] = []
    for token in text.split(",") if text.strip() else []:
        if "=" in token and ":" not in token and names:
            names[-1] += f",{token}"
        else:
            names.append(token)
    return names


def budget_allocation(name: str) -> tuple[str, dict]:
    """``(allocation, allocator args)`` of an allocator name (``global``) or of a named budget config
    (``conf/budget/<name>.yaml``, e.g. ``global_floor``); raises ``ValueError`` naming both kinds."""
    if name in ALLOCATORS:
        return name, {}
    path = config_dir("budget") / f"{name}.yaml"
    if name == "default" or not path.is_file():
        named = sorted(p.stem for p in config_dir("budget").glob("*.yaml") if p.stem != "default")
        raise ValueError(
            f"unknown allocation {name!r}; accepted: an allocator ({', '.join(ALLOCATORS)}) "
            f"or a budget config ({', '.join(named)})"
        )
    budget = OmegaConf.to_container(OmegaConf.load(path))
    return budget.get("allocation", "uniform"), budget.get("allocator_args") or {}


def preset(name: str) -> tuple[str, str, dict, dict, dict] | None:
    """``(policy config, allocation, policy fields, allocator args, budget fields)`` that the experiment config
    ``conf/experiment/<name>.yaml`` sets, or ``None`` if there is no such file. Raises ``ValueError`` if it sets
    anything a setup cannot (a task, a sweep, a model): such an experiment is not a preset."""
    path = config_dir("experiment") / f"{name}.yaml"
    if not path.is_file():
        return None
    cfg = OmegaConf.to_container(OmegaConf.load(path)) or {}
    policy = None
    for entry in cfg.pop("defaults", []):
        key, value = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        if key != "override /policy":
            raise ValueError(f"{path}: defaults entry {entry!r} is not a preset's; accepted: override /policy")
        policy = value
    budget = dict(cfg.pop("budget", None) or {})
    overrides = dict(cfg.pop("policy", None) or {})
    allocation = budget.pop("allocation", "uniform")
    allocator_args = dict(budget.pop("allocator_args", None) or {})
    extra = sorted(cfg) + [f"budget.{k}" for k in budget if k not in BUDGET_FIELDS]
    if extra:
        raise ValueError(f"{path} sets {', '.join(extra)}: not a preset (a setup sets only the policy and budget)")
    if policy is None:
        raise ValueError(f"{path} names no policy: a preset's defaults hold '- override /policy: <name>'")
    return policy, allocation, overrides, allocator_args, budget


def resolve_setup(name: str) -> tuple[str, str, str, dict, dict, dict]:
    """``label[:key=value,...]`` -> ``(name, policy config, allocation, policy overrides, allocator args, budget
    fields)``.

    A label is one of :data:`SETUPS` / :data:`VARIANTS`, a preset (:func:`preset`), or ``<policy>+<allocation>``
    with any ``policy=`` name (``conf/policy``) and an allocator or named budget config (``lfu_avg+global``,
    ``lfu+global_floor``); ``key=value`` arguments after the colon override the budget config's or preset's,
    ``policy.key=value`` ones set the policy's fields (over a variant's), ``budget.key=value`` ones the
    budget's. Raises ``ValueError`` naming what is accepted."""
    label, _, arg_text = name.partition(":")
    known = {s[0]: (s[1], s[2], {}) for s in SETUPS} | VARIANTS
    allocator_args: dict = {}
    overrides: dict = {}
    budget_args: dict = {}
    if label in known:
        policy, allocation, variant_overrides = known[label]
        overrides.update(variant_overrides)  # a copy: the colon's policy fields must not change VARIANTS
    elif (fixed := preset(label)) is not None:
        policy, allocation, overrides, allocator_args, budget_args = fixed
    else:
        policy, plus, allocation = label.partition("+")
        if not plus or policy not in policy_names():
            raise ValueError(
                f"unknown setup {label!r}; accepted: {', '.join(known)}, a preset of conf/experiment, or "
                f"<policy>+<allocation> with a policy of {', '.join(policy_names())}"
            )
        allocation, allocator_args = budget_allocation(allocation)
    for pair in filter(None, arg_text.split(",")):
        key, eq, value = pair.partition("=")
        if not eq or not key or key in ("policy.", "budget."):
            raise ValueError(
                f"setup {name!r}: argument {pair!r} is not key=value, policy.key=value or budget.key=value"
            )
        if key.startswith("policy."):
            overrides[key.removeprefix("policy.")] = yaml.safe_load(value)
        elif key.startswith("budget."):
            field = key.removeprefix("budget.")
            if field not in BUDGET_FIELDS:
                raise ValueError(
                    f"setup {name!r}: the budget has no field {field!r} a setup may set; accepted: "
                    f"{', '.join(BUDGET_FIELDS)}"
                )
            budget_args[field] = yaml.safe_load(value)
        else:
            allocator_args[key] = yaml.safe_load(value)
    return name, policy, allocation, overrides, allocator_args, budget_args


def check_setup(
    label: str, policy: str, allocation: str, overrides: dict, allocator_args: dict, budget_args: dict | None = None
) -> None:
    """Build a :func:`resolve_setup` result's policy and compressor once, so that an unknown policy field, a bad
    allocator argument or an allocation the policy does not compose with (``tova+global``) fails before a script
    loads the model rather than when its run reaches the setup. Raises ``ValueError`` naming the setup."""
    try:
        budget = Budget(allocation=allocation, allocator_args=allocator_args, **(budget_args or {}))
        Compressor(load_policy(policy, **overrides), budget)
    except ValueError as err:
        raise ValueError(f"setup {label!r}: {err}") from None
