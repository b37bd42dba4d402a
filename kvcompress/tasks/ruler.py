"""RULER-style synthetic tasks (Hsieh et al., 2024): needle-in-a-haystack variants, variable tracking and
frequent-words extraction, sized in tokens of a given tokenizer and deterministic per seed."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from kvcompress.tasks.base import Sample
from kvcompress.tasks.synthetic import (
    Draft,
    SyntheticTask,
    insert_at_depths,
    noise,
    pseudo_word,
    random_keys,
    random_numbers,
)
from kvcompress.tasks.tokens import Tokenizer

_NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n\n"
)


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


@dataclass
class _Niah(SyntheticTask):
    """Needle in a noise haystack: ``num_keys`` keys with ``num_values`` values each; ``num_queries`` asked.

    Needles read "One of the special magic numbers for {key} is: {7-digit number}." The first queried needle
    sits at the sample's sweep depth, the others at random depths.
    """

    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    max_new_tokens: int = 32

    def draft(self, rng: random.Random, depth: float) -> Draft:
        keys = random_keys(rng, self.num_keys)
        values = random_numbers(rng, self.num_keys * self.num_values, 7)
        needles = [
            (keys[k], values[k * self.num_values + v]) for k in range(self.num_keys) for v in range(self.num_values)
        ]
        queried = keys[: self.num_queries]
        placed = [
            (depth if i == 0 else rng.random(), f"One of the special magic numbers for {key} is: {value}.")
            for i, (key, value) in enumerate(needles)
        ]
        rng.shuffle(placed)  # queried needles are not always listed first at equal depths
        plural = self.num_values * self.num_queries > 1
        what, numbers, verb = ("What are all", "numbers", "are") if plural else ("What is", "number", "is")
        asked = _join_keys(queried)
        question = (
            f"{what} the special magic {numbers} for {asked} mentioned in the provided text? "
            f"The special magic {numbers} for {asked} mentioned in the provided text {verb}"
        )

        def build(n: int) -> tuple[str, str]:
            return _NIAH_INTRO + insert_at_depths(noise(n), placed) + "\n\n", question

        return Draft(build, [value for key, value in needles if key in queried])


@dataclass
class NiahSingle(_Niah):
    """One needle, one question (RULER niah_single with a noise haystack)."""

    name: str = "niah_single"


@dataclass
class NiahMultiKey(_Niah):
    """Four needles with different keys; one is asked (the rest are distractors)."""

    name: str = "niah_multikey"
    num_keys: int = 4


@dataclass
class NiahMultiValue(_Niah):
    """One key with four values; all four must be recalled."""

    name: str = "niah_multivalue"
    num_values: int = 4
    max_new_tokens: int = 48


@dataclass
class NiahMultiQuery(_Niah):
    """Four keys, all four asked at once; every value must be recalled."""

    name: str = "niah_multiquery"
    num_keys: int = 4
    num_queries: int = 4
    max_new_tokens: int = 48


@dataclass
class VariableTracking(SyntheticTask):
    """Chains of assignments ("VAR ABCDE = 12345.", "VAR FGHIJ = VAR ABCDE.", ...) hidden in noise.

    The first chain is asked: which variables end up holding its value. Statements of each chain appear in
    order at increasing random depths; extra chains (``num_chains > 1``) are distractors with other values.
    """

    name: str = "variable_tracking"
    num_chains: int = 1
    num_hops: int = 4
    max_new_tokens: int = 48

    def draft(self, rng: random.Random, depth: float) -> Draft:
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        names: list[str] = []
        while len(names) < self.num_chains * (self.num_hops + 1):
            name = "".join(rng.choice(letters) for _ in range(5))
            if name not in names:
                names.append(name)
        values = random_numbers(rng, self.num_chains, 5)
        placed = []
        for c in range(self.num_chains):
            chain = names[c * (self.num_hops + 1) : (c + 1) * (self.num_hops + 1)]
            lines = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(chain)]
            placed += zip(sorted(rng.random() for _ in lines), lines, strict=True)
        asked = names[: self.num_hops + 1]
        question = (
            f"Question: Find all variables that are assigned the value {values[0]} in the text above. "
            f"Answer: According to the chain(s) of variable assignment in the text above, {len(asked)} variables "
            f"are assigned the value {values[0]}, they are:"
        )

        def build(n: int) -> tuple[str, str]:
            intro = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            return intro + insert_at_depths(noise(n), placed) + "\n\n", question

        return Draft(build, asked)


@dataclass
class FrequentWords(SyntheticTask):
    """Common-words extraction: a numbered list where ``num_common`` words appear ``common_freq`` times each
    and ever more rare words ``rare_freq`` times each (the filler); name the ``num_common`` most frequent.

    As in RULER, frequencies left as None are 30/3 from 4096 target tokens up and 2/1 below it.
    """

    name: str = "frequent_words"
    num_common: int = 10
    common_freq: int | None = None
    rare_freq: int | None = None
    max_new_tokens: int = 64

    def frequencies(self) -> tuple[int, int]:
        """(common, rare) repetitions per word, resolving the RULER defaults."""
        short = self.target_tokens < 4096
        common = self.common_freq if self.common_freq is not None else (2 if short else 30)
        rare = self.rare_freq if self.rare_freq is not None else (1 if short else 3)
        if rare >= common:
            raise ValueError(f"rare_freq={rare} must be below common_freq={common}")
        return common, rare

    def draft(self, rng: random.Random, depth: float) -> Draft:
        common_freq, rare_freq = self.frequencies()
        pool: dict[str, None] = {}  # insertion-ordered set of distinct words
        pool_rng = random.Random(rng.random())
        shuffle_seed = rng.random()

        def words(k: int) -> list[str]:
            while len(pool) < k:
                pool[pseudo_word(pool_rng)] = None
            return list(pool)[:k]

        common = words(self.num_common)
        question = (
            f"Question: What are the {self.num_common} most common words in the above list? "
            f"Answer: The top {self.num_common} words that appear most often in the list are:"
        )

        def build(n: int) -> tuple[str, str]:
            rare = words(self.num_common + n)[self.num_common :]
            items = common * common_freq + rare * rare_freq
            random.Random(f"{shuffle_seed}:{n}").shuffle(items)
            listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
            intro = (
                "Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n\n"
            )
            return intro + listing + "\n\n", question

        return Draft(build, common)


RULER_TASKS: dict[str, type[SyntheticTask]] = {
    cls.name: cls  # a dataclass field default is also a class attribute
    for cls in (NiahSingle, NiahMultiKey, NiahMultiValue, NiahMultiQuery, VariableTracking, FrequentWords)
}


@dataclass
class RulerMix:
    """All (or the chosen) RULER sub-tasks together, ``n_samples`` each, with one token target and seed."""

    tokenizer: Tokenizer
    n_samples: int = 20
    target_tokens: int = 4096
    seed: int = 0
    tasks: Sequence[str] = field(default_factory=lambda: tuple(RULER_TASKS))
    name: str = "ruler"

    def samples(self) -> list[Sample]:
        """Concatenated samples of each sub-task (``sample.task`` names the sub-task)."""
        unknown = [t for t in self.tasks if t not in RULER_TASKS]
        if unknown:
            raise ValueError(f"unknown RULER sub-task(s) {unknown}; accepted: {', '.join(RULER_TASKS)}")
        return [
            s
            for t in self.tasks
            for s in RULER_TASKS[t](self.tokenizer, self.n_samples, self.target_tokens, self.seed).samples()
        ]
