"""Metrics on hand-computed examples."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcompress.tasks.base import Sample
from kvcompress.tasks.metrics import METRICS, first_code_line, normalize_answer, postprocess, score, zh_tokens


def _sample(task: str = "t", all_classes: list[str] | None = None) -> Sample:
    return Sample("id", "ctx", "c", "q", ["x"], task, "classification", 8, all_classes)


def test_string_match_all_is_mean_and_case_insensitive() -> None:
    assert score("string_match_all", "Numbers: 123 and ABC", ["123", "abc", "789"]) == pytest.approx(200 / 3)
    assert score("string_match_all", "nothing", ["123"]) == 0.0


def test_string_match_any_is_max() -> None:
    assert score("string_match_any", "the value is 789", ["123", "789"]) == 100.0
    assert score("string_match_any", "the value is 78", ["123", "789"]) == 0.0


def test_normalize_answer_longbench_english() -> None:
    assert normalize_answer("The  Quick, brown FOX!  an apple") == "quick brown fox apple"


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("The Eiffel Tower!", ["eiffel tower"], 100.0),
        ("Paris, France", ["Paris"], 200 / 3),  # P = 1/2, R = 1
        ("a cat", ["the cat"], 100.0),  # articles dropped
        ("Paris, France", ["Lyon", "France"], 200 / 3),  # max over references
        ("", ["Paris"], 0.0),
    ],
)
def test_qa_f1(prediction: str, answers: list[str], expected: float) -> None:
    assert score("qa_f1", prediction, answers) == pytest.approx(expected)


def test_qa_f1_zh_character_tokens() -> None:
    assert zh_tokens("在塔恩维克。abc 12") == ["在", "塔", "恩", "维", "克", "abc", "12"]
    assert score("qa_f1_zh", "在塔恩维克", ["塔恩维克"]) == pytest.approx(100 * 2 * 0.8 / 1.8)


def test_rouge_l_lcs_f_measure() -> None:
    # LCS(the cat sat on the mat, the cat is on the mat) = 5 of 6 tokens each way.
    assert score("rouge_l", "the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(500 / 6)
    assert score("rouge_l", "the cat sat on the mat", ["dog", "The cat sat on the mat."]) == pytest.approx(100.0)


def test_rouge_l_zh_scores_chinese() -> None:
    assert score("rouge_l_zh", "会议讨论了预算", ["会议讨论了预算"]) == pytest.approx(100.0)
    assert score("rouge_l_zh", "会议讨论了", ["会议讨论了预算"]) == pytest.approx(100 * 2 * 1 * (5 / 7) / (1 + 5 / 7))


def test_code_sim_uses_first_code_line() -> None:
    prediction = "\n```python\n# the product\nreturn a * b\nprint(a)\n```"
    assert first_code_line(prediction) == "return a * b"
    assert score("code_sim", prediction, ["return a * b"]) == pytest.approx(100.0)
    # indel ratio: 2 * 12 matching chars / (16 + 12) chars
    assert score("code_sim", "    return a * b", ["return a * b"]) == pytest.approx(100 * 24 / 28)
    assert first_code_line("// only\n# comments") == ""


def test_classification_drops_substring_classes() -> None:
    sample = _sample(all_classes=["location", "Other location", "City"])
    assert score("classification", "Other location", ["Other location"], sample) == 100.0
    assert score("classification", "City or Other location", ["Other location"], sample) == 50.0
    assert score("classification", "City", ["Other location"], sample) == 0.0
    assert score("classification", "no idea", ["Other location"], sample) == 0.0
    with pytest.raises(ValueError, match="all_classes"):
        score("classification", "City", ["City"])


def test_retrieval_and_count() -> None:
    assert score("retrieval", "Paragraph 3", ["Paragraph 3"]) == 100.0
    assert score("retrieval", "Paragraph 3 or Paragraph 12", ["Paragraph 12"]) == 50.0
    assert score("retrieval", "I cannot tell", ["Paragraph 3"]) == 0.0
    assert score("retrieval", "答案是段落5", ["段落5"]) == 100.0
    assert score("count", "There are 7 unique paragraphs", ["7"]) == 100.0
    assert score("count", "7 or 8", ["7"]) == 50.0
    with pytest.raises(ValueError, match="Paragraph N"):
        score("retrieval", "3", ["three"])


def test_postprocess_first_line_only_for_listed_tasks() -> None:
    assert postprocess("trec", "\nCity\nQuestion: next one") == "City"
    assert postprocess("hotpotqa", "Paris\nmore") == "Paris\nmore"
    # score() applies it when given the sample: "Individual" on the second line no longer counts.
    sample = _sample("trec", ["City", "Individual"])
    assert score("classification", "City\nIndividual", ["City"], sample) == 100.0
    assert score("classification", "City\nIndividual", ["Individual"], sample) == 0.0
    assert score("rouge_l", "the cat\nsat", ["the cat"], _sample("samsum")) == pytest.approx(100.0)


def test_unknown_metric_lists_accepted() -> None:
    with pytest.raises(ValueError, match=r"unknown metric 'f1'.*accepted:.*qa_f1.*string_match_all"):
        score("f1", "a", ["a"])
    with pytest.raises(ValueError, match="no reference"):
        score("qa_f1", "a", [])


@given(prediction=st.text(max_size=60), answers=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3))
def test_text_metrics_stay_in_range(prediction: str, answers: list[str]) -> None:
    for name in ("string_match_all", "string_match_any", "qa_f1", "qa_f1_zh", "rouge_l", "rouge_l_zh", "code_sim"):
        assert 0.0 <= METRICS[name](prediction, answers, None) <= 100.0 + 1e-9
    assert score("string_match_any", prediction + answers[0], answers) == 100.0
