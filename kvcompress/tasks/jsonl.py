"""User-supplied jsonl task (``task=jsonl``): one JSON object per line with ``context``, ``question``, ``answers``
and optional ``task``, ``max_new_tokens``, ``metric``, ``id`` (and ``all_classes`` for ``classification``).

The line schema, defaults and errors are documented in docs/EXPERIMENTS.md ("The jsonl task")."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcompress.tasks.base import Sample, TaskDataError, context_id_for
from kvcompress.tasks.metrics import METRICS
from kvcompress.tasks.tokens import Tokenizer, truncate_to_fit

DEFAULT_METRIC = "string_match_all"
DEFAULT_MAX_NEW_TOKENS = 64


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _parse_record(record: Any, where: str) -> dict[str, Any]:
    """Validate one decoded line and return its fields with defaults applied; raise TaskDataError at ``where``."""

    def fail(what: str) -> TaskDataError:
        return TaskDataError(f"{where}: {what}")

    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}")
    for key in ("context", "question", "answers"):
        if key not in record:
            raise fail(f"missing field '{key}' (fields present: {', '.join(sorted(record)) or 'none'})")
    for key in ("context", "question", "task"):
        if key in record and not isinstance(record[key], str):
            raise fail(f"field '{key}' must be a string, got {type(record[key]).__name__}")
    if not _is_str_list(record["answers"]) or not record["answers"]:
        raise fail("field 'answers' must be a non-empty list of strings")
    max_new = record.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new <= 0:
        raise fail(f"field 'max_new_tokens' must be a positive integer, got {max_new!r}")
    metric = record.get("metric", DEFAULT_METRIC)
    if metric not in METRICS:
        raise fail(f"field 'metric' has unknown value {metric!r}; accepted: {', '.join(sorted(METRICS))}")
    all_classes = record.get("all_classes")
    if all_classes is not None and not _is_str_list(all_classes):
        raise fail("field 'all_classes' must be a list of strings")
    if metric == "classification" and not all_classes:
        raise fail("metric 'classification' needs a non-empty field 'all_classes'")
    sample_id = record.get("id")
    if sample_id is not None and (isinstance(sample_id, bool) or not isinstance(sample_id, str | int)):
        raise fail(f"field 'id' must be a string or an integer, got {type(sample_id).__name__}")
    return {**record, "max_new_tokens": max_new, "metric": metric, "all_classes": all_classes}


@dataclass
class JsonlTask:
    """Samples from a jsonl file. Identical contexts share a ``context_id`` (compressed once, query-agnostic).

    Without an ``id`` a sample is named ``{file stem}:{line}``. With ``tokenizer`` and ``max_context_tokens``,
    contexts are cut from the middle so that ``context + question`` fits that many tokens.
    """

    path: str | Path
    name: str = "jsonl"
    tokenizer: Tokenizer | None = None
    max_context_tokens: int | None = None

    def samples(self) -> list[Sample]:
        """Parse and validate the whole file; raise TaskDataError (``path:line: ...``) on the first problem."""
        path = Path(self.path)
        if not path.is_file():
            raise TaskDataError(f"{path}: jsonl task file not found")
        out: list[Sample] = []
        seen: dict[str, int] = {}
        with path.open(encoding="utf-8-sig") as handle:  # -sig: a leading byte-order mark is not part of line 1
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    # without its newline: an error at the end of the line is reported there, not at "line 2 col 1"
                    record = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as err:
                    raise TaskDataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from err
                fields = _parse_record(record, where)
                sample_id = str(fields.get("id", f"{path.stem}:{lineno}"))
                if sample_id in seen:
                    raise TaskDataError(f"{where}: duplicate id {sample_id!r} (first on line {seen[sample_id]})")
                seen[sample_id] = lineno
                out.append(self._sample(sample_id, fields))
        if not out:
            raise TaskDataError(f"{path}: no samples (the file is empty)")
        return out

    def _sample(self, sample_id: str, fields: dict[str, Any]) -> Sample:
        context = self._fit(fields["context"], fields["question"])
        return Sample(
            sample_id=sample_id,
            context_id=context_id_for(context, self.name),
            context=context,
            question=fields["question"],
            answers=list(fields["answers"]),
            task=fields.get("task", self.name),
            metric=fields["metric"],
            max_new_tokens=fields["max_new_tokens"],
            all_classes=fields["all_classes"],
        )

    def _fit(self, context: str, question: str) -> str:
        if self.max_context_tokens is None:
            return context
        if self.tokenizer is None:
            raise ValueError("max_context_tokens needs a tokenizer")
        return truncate_to_fit(self.tokenizer, context, question, self.max_context_tokens)
