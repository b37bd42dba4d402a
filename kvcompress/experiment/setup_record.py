"""What each setup label of a results directory ran as, so that resuming it cannot mix two configs under one label.

``scripts/quality_table.py`` keys its rows on (setup label, mode, sample id, ratio) and resumes by skipping the
rows already written. A label does not pin its config: a preset (``recommended_query_agnostic``) or a policy yaml
can change after the rows were written, and then a rerun would take the old rows as the new config's. So the
directory keeps ``setups.json``, label -> :func:`config_record` of the policy and budget the label ran, and
:func:`check_resume` refuses to add rows under a label whose record differs from what it resolves to now.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from kvcompress.budget import Budget
from kvcompress.experiment.records import write_json_atomic
from kvcompress.experiment.runner import file_sha1
from kvcompress.policies.base import Policy

SETUPS_FILE = "setups.json"
# fields naming a file whose content, not only its name, decides the predictions
_FILE_FIELDS = ("summary_offset", "head_bias")
_NO_DEFAULT = object()


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return _NO_DEFAULT


def _json(value: Any) -> Any:
    """``value`` as JSON holds it (a nested dataclass as its fields, tuples as lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {"class": type(value).__name__, **non_default(value)}
    return json.loads(json.dumps(value, default=str))


def non_default(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The init fields of dataclass ``obj`` (leading-underscore and ``skip`` ones left out) whose value differs from
    the class default, as JSON values; a file field (:data:`_FILE_FIELDS`) gains ``<name>_sha1``. Only what differs
    is kept, so a field added to the class later, at a default that keeps the old behaviour, leaves an older record
    equal."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(obj):
        if not field.init or field.name.startswith("_") or field.name in skip:
            continue
        value = getattr(obj, field.name)
        default = _default(field)
        if value == default or (default is None and value == {}):  # Budget stores allocator_args=None as {}
            continue
        out[field.name] = _json(value)
        if field.name in _FILE_FIELDS and isinstance(value, str):
            out[f"{field.name}_sha1"] = file_sha1(value)
    return out


def config_record(policy: Policy, budget: Budget) -> dict[str, Any]:
    """What a setup ran as: the policy's class and its fields, and the budget's fields, each where it differs from
    its class default. The budget's ``ratio`` is left out: each row holds its own."""
    return {"policy": _json(policy), "budget": non_default(budget, skip=("ratio",))}


def read_records(out: Path) -> dict[str, dict[str, Any]]:
    """``out/setups.json`` (label -> record), empty when there is none; ``ValueError`` if it is not such a file."""
    path = out / SETUPS_FILE
    if not path.exists():
        return {}
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err.msg}); it maps each setup label to the config it ran") from None
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
        raise ValueError(f"{path}: not a map of setup label -> config record")
    return records


def write_records(out: Path, records: dict[str, dict[str, Any]]) -> None:
    """Replace ``out/setups.json`` with ``records`` in one step (a kill mid-write leaves the old file)."""
    write_json_atomic(out / SETUPS_FILE, records)


def _flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: recorded X, now Y`` for each dotted key on which two records differ (a missing key: the default)."""
    old, new = _flat(recorded), _flat(now)

    def shown(flat: dict[str, Any], key: str) -> str:
        return json.dumps(flat[key]) if key in flat else "the default"

    return [
        f"{key}: recorded {shown(old, key)}, now {shown(new, key)}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, _NO_DEFAULT) != new.get(key, _NO_DEFAULT)
    ]


def check_resume(
    out: Path, recorded: dict[str, dict], now: dict[str, dict], with_rows: set[str], adopt: bool = False
) -> dict[str, dict]:
    """The records to write back for a run of the labels of ``now`` (label -> :func:`config_record`) into ``out``,
    whose ``setups.json`` holds ``recorded`` and whose rows hold labels ``with_rows``.

    Raises ``ValueError`` naming the label, each field that differs and the way out when a label's record differs
    from what it resolves to now, or when it has rows but no record (written before records were kept) and
    ``adopt`` is false; ``adopt`` records such rows as the config the label resolves to now."""
    problems = []
    for label, record in now.items():
        if label in recorded:
            if changed := differences(recorded[label], record):
                problems.append(
                    f"setup {label!r}: its rows in {out} ran another config ({'; '.join(changed)}). Give a new "
                    "--out, or move its rows out of the way"
                )
        elif label in with_rows and not adopt:
            problems.append(
                f"setup {label!r}: {out} holds its rows but no record of the config they ran (written before "
                f"{SETUPS_FILE} was kept), so they cannot be told from another config's. Give a new --out, or pass "
                "--adopt-rows if you know they ran the config the label resolves to now"
            )
    if problems:
        raise ValueError("\n".join(problems))
    return {**recorded, **now}
