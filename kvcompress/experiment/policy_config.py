"""Building a policy from its Hydra yaml (``conf/policy/<name>.yaml``) outside a Hydra app: scripts and benches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf

from kvcompress.policies.base import Policy

# the repository's conf/ (kvcompress is installed editable from the repository root)
POLICY_DIR = Path(__file__).resolve().parents[2] / "conf" / "policy"


def load_policy(name: str, **overrides: Any) -> Policy:
    """Instantiate ``conf/policy/<name>.yaml`` with ``overrides`` of its fields; unknown names list the accepted."""
    path = POLICY_DIR / f"{name}.yaml"
    if not path.exists():
        accepted = ", ".join(sorted(p.stem for p in POLICY_DIR.glob("*.yaml")))
        raise ValueError(f"unknown policy {name!r}; accepted: {accepted}")
    return instantiate(OmegaConf.load(path), **overrides)
