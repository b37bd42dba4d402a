"""LongBench v1 (Bai et al., 2024) from the official per-subset jsonl files (``{subset}.jsonl`` of data.zip).

Each subset fixes its prompt template (LongBench ``dataset2prompt``), generation length (``dataset2maxlen``)
and metric (``dataset2metric``). A template is split after ``{context}`` and the separator that follows it:
the first part is the compressible context, the rest (with ``{input}``) the question.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcompress.tasks.base import Sample, TaskDataError, context_id_for
from kvcompress.tasks.tokens import Tokenizer, truncate_to_fit

_ONLY_ANSWER = "Only give me the answer and do not output any other words."
_MULTI_DOC = (
    f"Answer the question based on the given passages. {_ONLY_ANSWER}\n\nThe following are given passages.\n"
    f"{{context}}\n\nAnswer the question based on the given passages. {_ONLY_ANSWER}\n\nQuestion: {{input}}\nAnswer:"
)
_STORY = "as concisely as you can, using a single phrase if possible. Do not provide any explanation."
_ARTICLE = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
    'based on the information in the article, write "unanswerable". If the question is a yes/no question, '
    'answer "yes", "no", or "unanswerable". Do not provide any explanation.'
)
_CODE = "Please complete the code given below. \n{context}"


@dataclass(frozen=True)
class SubsetSpec:
    """How LongBench prompts and scores one subset."""

    template: str
    max_new_tokens: int
    metric: str
    language: str = "en"

    def split(self) -> tuple[str, str]:
        """(context template, question template): cut after ``{context}`` and the whitespace that follows."""
        end = self.template.index("{context}") + len("{context}")
        while end < len(self.template) and self.template[end] in " \n":
            end += 1
        return self.template[:end], self.template[end:]


SUBSETS: dict[str, SubsetSpec] = {
    # single-document QA
    "narrativeqa": SubsetSpec(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        f"{_STORY}\n\nStory: {{context}}\n\nNow, answer the question based on the story {_STORY}\n\n"
        "Question: {input}\n\nAnswer:",
        128,
        "qa_f1",
    ),
    "qasper": SubsetSpec(
        f"You are given a scientific article and a question. Answer the question {_ARTICLE}\n\nArticle: {{context}}"
        f"\n\n Answer the question based on the above article {_ARTICLE}\n\nQuestion: {{input}}\n\nAnswer:",
        128,
        "qa_f1",
    ),
    "multifieldqa_en": SubsetSpec(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64,
        "qa_f1",
    ),
    "multifieldqa_zh": SubsetSpec(
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
        "\n\n问题：{input}\n回答：",
        64,
        "qa_f1_zh",
        "zh",
    ),
    # multi-document QA
    "hotpotqa": SubsetSpec(_MULTI_DOC, 32, "qa_f1"),
    "2wikimqa": SubsetSpec(_MULTI_DOC, 32, "qa_f1"),
    "musique": SubsetSpec(_MULTI_DOC, 32, "qa_f1"),
    "dureader": SubsetSpec(
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
        128,
        "rouge_l_zh",
        "zh",
    ),
    # summarization
    "gov_report": SubsetSpec(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512,
        "rouge_l",
    ),
    "qmsum": SubsetSpec(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512,
        "rouge_l",
    ),
    "multi_news": SubsetSpec(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:",
        512,
        "rouge_l",
    ),
    "vcsum": SubsetSpec(
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
        512,
        "rouge_l_zh",
        "zh",
    ),
    # few-shot learning
    "trec": SubsetSpec(
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64,
        "classification",
    ),
    "triviaqa": SubsetSpec(
        f"Answer the question based on the given passage. {_ONLY_ANSWER} The following are some examples.\n\n"
        "{context}\n\n{input}",
        32,
        "qa_f1",
    ),
    "samsum": SubsetSpec(
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128,
        "rouge_l",
    ),
    "lsht": SubsetSpec("请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}", 64, "classification", "zh"),
    # synthetic
    "passage_count": SubsetSpec(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ",
        32,
        "count",
    ),
    "passage_retrieval_en": SubsetSpec(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        'the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", '
        "etc.\n\nThe answer is: ",
        32,
        "retrieval",
    ),
    "passage_retrieval_zh": SubsetSpec(
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}"
        '\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
        32,
        "retrieval",
        "zh",
    ),
    # code
    "lcc": SubsetSpec(_CODE + "Next line of code:\n", 64, "code_sim"),
    "repobench-p": SubsetSpec(_CODE + "{input}Next line of code:\n", 64, "code_sim"),
}

ENGLISH = tuple(name for name, spec in SUBSETS.items() if spec.language == "en")
CHINESE = tuple(name for name, spec in SUBSETS.items() if spec.language == "zh")
GROUPS: dict[str, tuple[str, ...]] = {"en": ENGLISH, "zh": CHINESE, "all": tuple(SUBSETS)}
_REQUIRED = ("input", "context", "answers")


def resolve_subsets(subsets: str | Sequence[str] | None) -> list[str]:
    """Expand ``subsets`` (names, comma-separated string, or a group ``en``/``zh``/``all``; None = ``en``)."""
    names = [s.strip() for s in subsets.split(",")] if isinstance(subsets, str) else list(subsets or ["en"])
    out: list[str] = []
    for name in names:
        for subset in GROUPS.get(name, (name,)):
            if subset not in SUBSETS:
                accepted = ", ".join([*GROUPS, *SUBSETS])
                raise ValueError(f"unknown LongBench subset {subset!r}; accepted: {accepted}")
            if subset not in out:
                out.append(subset)
    return out


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (``path:line``, record) for each non-blank line, validating LongBench's required fields."""
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line.rstrip("\r\n"))  # without the newline: errors at the end point there
            except json.JSONDecodeError as err:
                raise TaskDataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(record, dict):
                raise TaskDataError(f"{where}: expected a JSON object")
            missing = [key for key in _REQUIRED if key not in record]
            if missing:
                raise TaskDataError(f"{where}: missing field(s) {', '.join(repr(k) for k in missing)}")
            yield where, record


