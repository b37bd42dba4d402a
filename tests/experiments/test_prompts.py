"""Prompt building: one chat-templated user turn split at the end of the context."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kvcompress.experiment.prompts import (
    Prompt,
    PromptTooLongError,
    build_prompt,
    check_fits,
    render_chat,
    repeat_prompt_ids,
)
from kvcompress.tasks.base import Sample


def _sample(context: str, question: str) -> Sample:
    return Sample("s0", "c0", context, question, ["x"], "t", "string_match_all", 8)


def test_split_at_end_of_context(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sample = _sample("The pass key is 12345. Remember it.\n\n", "What is the pass key?")
    prompt = build_prompt(tokenizer, sample)
    rendered = render_chat(tokenizer, sample.prompt)
    context_text = tokenizer.decode(prompt.context_ids)
    question_text = tokenizer.decode(prompt.question_ids)
    assert context_text + question_text == rendered
    assert context_text.endswith(sample.context) and "<|im_start|>user\n" in context_text
    assert question_text.startswith(sample.question) and question_text.endswith("<|im_start|>assistant\n")
    assert prompt.ids == prompt.context_ids + prompt.question_ids and len(prompt) == len(prompt.ids)


def test_check_fits_names_the_sample() -> None:
    prompt = Prompt(list(range(90)), list(range(10)))
    check_fits(prompt, 28, 128, "ok")
    with pytest.raises(PromptTooLongError, match="sample long: prompt of 100 tokens \\+ 29 new tokens exceeds"):
        check_fits(prompt, 29, 128, "long")


def test_kvzip_repeat_prompt_closes_the_turn_with_or_without_a_template(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.decode(repeat_prompt_ids(tokenizer, "Repeat the previous context exactly."))
    assert text.startswith("\n\nRepeat the previous context exactly.") and text.endswith("<|im_start|>assistant\n")
    tokenizer.chat_template = None
    text = tokenizer.decode(repeat_prompt_ids(tokenizer, "Repeat it."))
    assert text == "\n\nRepeat it.\n"
