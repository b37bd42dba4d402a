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
    template_prefix_ids,
)
from kvcompress.generate import as_request
from kvcompress.policies.base import ReconstructionPass
from kvcompress.policies.kvzip import KVzipPolicy
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
    suffix_text = tokenizer.decode(prompt.suffix_ids)
    assert context_text + question_text + suffix_text == rendered
    assert context_text.endswith(sample.context) and "<|im_start|>user\n" in context_text
    assert question_text == sample.question
    assert suffix_text.startswith("<|im_end|>") and suffix_text.endswith("<|im_start|>assistant\n")
    assert prompt.ids == prompt.context_ids + prompt.question_ids + prompt.suffix_ids
    assert len(prompt) == len(prompt.ids)


def test_query_aware_compresses_through_the_question_only(tiny_model_dir: Path) -> None:
    """The protocol that decides what a window scorer observes: query-aware compresses context + question and
    prefills the template's tail (end of turn, assistant header) after compression, as kvpress does; the last
    observed query is the question's last token, not the header's newline (docs/RESULTS.md, TOVA)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = build_prompt(tokenizer, _sample("The pass key is 12345.\n\n", "What is the pass key?"))
    aware = as_request(0, prompt.context_ids, prompt.question_ids, "query_aware", 8, suffix=prompt.suffix_ids)
    agnostic = as_request(1, prompt.context_ids, prompt.question_ids, "query_agnostic", 8, suffix=prompt.suffix_ids)
    assert list(aware.prompt_ids) == prompt.context_ids + prompt.question_ids
    assert list(aware.question_ids) == prompt.suffix_ids
    assert tokenizer.decode(aware.prompt_ids[-1:]) == "?"
    assert list(agnostic.prompt_ids) == prompt.context_ids
    assert list(agnostic.question_ids) == prompt.question_ids + prompt.suffix_ids
    assert prompt.compressed_len("query_aware") == len(aware.prompt_ids)
    assert prompt.compressed_len("query_agnostic") == len(agnostic.prompt_ids)


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


def test_kvzip_skip_prefix_reconstructs_the_context_without_the_template(tiny_model_dir: Path) -> None:
    """``skip_prefix`` drops the chat template's system prompt and user header from the reconstruction only when
    the prompt starts with them; without a template there is no prefix."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prefix = template_prefix_ids(tokenizer)
    assert tokenizer.decode(prefix).endswith("<|im_start|>user\n")
    prompt = build_prompt(tokenizer, _sample("The pass key is 12345.\n\n", "What is the pass key?"))
    assert prompt.context_ids[: len(prefix)] == prefix
    kept = KVzipPolicy(repeat_ids=[7], prefix_ids=prefix)
    skipped = KVzipPolicy(repeat_ids=[7], prefix_ids=prefix, skip_prefix=True)
    n = len(prompt.context_ids)
    assert kept.reconstruction(prompt.context_ids) == [ReconstructionPass(n, [7, *prompt.context_ids])]
    (one,) = skipped.reconstruction(prompt.context_ids)
    assert one == ReconstructionPass(n, [7, *prompt.context_ids[len(prefix) :]])
    assert tokenizer.decode(one.tokens[1:]) == "The pass key is 12345.\n\n"
    other = [p + 1 for p in prompt.context_ids]  # a prompt without the template's prefix is reconstructed whole
    assert skipped.reconstruction(other) == [ReconstructionPass(n, [7, *other])]
    tokenizer.chat_template = None
    assert template_prefix_ids(tokenizer) == []
