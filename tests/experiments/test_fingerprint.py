"""A run's fingerprint (the key its results resume under) changes with what changes its predictions only."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from kvcompress.experiment.runner import fingerprint


def cfg(**budget):
    return OmegaConf.create({"model": {"name": "smollm2"}, "seed": 0, "budget": {"ratio": 4, **budget}})


def test_later_budget_fields_left_unset_keep_older_runs_hashes() -> None:
    base = fingerprint(cfg())
    assert base == "d4fc12580f27"  # what the runner of 9a65bed, before these fields, gives this config
    assert fingerprint(cfg(summary_shared_value=False, summary_offset=None, summary_fit_value=True)) == base
    preset = {"summary_slots": 1, "summary_max_ratio": 4}
    assert fingerprint(cfg(**preset, summary_shared_value=False, summary_offset=None)) == "af0f307c7310"
    assert fingerprint(cfg(summary_slots=4, summary_shared_value=True)) != fingerprint(cfg(summary_slots=4))


def test_a_summary_offset_file_is_hashed_by_its_content(tmp_path: Path) -> None:
    path = tmp_path / "gap.json"
    path.write_text('{"gap": [[1.0]]}')
    first = fingerprint(cfg(summary_slots=1, summary_offset=str(path)))
    assert first == fingerprint(cfg(summary_slots=1, summary_offset=str(path)))
    path.write_text('{"gap": [[2.0]]}')  # the same name, other offsets: other predictions
    assert fingerprint(cfg(summary_slots=1, summary_offset=str(path))) != first
