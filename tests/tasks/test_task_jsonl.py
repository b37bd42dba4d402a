"""User jsonl task: happy path and each malformed case."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvcompress.tasks.base import TaskDataError
from kvcompress.tasks.jsonl import JsonlTask
from kvcompress.tasks.tokens import count_tokens

GOOD = {"context": "Some text.\n\n", "question": "Q?", "answers": ["a"]}


def test_happy_path(fixtures_dir: Path) -> None:
    samples = JsonlTask(fixtures_dir / "jsonl" / "valid.jsonl").samples()
    assert [s.sample_id for s in samples] == ["valid:1", "alice", "valid:4"]
    bob, alice, meeting = samples
    assert (bob.metric, bob.max_new_tokens, bob.task, bob.answers) == ("string_match_all", 64, "jsonl", ["Rome"])
    assert (alice.metric, alice.max_new_tokens, alice.task) == ("string_match_any", 8, "cities")
    assert alice.answers == ["Paris", "France"] and alice.question == "Where does Alice live? Answer:"
    assert bob.context_id == alice.context_id != meeting.context_id
    assert meeting.metric == "qa_f1" and meeting.prompt == "The meeting is on Tuesday.\n\nWhen is the meeting?"


def _write(tmp_path: Path, bad_line: str) -> Path:
    path = tmp_path / "user.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + bad_line + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"context": "c", "question": "q"}, "missing field 'answers'"),
        ({"question": "q", "answers": ["a"]}, "missing field 'context'"),
        ({"context": "c", "answers": ["a"]}, "missing field 'question'"),
        ({**GOOD, "context": 3}, "field 'context' must be a string"),
        ({**GOOD, "question": ["q"]}, "field 'question' must be a string"),
        ({**GOOD, "answers": "a"}, "field 'answers' must be a non-empty list of strings"),
        ({**GOOD, "answers": []}, "field 'answers' must be a non-empty list of strings"),
        ({**GOOD, "answers": ["a", 1]}, "field 'answers' must be a non-empty list of strings"),
        ({**GOOD, "task": 5}, "field 'task' must be a string"),
        ({**GOOD, "max_new_tokens": "8"}, "field 'max_new_tokens' must be a positive integer"),
        ({**GOOD, "max_new_tokens": 0}, "field 'max_new_tokens' must be a positive integer"),
        ({**GOOD, "max_new_tokens": True}, "field 'max_new_tokens' must be a positive integer"),
        ({**GOOD, "metric": "bleu"}, "field 'metric' has unknown value 'bleu'; accepted: "),
        ({**GOOD, "metric": "classification"}, "needs a non-empty field 'all_classes'"),
        ({**GOOD, "id": 1.5}, "field 'id' must be a string or an integer"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_malformed_record(tmp_path: Path, record: Any, expected: str) -> None:
    path = _write(tmp_path, json.dumps(record))
    with pytest.raises(TaskDataError) as info:
        JsonlTask(path).samples()
    message = str(info.value)
    assert message.startswith(f"{path}:2: ")
    assert expected in message


def test_unknown_metric_lists_accepted(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match=r"accepted: .*qa_f1.*rouge_l.*string_match_all.*string_match_any"):
        JsonlTask(_write(tmp_path, json.dumps({**GOOD, "metric": "bleu"}))).samples()


def test_invalid_json(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"context": "c", "question": ')
    with pytest.raises(TaskDataError, match=rf"^{path}:2: invalid JSON"):
        JsonlTask(path).samples()


@pytest.mark.parametrize(
    ("line", "column"),
    [('{"context": "c", "question": ', 30), ('{"context": "c",, "question": "q"}', 17), ('\ufeff{"context" 1}', 12)],
    ids=["cut-at-end", "double-comma", "bom-on-line-1"],
)
def test_invalid_json_column_is_where_the_line_breaks(tmp_path: Path, line: str, column: int) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=rf"^{path}:1: invalid JSON \(.* at column {column}\)$"):
        JsonlTask(path).samples()


def test_duplicate_id(tmp_path: Path) -> None:
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(json.dumps({**GOOD, "id": "x"}) for _ in range(2)), encoding="utf-8")
    with pytest.raises(TaskDataError, match=rf"^{path}:2: duplicate id 'x' \(first on line 1\)"):
        JsonlTask(path).samples()


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TaskDataError, match=rf"^{path}: no samples"):
        JsonlTask(path).samples()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match="not found"):
        JsonlTask(tmp_path / "absent.jsonl").samples()


def test_classification_with_classes_and_truncation(tmp_path: Path, tokenizer: Any) -> None:
    record = {
        "context": "HEAD " + "lorem ipsum dolor. " * 300 + "TAIL\n\n",
        "question": "Which label?",
        "answers": ["cat"],
        "metric": "classification",
        "all_classes": ["cat", "dog"],
    }
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(record), encoding="utf-8")
    (sample,) = JsonlTask(path, tokenizer=tokenizer, max_context_tokens=100).samples()
    assert sample.all_classes == ["cat", "dog"]
    assert sample.context.startswith("HEAD") and sample.context.endswith("TAIL\n\n")
    assert 90 <= count_tokens(tokenizer, sample.prompt) <= 102
    with pytest.raises(ValueError, match="needs a tokenizer"):
        JsonlTask(path, max_context_tokens=100).samples()
