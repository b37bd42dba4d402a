"""Scoring functions, all returning 0-100.

``METRICS[name](prediction, answers, sample)`` scores one prediction against its reference answers. The
LongBench metrics follow the official ``metrics.py`` of LongBench v1 (per-reference score, max over references);
``string_match_all``/``string_match_any`` follow RULER. Use :func:`score` for name validation and LongBench's
first-line post-processing.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

from rapidfuzz import fuzz
from rouge_score import rouge_scorer

from kvcompress.tasks.base import Sample

Metric = Callable[[str, Sequence[str], "Sample | None"], float]

# LongBench cuts the prediction to its first line for these few-shot subsets (eval.py).
FIRST_LINE_TASKS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_ZH_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
_PARAGRAPH = re.compile(r"(?:Paragraph\s*|段落)(\d+)")
_PUNCTUATION = frozenset(string.punctuation)


def postprocess(task: str, prediction: str) -> str:
    """LongBench post-processing: keep only the first line for trec, triviaqa, samsum and lsht."""
    if task in FIRST_LINE_TASKS:
        return prediction.lstrip("\n").split("\n")[0]
    return prediction


def normalize_answer(text: str) -> str:
    """SQuAD/LongBench English normalisation: lower-case, drop punctuation and articles, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def zh_tokens(text: str) -> list[str]:
    """Tokens for Chinese scoring: one token per CJK character, one per run of other word characters.

    LongBench segments with jieba; we avoid that dependency and use characters, which drops punctuation the
    same way ``normalize_zh_answer`` does.
    """
    return _ZH_TOKEN.findall(text.lower())


def _token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """Bag-of-tokens F1 in [0, 1]."""
    common = Counter(prediction) & Counter(reference)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(reference)
    return 2 * precision * recall / (precision + recall)


class _ZhTokenizer:
    """Adapter giving rouge-score the character-level Chinese tokenisation."""

    def tokenize(self, text: str) -> list[str]:
        return zh_tokens(text)


@lru_cache(maxsize=2)
def _rouge(chinese: bool) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_ZhTokenizer() if chinese else None)


def _max_over_refs(per_ref: Callable[[str, str], float]) -> Metric:
    """Lift a per-reference score in [0, 1] to a metric: max over references, scaled to 0-100."""

    def metric(prediction: str, answers: Sequence[str], sample: Sample | None = None) -> float:
        return 100.0 * max(per_ref(prediction, ref) for ref in answers)

    metric.__doc__ = per_ref.__doc__
    return metric


def _contains(prediction: str, reference: str) -> float:
    return float(reference.lower() in prediction.lower())


def string_match_all(prediction: str, answers: Sequence[str], sample: Sample | None = None) -> float:
    """Percentage of references contained (case-insensitively) in the prediction."""
    return 100.0 * sum(_contains(prediction, ref) for ref in answers) / len(answers)


def _qa_f1(prediction: str, reference: str) -> float:
    """SQuAD-normalised token F1."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def _qa_f1_zh(prediction: str, reference: str) -> float:
    """Token F1 over Chinese character tokens."""
    return _token_f1(zh_tokens(prediction), zh_tokens(reference))


def _rouge_l(prediction: str, reference: str) -> float:
    """rouge-score ROUGE-L F-measure."""
    return _rouge(False).score(reference, prediction)["rougeL"].fmeasure


def _rouge_l_zh(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure over Chinese character tokens."""
    return _rouge(True).score(reference, prediction)["rougeL"].fmeasure


def _fraction_equal(prediction: str, target: str) -> float:
    """Share of the numbers in ``prediction`` that equal ``target`` (0 if it has none)."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def _count(prediction: str, reference: str) -> float:
    """LongBench passage_count: share of predicted numbers equal to the reference."""
    return _fraction_equal(prediction, reference.strip())


def _retrieval(prediction: str, reference: str) -> float:
    """LongBench passage_retrieval: share of predicted numbers equal to the reference's "Paragraph N"/"段落N"."""
    match = _PARAGRAPH.search(reference)
    if match is None:
        raise ValueError(f"retrieval reference {reference!r} has no 'Paragraph N' / '段落N'")
    return _fraction_equal(prediction, match.group(1))


def first_code_line(prediction: str) -> str:
    """The first line that is not a comment or a code fence (LongBench code_sim), or '' if none."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def _code_sim(prediction: str, reference: str) -> float:
    """rapidfuzz ratio of the first code line against the reference."""
    return fuzz.ratio(first_code_line(prediction), reference) / 100.0


def classification(prediction: str, answers: Sequence[str], sample: Sample | None = None) -> float:
    """LongBench classification: 1/k if the reference is among the k class names found in the prediction.

    Class names that are a strict substring of the reference are not counted (e.g. "Location" vs "Other
    location"). As in LongBench (whose fallback branch is unreachable), no class found scores 0.
    """
    if sample is None or not sample.all_classes:
        raise ValueError("the 'classification' metric needs a sample with all_classes")
    found = [c for c in sample.all_classes if c in prediction]
    best = 0.0
    for reference in answers:
        kept = [c for c in found if c == reference or c not in reference]
        if reference in kept:
            best = max(best, 1.0 / len(kept))
    return 100.0 * best


METRICS: dict[str, Metric] = {
    "string_match_all": string_match_all,
    "string_match_any": _max_over_refs(_contains),
    "qa_f1": _max_over_refs(_qa_f1),
    "qa_f1_zh": _max_over_refs(_qa_f1_zh),
    "rouge_l": _max_over_refs(_rouge_l),
    "rouge_l_zh": _max_over_refs(_rouge_l_zh),
    "classification": classification,
    "retrieval": _max_over_refs(_retrieval),
    "count": _max_over_refs(_count),
    "code_sim": _max_over_refs(_code_sim),
}


def check_metric(name: str) -> None:
    """Raise ValueError naming the accepted metrics if ``name`` is not one of them."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; accepted: {', '.join(sorted(METRICS))}")


def score(metric_name: str, prediction: str, answers: Sequence[str], sample: Sample | None = None) -> float:
    """Score ``prediction`` (0-100) with the named metric.

    When ``sample`` is given, LongBench's first-line post-processing for ``sample.task`` is applied first
    (it is idempotent, so a prediction already passed through :func:`postprocess` is unaffected).
    """
    check_metric(metric_name)
    if not answers:
        raise ValueError("no reference answers to score against")
    if sample is not None:
        prediction = postprocess(sample.task, prediction)
    return METRICS[metric_name](prediction, answers, sample)
