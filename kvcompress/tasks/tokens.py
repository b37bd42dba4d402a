"""Token-count helpers: measuring, middle truncation, and sizing a generated prompt to a token target."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Any HF tokenizer (fast or slow); typed loosely so the module imports without transformers' heavy symbols.
Tokenizer = Any
PromptBuilder = Callable[[int], tuple[str, str]]


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Number of tokens in ``text`` without special tokens."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_middle(tokenizer: Tokenizer, text: str, max_tokens: int) -> str:
    """Keep the first and last ``max_tokens // 2`` tokens of ``text`` (LongBench-style middle truncation).

    Text that already fits is returned unchanged.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    if max_tokens <= 0:
        return ""
    head = max_tokens // 2
    tail = max_tokens - head
    decode: Callable[[list[int]], str] = lambda part: tokenizer.decode(part, skip_special_tokens=True)
    return decode(ids[:head]) + decode(ids[len(ids) - tail :])


def truncate_to_fit(tokenizer: Tokenizer, text: str, rest: str, max_tokens: int) -> str:
    """Middle-truncate ``text`` so that it plus ``rest`` (the untouched prompt parts) fit ``max_tokens``."""
    return truncate_middle(tokenizer, text, max_tokens - count_tokens(tokenizer, rest))


def fit_to_tokens(build: PromptBuilder, tokenizer: Tokenizer, target_tokens: int) -> tuple[str, str]:
    """Return ``build(n)`` for the largest filler size ``n`` whose prompt (context + question) fits ``target_tokens``.

    ``build(n)`` returns ``(context, question)`` and must grow (roughly monotonically) with ``n``. The search
    estimates ``n`` from the tokens per filler unit, brackets it, then bisects, so a prompt is tokenized only
    a handful of times. Raises ValueError when even ``n = 0`` does not fit.
    """

    def size(n: int) -> int:
        return count_tokens(tokenizer, "".join(build(n)))

    base = size(0)
    if base > target_tokens:
        raise ValueError(f"target_tokens={target_tokens} is smaller than the {base} tokens needed with no filler")
    probe = 16
    per_unit = max((size(probe) - base) / probe, 1e-3)
    guess = max(int((target_tokens - base) / per_unit), 0)
    lo, hi = 0, None  # invariant: size(lo) <= target; size(hi) > target when hi is set
    step = max(guess // 50, 1)
    if size(guess) <= target_tokens:
        lo = guess
        while hi is None:
            if size(lo + step) <= target_tokens:
                lo, step = lo + step, step * 2
            else:
                hi = lo + step
    else:
        hi = guess
        while hi - step > 0 and size(hi - step) > target_tokens:
            hi, step = hi - step, step * 2
        lo = max(hi - step, 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(mid) <= target_tokens:
            lo = mid
        else:
            hi = mid
    return build(lo)