@dataclass
class LongBenchTask:
    """LongBench v1 subsets with their official templates, generation lengths and metrics.

    Data comes from ``data_dir`` (files ``{subset}.jsonl``) or, when no directory is given, from the hub
    dataset ``hf_dataset`` via ``datasets`` (needs network). ``n_samples`` caps samples per subset.
    ``max_context_tokens`` (with ``tokenizer``) bounds the whole prompt (context + question) LongBench-style,
    cutting the middle of the document.
    """

    data_dir: str | Path | None = None
    subsets: str | Sequence[str] | None = None
    n_samples: int | None = None
    tokenizer: Tokenizer | None = None
    max_context_tokens: int | None = None
    hf_dataset: str | None = None
    name: str = "longbench"

    def samples(self) -> list[Sample]:
        """All samples of the chosen subsets, in subset order then file order."""
        if self.max_context_tokens is not None and self.tokenizer is None:
            raise ValueError("max_context_tokens needs a tokenizer")
        out: list[Sample] = []
        for subset in resolve_subsets(self.subsets):
            for index, (where, record) in enumerate(self._records(subset)):
                if self.n_samples is not None and index >= self.n_samples:
                    break
                out.append(self._sample(subset, index, where, record))
        return out

    def _records(self, subset: str) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.data_dir is not None:
            directory = Path(self.data_dir)
            if not directory.is_dir():
                raise TaskDataError(f"{directory}: LongBench data directory not found (unzip LongBench's data.zip)")
            path = directory / f"{subset}.jsonl"
            if not path.is_file():
                found = sorted(p.stem for p in directory.glob("*.jsonl"))
                raise TaskDataError(
                    f"{path}: subset {subset!r} not found; subsets in {directory}: {', '.join(found) or 'none'}"
                )
            return _read_jsonl(path)
        if self.hf_dataset is not None:
            return self._hub_records(subset)
        raise TaskDataError("LongBench needs data_dir (a directory of {subset}.jsonl files) or hf_dataset")

    def _hub_records(self, subset: str) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            import datasets

            rows = datasets.load_dataset(self.hf_dataset, subset, split="test")
        except Exception as err:  # offline, missing dataset or script-based repo: all mean "use data_dir"
            raise TaskDataError(
                f"{self.hf_dataset}/{subset}: could not load from the hub ({err}); pass data_dir instead"
            ) from err
        for index, row in enumerate(rows):
            yield f"{self.hf_dataset}/{subset}:{index + 1}", dict(row)

    def _sample(self, subset: str, index: int, where: str, record: dict[str, Any]) -> Sample:
        spec = SUBSETS[subset]
        context_template, question_template = spec.split()
        question = question_template.replace("{input}", record["input"])
        document = record["context"]
        if self.max_context_tokens is not None:
            rest = context_template.replace("{context}", "") + question
            document = truncate_to_fit(self.tokenizer, document, rest, self.max_context_tokens)
        context = context_template.replace("{context}", document)
        answers = record["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise TaskDataError(f"{where}: field 'answers' must be a non-empty list of strings")
        return Sample(
            sample_id=f"{self.name}/{subset}/{record.get('_id') or index}",
            context_id=context_id_for(context, f"{self.name}/{subset}"),
            context=context,
            question=question,
            answers=list(answers),
            task=subset,
            metric=spec.metric,
            max_new_tokens=spec.max_new_tokens,
            all_classes=record.get("all_classes") or None,
        )
