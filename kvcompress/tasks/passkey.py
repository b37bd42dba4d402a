"""Classic passkey retrieval (Mohtashami & Jaggi, 2023): a 5-digit pass key hidden in repetitive filler."""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvcompress.tasks.synthetic import Draft, SyntheticTask, insert_at_depths, noise, random_numbers

_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
_QUESTION = "What is the pass key?"


@dataclass
class Passkey(SyntheticTask):
    """Find "The pass key is NNNNN. Remember it." in the grass/sky/sun filler; depth sweeps 0 to 1."""

    name: str = "passkey"
    max_new_tokens: int = 16

    def draft(self, rng: random.Random, depth: float) -> Draft:
        key = random_numbers(rng, 1, 5)[0]
        needle = [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")]

        def build(n: int) -> tuple[str, str]:
            return _INTRO + insert_at_depths(noise(n), needle) + "\n\n", _QUESTION

        return Draft(build, [key])
