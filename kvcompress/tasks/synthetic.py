"""Shared machinery for generated tasks (RULER-style and passkey): noise haystack, needle placement, random
keys/values, and the :class:`SyntheticTask` base that sizes each prompt to ``target_tokens``."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from kvcompress.tasks.base import Sample, context_id_for
from kvcompress.tasks.tokens import PromptBuilder, Tokenizer, fit_to_tokens

NOISE_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

_ADJECTIVES = (
    "amber brave calm curious dusty eager fancy gentle glossy hollow humble icy jolly lively lucky mellow misty "
    "narrow noble odd pale quiet rapid rusty salty shy silent sleepy smooth solid sour spicy steady sunny tidy "
    "vivid wary windy witty young zealous"
).split()
_NOUNS = (
    "anchor badger basket beacon bridge candle canyon castle cactus comet cookie crystal dolphin engine falcon "
    "feather garden glacier harbor helmet island jacket kettle ladder lantern meadow mirror needle orchard "
    "pebble pepper piano pillow planet rabbit ribbon river saddle tunnel violin walnut window"
).split()
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def noise(n: int) -> list[str]:
    """``n`` sentences of the RULER/passkey noise haystack, cycling through :data:`NOISE_SENTENCES`."""
    return [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n)]


def insert_at_depths(units: Sequence[str], needles: Sequence[tuple[float, str]]) -> str:
    """Join ``units`` with spaces after inserting each ``(depth, text)`` needle at fraction ``depth`` of them.

    Needles at the same position keep their given order, so sorted depths preserve a chain's order.
    """
    out = list(units)
    placed = sorted(enumerate(needles), key=lambda item: (item[1][0], item[0]))
    for offset, (_, (depth, text)) in enumerate(placed):
        out.insert(round(min(max(depth, 0.0), 1.0) * len(units)) + offset, text)
    return " ".join(out)


def sweep_depth(index: int, count: int) -> float:
    """Depth of sample ``index`` of ``count``: evenly spread over [0, 1] (0.5 for a single sample)."""
    return index / (count - 1) if count > 1 else 0.5


def random_keys(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct ``adjective-noun`` keys (as RULER's word keys)."""
    return [f"{a}-{n}" for a, n in rng.sample([(a, n) for a in _ADJECTIVES for n in _NOUNS], k)]


def random_numbers(rng: random.Random, k: int, digits: int) -> list[str]:
    """``k`` distinct random numbers with exactly ``digits`` digits, as strings."""
    return [str(x) for x in rng.sample(range(10 ** (digits - 1), 10**digits), k)]


def pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    """A pronounceable made-up lower-case word of consonant-vowel syllables (e.g. ``"tabemo"``)."""
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


@dataclass
class Draft:
    """One generated sample before sizing: ``build(n)`` gives (context, question) with filler size ``n``."""

    build: PromptBuilder
    answers: list[str]


@dataclass
class SyntheticTask:
    """Base for generated tasks: deterministic per ``seed``, each prompt sized to ``target_tokens``.

    ``target_tokens`` counts the tokens of ``context + question`` (no chat template, no special tokens);
    generated prompts land just under it. Subclasses implement :meth:`draft` and set ``name``/``max_new_tokens``.
    """

    tokenizer: Tokenizer
    n_samples: int = 20
    target_tokens: int = 4096
    seed: int = 0
    name: str = "synthetic"
    max_new_tokens: int = 32
    metric: str = "string_match_all"

    def draft(self, rng: random.Random, depth: float) -> Draft:
        """Generate one sample's content; ``depth`` in [0, 1] is where its main needle goes."""
        raise NotImplementedError

    def samples(self) -> list[Sample]:
        """Generate ``n_samples`` samples, needle depth sweeping from 0 to 1."""
        out = []
        for i in range(self.n_samples):
            rng = random.Random(f"{self.name}:{self.seed}:{i}")
            draft = self.draft(rng, sweep_depth(i, self.n_samples))
            context, question = fit_to_tokens(draft.build, self.tokenizer, self.target_tokens)
            out.append(
                Sample(
                    sample_id=f"{self.name}-{self.target_tokens}-s{self.seed}-{i:04d}",
                    context_id=context_id_for(context, self.name),
                    context=context,
                    question=question,
                    answers=draft.answers,
                    task=self.name,
                    metric=self.metric,
                    max_new_tokens=self.max_new_tokens,
                )
            )
        return out
