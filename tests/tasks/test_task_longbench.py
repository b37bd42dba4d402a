"""LongBench v1 loading from small fixture files: templates, lengths, metrics, errors, truncation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvcompress.tasks.base import TaskDataError
from kvcompress.tasks.longbench import CHINESE, ENGLISH, SUBSETS, LongBenchTask, resolve_subsets
from kvcompress.tasks.metrics import METRICS, score
from kvcompress.tasks.tokens import count_tokens

FIXTURE_SUBSETS = ["hotpotqa", "trec", "lcc", "multifieldqa_zh"]
MULTI_DOC_INSTRUCTION = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
)


@pytest.fixture
def longbench(fixtures_dir: Path) -> dict[str, list[Any]]:
    samples = LongBenchTask(fixtures_dir / "longbench", subsets=FIXTURE_SUBSETS).samples()
    by_task: dict[str, list[Any]] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    return by_task


def test_subset_tables() -> None:
    assert len(ENGLISH) == 16 and len(CHINESE) == 5
    assert {SUBSETS[n].max_new_tokens for n in ("hotpotqa", "triviaqa", "passage_count", "passage_retrieval_en")} == {
        32
    }
    assert [SUBSETS[n].max_new_tokens for n in ("narrativeqa", "samsum", "gov_report", "multi_news", "trec")] == [
        128,
        128,
        512,
        512,
        64,
    ]
    for name, spec in SUBSETS.items():
        assert spec.metric in METRICS, name
        context_part, question_part = spec.split()
        assert context_part.count("{context}") == 1 and "{context}" not in question_part
        assert ("{input}" in spec.template) == ("{input}" in question_part), name


def test_hotpotqa_template_split(longbench: dict[str, list[Any]]) -> None:
    first, second = longbench["hotpotqa"]
    assert first.context == (
        f"{MULTI_DOC_INSTRUCTION}\n\nThe following are given passages.\n"
        "Passage 1:\nThe Blue Lantern Museum opened in 1921 in Tarnwick.\n"
        "Passage 2:\nTarnwick is a port city on the northern coast.\n\n"
    )
    assert first.question == f"{MULTI_DOC_INSTRUCTION}\n\nQuestion: Which city hosts the Blue Lantern Museum?\nAnswer:"
    assert (first.metric, first.max_new_tokens, first.answers) == ("qa_f1", 32, ["Tarnwick"])
    assert first.sample_id == "longbench/hotpotqa/hp-001" and first.all_classes is None
    assert first.context_id == second.context_id  # same document, two questions


def test_trec_classification(longbench: dict[str, list[Any]]) -> None:
    s = longbench["trec"][0]
    assert s.context.startswith("Please determine the type of the question below.") and s.context.endswith(
        "Type: Distance, linear measure\n"
    )
    assert s.question == "Question: Who painted the ceiling of the chapel?\nType:"
    assert (s.metric, s.max_new_tokens) == ("classification", 64)
    assert s.all_classes == ["City", "Individual", "Distance, linear measure", "Other location"]
    assert score(s.metric, "Individual\nQuestion: x\nType: City", s.answers, s) == 100.0


def test_code_and_chinese(longbench: dict[str, list[Any]]) -> None:
    code = longbench["lcc"][0]
    assert (
        code.context == "Please complete the code given below. \ndef add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n"
    )
    assert code.question == "Next line of code:\n"
    assert (code.metric, code.max_new_tokens) == ("code_sim", 64)
    zh = longbench["multifieldqa_zh"][1]
    assert zh.context.startswith("阅读以下文字并用中文简短回答：\n\n") and zh.context.endswith("开馆。\n\n")
    assert zh.question.endswith("问题：蓝灯博物馆哪一年开馆？\n回答：")
    assert (zh.metric, zh.max_new_tokens) == ("qa_f1_zh", 64)


def test_n_samples_caps_each_subset(fixtures_dir: Path) -> None:
    samples = LongBenchTask(fixtures_dir / "longbench", subsets="hotpotqa,trec", n_samples=1).samples()
    assert [s.task for s in samples] == ["hotpotqa", "trec"]


def test_missing_subset_lists_found(fixtures_dir: Path) -> None:
    with pytest.raises(
        TaskDataError, match=r"'narrativeqa' not found; subsets in .*: hotpotqa, lcc, multifieldqa_zh, trec"
    ):
        LongBenchTask(fixtures_dir / "longbench").samples()  # default: all English subsets


def test_missing_dir_and_unknown_subset(tmp_path: Path) -> None:
    with pytest.raises(TaskDataError, match="data directory not found"):
        LongBenchTask(tmp_path / "nope", subsets="trec").samples()
    with pytest.raises(ValueError, match=r"unknown LongBench subset 'trek'; accepted: .*trec"):
        LongBenchTask(tmp_path, subsets=["trek"]).samples()
    with pytest.raises(TaskDataError, match="data_dir"):
        LongBenchTask(subsets="trec").samples()


def test_resolve_groups() -> None:
    assert resolve_subsets("zh") == list(CHINESE)
    assert resolve_subsets(["trec", "en"])[0] == "trec" and len(resolve_subsets(["trec", "en"])) == 16


def test_bad_record_reports_line(tmp_path: Path) -> None:
    (tmp_path / "trec.jsonl").write_text('{"input": "q", "context": "c", "answers": ["a"]}\n{"input": "q"}\n')
    with pytest.raises(TaskDataError, match=r"trec.jsonl:2: missing field\(s\) 'context', 'answers'"):
        LongBenchTask(tmp_path, subsets="trec").samples()


def test_truncation_from_the_middle(tmp_path: Path, tokenizer: Any) -> None:
    document = "START of the report. " + "Budget lines were reviewed again. " * 400 + "END of the report."
    record = {"input": "", "context": document, "answers": ["summary"], "_id": "g1"}
    (tmp_path / "gov_report.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    (s,) = LongBenchTask(tmp_path, subsets="gov_report", tokenizer=tokenizer, max_context_tokens=300).samples()
    assert 285 <= count_tokens(tokenizer, s.prompt) <= 302
    assert "START of the report." in s.context and s.context.endswith("END of the report.\n\n")
    assert s.question == "Now, write a one-page summary of the report.\n\nSummary:"
    (full,) = LongBenchTask(tmp_path, subsets="gov_report").samples()
    assert count_tokens(tokenizer, full.prompt) > 2000
