"""RULER-style generators and passkey: sizing, answers present, depth sweep, determinism."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest

from kvcompress.tasks.passkey import Passkey
from kvcompress.tasks.ruler import (
    RULER_TASKS,
    FrequentWords,
    NiahMultiKey,
    NiahMultiQuery,
    NiahMultiValue,
    NiahSingle,
    RulerMix,
    VariableTracking,
)
from kvcompress.tasks.synthetic import SyntheticTask, insert_at_depths
from kvcompress.tasks.tokens import count_tokens, truncate_middle

GENERATORS: list[type[SyntheticTask]] = [*RULER_TASKS.values(), Passkey]
NEEDLE = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.")


@pytest.mark.parametrize("cls", GENERATORS, ids=lambda c: c.name)
@pytest.mark.parametrize("target", [800, 3000])
def test_length_within_5_percent_of_target(cls: type[SyntheticTask], target: int, tokenizer: Any) -> None:
    samples = cls(tokenizer, n_samples=3, target_tokens=target, seed=1).samples()
    assert len(samples) == 3
    for s in samples:
        n = count_tokens(tokenizer, s.context + s.question)
        assert 0.95 * target <= n <= target, (s.task, n)
        assert s.context.endswith("\n\n") and s.question.strip()
        assert s.metric == "string_match_all" and 0 < s.max_new_tokens <= 64


@pytest.mark.parametrize("cls", GENERATORS, ids=lambda c: c.name)
def test_answers_in_context_not_in_question(cls: type[SyntheticTask], tokenizer: Any) -> None:
    for s in cls(tokenizer, n_samples=4, target_tokens=600, seed=3).samples():
        assert s.answers
        for answer in s.answers:
            assert answer in s.context
            assert answer.lower() not in s.question.lower()


@pytest.mark.parametrize("cls", GENERATORS, ids=lambda c: c.name)
def test_deterministic_by_seed(cls: type[SyntheticTask], tokenizer: Any) -> None:
    a = cls(tokenizer, n_samples=2, target_tokens=400, seed=7).samples()
    b = cls(tokenizer, n_samples=2, target_tokens=400, seed=7).samples()
    c = cls(tokenizer, n_samples=2, target_tokens=400, seed=8).samples()
    assert a == b
    assert [s.answers for s in a] != [s.answers for s in c]
    assert len({s.sample_id for s in a}) == 2 and a[0].sample_id != c[0].sample_id


@pytest.mark.parametrize("cls", [NiahSingle, Passkey], ids=lambda c: c.name)
def test_needle_depth_sweeps(cls: type[SyntheticTask], tokenizer: Any) -> None:
    samples = cls(tokenizer, n_samples=5, target_tokens=1000).samples()
    depths = [s.context.index(s.answers[0]) / len(s.context) for s in samples]
    assert depths == sorted(depths)
    assert depths[0] < 0.2 and depths[-1] > 0.8


def test_niah_variants_needle_counts(tokenizer: Any) -> None:
    def needles(context: str) -> list[tuple[str, str]]:
        return NEEDLE.findall(context)

    single = NiahSingle(tokenizer, 1, 500).samples()[0]
    assert needles(single.context) == [(needles(single.context)[0][0], single.answers[0])]

    multikey = NiahMultiKey(tokenizer, 1, 500).samples()[0]
    found = needles(multikey.context)
    assert len({k for k, _ in found}) == 4 and len(multikey.answers) == 1
    asked = [k for k, v in found if v == multikey.answers[0]]
    assert len(asked) == 1 and asked[0] in multikey.question
    assert sum(k in multikey.question for k, _ in found) == 1

    multivalue = NiahMultiValue(tokenizer, 1, 500).samples()[0]
    found = needles(multivalue.context)
    assert len({k for k, _ in found}) == 1 and sorted(v for _, v in found) == sorted(multivalue.answers)
    assert len(multivalue.answers) == 4

    multiquery = NiahMultiQuery(tokenizer, 1, 500).samples()[0]
    found = needles(multiquery.context)
    assert sorted(v for _, v in found) == sorted(multiquery.answers) and len(found) == 4
    assert all(k in multiquery.question for k, _ in found)


def test_variable_tracking_chain_resolves_to_answers(tokenizer: Any) -> None:
    for s in VariableTracking(tokenizer, n_samples=3, target_tokens=700, num_chains=2).samples():
        value = re.search(r"assigned the value (\d+)", s.question).group(1)
        holds: set[str] = set()
        for name, source in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.context):
            if source == value or source.removeprefix("VAR ") in holds:
                holds.add(name)
        assert holds == set(s.answers) and len(s.answers) == 5


def test_frequent_words_answers_are_most_frequent(tokenizer: Any) -> None:
    for target in (700, 4200):
        s = FrequentWords(tokenizer, n_samples=1, target_tokens=target).samples()[0]
        counts = Counter(re.findall(r"\d+\. ([a-z]+)", s.context))
        top = {w for w, _ in counts.most_common(10)}
        assert top == set(s.answers)
        assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in top)
        assert len(counts) > 20  # filler words present


def test_target_below_fixed_prompt_is_an_error(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="target_tokens=20"):
        NiahSingle(tokenizer, n_samples=1, target_tokens=20).samples()


def test_ruler_mix_has_every_subtask(tokenizer: Any) -> None:
    samples = RulerMix(tokenizer, n_samples=2, target_tokens=500).samples()
    assert Counter(s.task for s in samples) == dict.fromkeys(RULER_TASKS, 2)
    assert len({s.sample_id for s in samples}) == len(samples)
    with pytest.raises(ValueError, match="accepted"):
        RulerMix(tokenizer, tasks=["niah_single", "bogus"]).samples()


def test_insert_at_depths_keeps_order() -> None:
    text = insert_at_depths(["a", "b", "c", "d"], [(1.0, "END"), (0.0, "START"), (0.5, "X1"), (0.5, "X2")])
    assert text == "START a b X1 X2 c d END"


def test_truncate_middle_keeps_head_and_tail(tokenizer: Any) -> None:
    text = "BEGIN " + "filler words here. " * 200 + "FINISH"
    cut = truncate_middle(tokenizer, text, 50)
    assert cut.startswith("BEGIN") and cut.endswith("FINISH")
    assert 45 <= count_tokens(tokenizer, cut) <= 52
    assert truncate_middle(tokenizer, "short", 50) == "short"
