"""Turning a :class:`~kvcompress.tasks.base.Sample` into the token ids the generator prefills.

The model sees ``context + question`` as one user turn of the tokenizer's chat template (with the generation
prompt). The rendered text is cut where the context ends and where the question ends, and the three parts are
tokenized separately, so ``context_ids + question_ids + suffix_ids`` is the same token sequence in both evaluation
modes. What is compressed differs (kvpress's protocol):

* query-aware compresses ``context_ids + question_ids``; the template's end of turn and assistant header
  (``suffix_ids``) are prefilled after compression. The policy's observation window therefore ends on the
  question's last token, not on the header: TOVA, whose window is that one last query, kept 10% of the
  full-cache score at 8x on niah_single when it observed the header's newline and 50% when it observes the
  question (docs/RESULTS.md, "Why our TOVA fell behind kvpress's");
* query-agnostic compresses ``context_ids`` only; ``question_ids + suffix_ids`` come after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from kvcompress.policies.base import Policy
from kvcompress.policies.kvzip import KVzipPolicy
from kvcompress.tasks.base import Sample


class ExperimentError(ValueError):
    """A run that cannot proceed as configured; the message says what to change."""


class PromptTooLongError(ExperimentError):
    """A prompt (plus its generation budget) that does not fit the model's context window."""


@dataclass
class Prompt:
    """Token ids of one sample: the context, the question, and the template's tail after the question (end of the
    user turn and the assistant header; empty without a chat template)."""

    context_ids: list[int]
    question_ids: list[int]
    suffix_ids: list[int] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return self.context_ids + self.question_ids + self.suffix_ids

    def compressed_len(self, mode: str) -> int:
        """Tokens prefilled before compression in ``mode`` (the rest is prefilled after it)."""
        return len(self.context_ids) + (len(self.question_ids) if mode == "query_aware" else 0)

    def __len__(self) -> int:
        return len(self.context_ids) + len(self.question_ids) + len(self.suffix_ids)


def render_chat(tokenizer: PreTrainedTokenizerBase, content: str) -> str:
    """The chat template applied to a single user turn, with the assistant generation prompt appended."""
    if getattr(tokenizer, "chat_template", None) is None:
        return content  # base models without a template see the raw prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def build_prompt(tokenizer: PreTrainedTokenizerBase, sample: Sample) -> Prompt:
    """Split the rendered prompt of ``sample`` at the end of its context and of its question; tokenize the parts."""
    return split_chat(tokenizer, sample.context, sample.question, f"sample {sample.sample_id}")


def split_chat(tokenizer: PreTrainedTokenizerBase, context: str, question: str, what: str) -> Prompt:
    """One user turn ``context + question``, rendered, cut where the context and the question end, the three
    parts tokenized separately."""
    content = context + question
    text, start = _render_located(tokenizer, content, what)
    cut, end = start + len(context), start + len(content)
    return Prompt(*(_encode(tokenizer, part) for part in (text[:cut], text[cut:end], text[end:])))


def _render_located(tokenizer: PreTrainedTokenizerBase, content: str, what: str) -> tuple[str, int]:
    """The chat-templated text of one user turn ``content``, and where ``content`` starts in it."""
    text = render_chat(tokenizer, content)
    start = text.find(content)
    if start < 0:
        raise ExperimentError(f"{what}: the chat template altered the prompt text; cannot split it")
    return text, start


def _encode(tokenizer: PreTrainedTokenizerBase, part: str) -> list[int]:
    return list(tokenizer(part, add_special_tokens=False)["input_ids"]) if part else []


def repeat_prompt_ids(tokenizer: PreTrainedTokenizerBase, instruction: str) -> list[int]:
    """KVzip's repeat prompt: what follows a context when ``instruction`` ends its user turn, i.e.
    ``"\\n\\n" + instruction``, the end of the turn and the assistant header of the chat template (just the
    instruction and a newline without a template); the context is then teacher-forced as the assistant's answer."""
    end = "" if getattr(tokenizer, "chat_template", None) is not None else "\n"
    repeat = split_chat(tokenizer, "<context>", f"\n\n{instruction}{end}", "the KVzip repeat prompt")
    return repeat.question_ids + repeat.suffix_ids


def template_prefix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The chat template's tokens before a user turn's content (system prompt, user header); [] without one."""
    text, start = _render_located(tokenizer, "<context>", "the chat template's prefix")
    return _encode(tokenizer, text[:start])


def bind_tokenizer(policy: Policy, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a policy that needs fixed text in the model's tokens its ids (KVzip's repeat prompt and the template's
    prefix, unless set already); other policies need nothing."""
    if isinstance(policy, KVzipPolicy):
        if policy.repeat_ids is None:
            policy.repeat_ids = repeat_prompt_ids(tokenizer, policy.instruction)
        if policy.prefix_ids is None:
            policy.prefix_ids = template_prefix_ids(tokenizer)


def check_fits(prompt: Prompt, max_new_tokens: int, max_positions: int, sample_id: str) -> None:
    """Raise :class:`PromptTooLongError` when prompt + generation exceeds the model's position limit."""
    need = len(prompt) + max_new_tokens
    if need > max_positions:
        raise PromptTooLongError(
            f"sample {sample_id}: prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the model "
            f"context of {max_positions} positions; use a smaller task.target_tokens or set task.max_context_tokens"
        )
