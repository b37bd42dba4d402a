"""Write the "dev" and "heldout" retrieval suites (RULER-style, jsonl for ``task=jsonl``).

Each suite has 5 task families of 8 samples, scored with ``string_match_all``:

- ``passkey``: one number in filler ("The pass key is 12345.");
- ``multikey``: four keyed 7-digit numbers, one asked (niah_multikey style); 4 contexts x 2 questions, so
  pairs of samples share a context (and a ``context_id`` in query-agnostic mode);
- ``person``: a fact about a person among three distractor people ("Alice's favourite city is Lima."); 4
  contexts x 2 questions as well;
- ``word``: a keyed made-up word among three distractor words;
- ``two_needles``: one key with two values, both asked (niah_multivalue style).

The two suites share the families but not the wording: "heldout" has its own needle sentences, filler (prose
instead of RULER's "The grass is green." noise), intro, question wording, name/city pools and seeds. Tune on
"dev" only; "heldout" is for checking that a choice transfers.

Both haystacks cycle a fixed list of sentences (5 for dev, 12 for heldout), as RULER's noise haystack does. A
third suite, "varied", is heldout with a haystack in which no sentence repeats: the same needles, questions,
answers and depths (heldout's seeds), in village prose drawn from templates and word lists by a fixed seed
(:func:`varied_filler`). Pairing its samples with heldout's by family and index isolates what a repeating
haystack does to a policy. (Running text such as RULER's essays is not available offline; CPython's reference
manual, tried first, made SmolLM2 answer the door-code question with Python code even with the full cache.)
A fourth, "devprose", is dev in a cycled prose haystack of its own (a survey ship's log, :func:`devprose_filler`):
dev's needles, questions and depths (dev's seeds). It was made to tune on at ~4k tokens, where SmolLM2 finds few
of dev's needles in RULER's noise (dev-4k's full cache scores 20); in prose its full cache scores 25, so what
fails at 4k is dev's question wording, not its haystack (docs/RESULTS.md, "A dev suite in prose").

"tune" is the tuning suite for ~4k tokens: its own wording throughout (a ship's log: radio messages, crates,
crew, call signs, sampling stations; questions ending in "Answer:"), names, cities and seeds, in devprose's
haystack, none of it heldout's. SmolLM2's full cache answers about as much of tune-4k as of heldout-4k, so a 4k
choice is made on tune-4k and checked on heldout-4k, as dev-1k and heldout-1k are used at 1k.

"heldout2" is a second draw of heldout: its wording, haystack and name/city pools, with seeds of its own (new
passkeys, keys, values, people and needle orders; the same depth sweep). Nothing is tuned on it, and nothing was
looked at on it before the presets were fixed: it tells whether what the presets keep of heldout-4k is that
draw's luck or the setting's. "heldout3" is a third draw, made to test a change chosen after heldout2 had been
looked at (the query-agnostic preset's summary slot up to 4x, docs/RESULTS.md). "heldout4" is a fourth, made on
2026-12-06 after heldout3 had been read in both modes, to check whatever is chosen next at 4k. "heldout5" is a
fifth, made on 2026-12-06 after the query-aware preset took its floor from 16x, to check the presets as they
stand on a draw nothing was chosen on or read from. "heldout6" is a sixth, made on 2026-12-06 before anything ran on
it, to check a change chosen on the earlier draws' lost answers (a summary slot in the first layers, query-aware).
"heldout7" is a seventh, made on 2026-12-06 before anything ran on it: the presets over more draws, and a check of
whatever is chosen next on the earlier draws' lost query-agnostic answers. "heldout8" is an eighth, made on
2026-12-07 before anything ran on it: the presets as they stand on one more draw, where the query-aware 8x target is
met by less than an answer and the query-agnostic 4x one missed by a point over seven. "heldout9" is a ninth, made on
2026-12-07 before anything ran on it, after the rank-8 key sketch (``budget.summary_sketch``) had been read on
heldout5, heldout6 and heldout8: a draw the sketch was neither screened nor read on.

Prompts are sized in tokens of the SmolLM2 tokenizer (``context + question``, no chat template, as
``kvcompress.tasks.synthetic.SyntheticTask`` does) and are deterministic per suite, token target and seed::

    python scripts/make_suites.py                       # docs/results/suites/{dev,heldout}-1k.jsonl
    python scripts/make_suites.py --tokens 4000         # {dev,heldout}-4k.jsonl
    python scripts/make_suites.py --out /tmp/s --tokens 2000 --seed 3
    python scripts/make_suites.py --tokens 4000 --suites varied   # varied-4k.jsonl
    python scripts/make_suites.py --tokens 4000 --suites devprose # devprose-4k.jsonl
    python scripts/make_suites.py --tokens 4000 --suites tune     # tune-4k.jsonl
    python scripts/make_suites.py --tokens 4000 --suites heldout2 # heldout2-4k.jsonl
    python scripts/make_suites.py --tokens 4000 --suites heldout3 # heldout3-4k.jsonl
    python scripts/make_suites.py --tokens 4000 --suites heldout4 # heldout4-4k.jsonl
    python scripts/make_suites.py --tokens 4000 --suites heldout5 # heldout5-4k.jsonl
    python scripts/make_suites.py --tokens 4000 --suites heldout6 # heldout6-4k.jsonl
    python scripts/make_suites.py --tokens 4000 --suites heldout7 # heldout7-4k.jsonl
    python scripts/make_suites.py --tokens 4000 --suites heldout8 # heldout8-4k.jsonl
    python scripts/make_suites.py --tokens 4000 --suites heldout9 # heldout9-4k.jsonl

    python experiments/run.py task=jsonl task.path=docs/results/suites/dev-1k.jsonl policy=tova budget.ratio=4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvcompress.tasks.synthetic import insert_at_depths, noise, pseudo_word, random_keys, random_numbers, sweep_depth
from kvcompress.tasks.tokens import Tokenizer, fit_to_tokens

FAMILIES = ("passkey", "multikey", "person", "word", "two_needles")
PER_FAMILY = 8
QUESTIONS_PER_CONTEXT = {"multikey": 2, "person": 2}  # the others: one question per context
MAX_NEW_TOKENS = {"passkey": 16, "multikey": 24, "person": 16, "word": 16, "two_needles": 40}
# added to --seed (a suite in NEEDLES_OF takes its source's)
SUITE_SEEDS = {
    "dev": 0,
    "heldout": 1000,
    "tune": 2000,
    "heldout2": 3000,
    "heldout3": 4000,
    "heldout4": 5000,
    "heldout5": 6000,
    "heldout6": 7000,
    "heldout7": 8000,
    "heldout8": 9000,
    "heldout9": 10000,
}

_HELDOUT_FILLER = (
    "The morning train left the station a few minutes late, as it usually did on market days.",
    "Along the river, the old mill had been turned into a small museum about local weaving.",
    "Most visitors stopped at the bakery on the corner before walking up the hill to the church.",
    "In the afternoon the wind picked up, and the fishing boats stayed close to the harbour wall.",
    "A committee of volunteers met every Thursday to plan the summer festival and its parade.",
    "The library kept its records in tall wooden cabinets that smelled faintly of cedar.",
    "Children from the village school planted a row of apple trees behind the football pitch.",
    "During the winter months the road over the pass was often closed for several days.",
    "The town council argued for years about where to build the new footbridge.",
    "Every spring the meadows turned yellow with buttercups and the bees came back to the hives.",
    "The post office also sold stamps, newspapers, fishing licences and postcards of the lake.",
    "Nobody remembered exactly when the clock on the square had stopped at a quarter past four.",
)


def cycled(sentences: Sequence[str], n: int) -> list[str]:
    """``n`` sentences cycling through ``sentences`` with a stride of 5 (each comes once per cycle when their number
    is coprime with 5, as both lists' 12 are)."""
    return [sentences[(i * 5) % len(sentences)] for i in range(n)]


def heldout_filler(n: int) -> list[str]:
    """``n`` sentences of village prose (the heldout haystack), cycling through a fixed list."""
    return cycled(_HELDOUT_FILLER, n)


_DEVPROSE_FILLER = (
    "The research vessel spent most of the week mapping the shallow banks north of the island.",
    "Every evening the crew logged the water temperature at three depths and sent the figures ashore.",
    "A broken winch delayed the second survey until a spare part arrived by helicopter.",
    "The chief scientist preferred paper charts and kept them rolled in a rack beside the bridge.",
    "Samples of sediment were sealed in glass jars and labelled with the time and the position.",
    "On calm nights the students on board counted the lights of the fishing fleet on the horizon.",
    "The galley served soup at noon, and the cook baked bread twice a week in a small oven.",
    "Heavy swell from the west forced the captain to shelter behind the headland for a day.",
    "The echo sounder traced the edge of the underwater canyon more clearly than anyone expected.",
    "Two engineers spent the morning replacing a cracked seal in the cooling pump.",
    "Seabirds followed the ship for hours, waiting for scraps thrown from the stern.",
    "At the end of each leg the data were copied onto two disks and stored in separate cabins.",
)


def devprose_filler(n: int) -> list[str]:
    """``n`` sentences of a survey ship's log (the devprose haystack): prose cycled like heldout's, in another
    setting and with no sentence of heldout's."""
    return cycled(_DEVPROSE_FILLER, n)


_VARIED_TEMPLATES = (
    "{When} the {group} of {town} {met} at the {place} to talk about the {thing}.",
    "{Person} walked past the {place} {when} and noticed that the {thing} had been {changed}.",
    "Near the {place} in {town}, the {thing} was {changed} {when}.",
    "{When} {person} and the {group} {met} by the {place}, where the {thing} still stood.",
    "The {thing} beside the {place} had been {changed} long before {person} moved to {town}.",
    "In {town} people still argue about whether the {thing} should be {changed}.",
    "{Person} kept a small notebook about the {thing} and the {place} of {town}.",
)
_VARIED_WORDS = {
    "when": (
        "on market days",
        "in the early morning",
        "after the harvest",
        "during the long winter",
        "every other spring",
        "late in the evening",
        "before the festival",
        "on rainy afternoons",
    ),
    "group": ("council", "choir", "fishermen", "teachers", "volunteers", "bakers", "weavers", "shepherds"),
    "town": (
        "Alderby",
        "Brockmoor",
        "Calderwick",
        "Dunhollow",
        "Elmstead",
        "Farrowdale",
        "Greywater",
        "Hollinsford",
        "Ivybridge",
        "Kestrel Bay",
    ),
    "met": ("met", "gathered", "came together", "sat down", "assembled"),
    "place": (
        "old mill",
        "harbour wall",
        "church steps",
        "village green",
        "railway bridge",
        "post office",
        "market hall",
        "school gate",
        "river ford",
        "library door",
    ),
    "thing": (
        "clock tower",
        "stone fountain",
        "wooden footbridge",
        "apple orchard",
        "weather vane",
        "town archive",
        "bell rope",
        "copper roof",
        "garden wall",
        "ferry timetable",
    ),
    "changed": ("repainted", "moved", "repaired", "rebuilt", "replaced", "measured", "photographed", "cleaned"),
    "person": (
        "the miller",
        "the schoolteacher",
        "an old sailor",
        "the baker's son",
        "the postmistress",
        "a travelling painter",
        "the night watchman",
        "the doctor's daughter",
    ),
}


def varied_filler(n: int) -> list[str]:
    """``n`` distinct sentences of village prose drawn from :data:`_VARIED_TEMPLATES` by a fixed seed (the varied
    haystack; every ``n`` gets a prefix of the same sequence): heldout's register, but no sentence occurs twice
    (its phrases do, as in running text)."""
    rng, out = random.Random("varied-filler"), dict[str, None]()  # insertion-ordered set
    for _ in range(100 * n):
        if len(out) == n:
            break
        words = {k: rng.choice(v) for k, v in _VARIED_WORDS.items()}
        words |= {k.capitalize(): v[0].upper() + v[1:] for k, v in words.items()}
        out.setdefault(rng.choice(_VARIED_TEMPLATES).format(**words))
    if len(out) < n:
        raise ValueError(f"the varied haystack has no {n} distinct sentences: use fewer --tokens")
    return list(out)


@dataclass(frozen=True)
class Style:
    """The wording of one suite: filler, intro and, per family, needle and question templates."""

    filler: Callable[[int], list[str]]
    intro: str
    passkey_needle: str  # {key}
    passkey_question: str
    multikey_needle: str  # {key} {value}
    multikey_question: str  # {key}
    person_needle: str  # {key} {value}
    person_question: str  # {key}
    word_needle: str  # {key} {value}
    word_question: str  # {key}
    two_needle: str  # {key} {value}
    two_question: str  # {key}
    names: tuple[str, ...]
    cities: tuple[str, ...]


DEV = Style(
    filler=noise,
    intro=(
        "Some special information is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about it afterwards.\n\n"
    ),
    passkey_needle="The pass key is {key}. Remember it. {key} is the pass key.",
    passkey_question="What is the pass key? The pass key is",
    multikey_needle="One of the special magic numbers for {key} is: {value}.",
    multikey_question=(
        "What is the special magic number for {key} mentioned in the provided text? "
        "The special magic number for {key} mentioned in the provided text is"
    ),
    person_needle="{key}'s favourite city is {value}.",
    person_question="What is {key}'s favourite city? {key}'s favourite city is",
    word_needle="The special magic word for {key} is: {value}.",
    word_question=(
        "What is the special magic word for {key} mentioned in the provided text? "
        "The special magic word for {key} mentioned in the provided text is"
    ),
    two_needle="One of the special magic numbers for {key} is: {value}.",
    two_question=(
        "What are all the special magic numbers for {key} mentioned in the provided text? "
        "The special magic numbers for {key} mentioned in the provided text are"
    ),
    names=("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "James", "Laura", "Oscar"),
    cities=("Lima", "Oslo", "Cairo", "Dublin", "Nairobi", "Kyoto", "Lisbon", "Denver", "Hanoi", "Zurich", "Perth"),
)

HELDOUT = Style(
    filler=heldout_filler,
    intro="Read the notes below carefully; a few details in them will be asked about later.\n\n",
    passkey_needle="Note for the night guard: the door code is {key}, and {key} opens the side door too.",
    passkey_question="Which door code did the note for the night guard give? Answer:",
    multikey_needle="The archive registered item {key} under the reference {value}.",
    multikey_question="Under which reference did the archive register item {key}? Answer:",
    person_needle="Everyone in the village knew that {key} had been born in {value}.",
    person_question="In which city was {key} born? Answer:",
    word_needle="The password chosen for the {key} account was the word {value}.",
    word_question="Which word was chosen as the password for the {key} account? Answer:",
    two_needle="A ticket for the {key} lottery was drawn with the number {value}.",
    two_question="Which two numbers were drawn for the {key} lottery? Answer:",
    names=("Marta", "Tomas", "Ingrid", "Pavel", "Yusuf", "Keiko", "Rafael", "Sofia", "Anders", "Nadia", "Luca"),
    cities=("Porto", "Krakow", "Quito", "Tbilisi", "Bergen", "Mombasa", "Seville", "Tallinn", "Osaka", "Accra"),
)

VARIED = dataclasses.replace(HELDOUT, filler=varied_filler)
DEVPROSE = dataclasses.replace(DEV, filler=devprose_filler)

TUNE = Style(
    filler=devprose_filler,
    intro="Below is a long ship's log. A few of its entries hold details you will need later.\n\n",
    passkey_needle="Radio message for the lab: the safe combination is {key}; once more, the combination is {key}.",
    passkey_question="Which safe combination did the radio message give? Answer:",
    multikey_needle="Crate {key} was stowed in the hold with the seal number {value}.",
    multikey_question="Which seal number was crate {key} stowed with? Answer:",
    person_needle="Over dinner the crew learned that {key} had grown up in {value}.",
    person_question="Where did {key} grow up? Answer:",
    word_needle="The call sign given to the {key} team was {value}.",
    word_question="Which call sign was given to the {key} team? Answer:",
    two_needle="A sample from the {key} station was logged under the number {value}.",
    two_question="Under which two numbers were samples from the {key} station logged? Answer:",
    names=("Hugo", "Mira", "Olaf", "Priya", "Quentin", "Rosa", "Stefan", "Tara", "Umar", "Vera", "Wen"),
    cities=("Valparaiso", "Dakar", "Gdansk", "Halifax", "Reykjavik", "Manila", "Durban", "Hobart", "Montevideo"),
)

STYLES = {
    "dev": DEV,
    "heldout": HELDOUT,
    "varied": VARIED,
    "devprose": DEVPROSE,
    "tune": TUNE,
    "heldout2": HELDOUT,
    "heldout3": HELDOUT,
    "heldout4": HELDOUT,
    "heldout5": HELDOUT,
    "heldout6": HELDOUT,
    "heldout7": HELDOUT,
    "heldout8": HELDOUT,
    "heldout9": HELDOUT,
}
NEEDLES_OF = {"varied": "heldout", "devprose": "dev"}  # a suite drawing another's needles, questions and depths


@dataclass
class Context:
    """One generated haystack: its needles (``(depth, sentence)``) and the questions asked about it."""

    needles: list[tuple[float, str]]
    questions: list[tuple[str, list[str]]]  # (question, answers)


def draft(style: Style, family: str, rng: random.Random, depth: float) -> Context:
    """Needles and questions of one context of ``family``; the first asked needle sits at ``depth``."""
    if family == "passkey":
        key = random_numbers(rng, 1, 5)[0]
        return Context([(depth, style.passkey_needle.format(key=key))], [(style.passkey_question, [key])])
    if family == "two_needles":
        key = random_keys(rng, 1)[0]
        values = random_numbers(rng, 2, 7)
        depths = sorted([depth, rng.random()])
        needles = [(d, style.two_needle.format(key=key, value=v)) for d, v in zip(depths, values, strict=True)]
        return Context(needles, [(style.two_question.format(key=key), values)])
    if family == "person":
        keys, values = rng.sample(style.names, 4), rng.sample(style.cities, 4)
        needle, question = style.person_needle, style.person_question
    elif family == "multikey":
        keys, values = random_keys(rng, 4), random_numbers(rng, 4, 7)
        needle, question = style.multikey_needle, style.multikey_question
    elif family == "word":
        keys, values = random_keys(rng, 4), []
        while len(values) < 4:
            word = pseudo_word(rng)
            if word not in values:
                values.append(word)
        needle, question = style.word_needle, style.word_question
    else:
        raise ValueError(f"unknown family {family!r}; accepted: {', '.join(FAMILIES)}")
    pairs = enumerate(zip(keys, values, strict=True))
    needles = [(depth if i == 0 else rng.random(), needle.format(key=k, value=v)) for i, (k, v) in pairs]
    asked = range(QUESTIONS_PER_CONTEXT.get(family, 1))
    return Context(needles, [(question.format(key=keys[i]), [values[i]]) for i in asked])


# The blank line between context and question is split "\n" | "\nQuestion": tokenized apart (as kvcompress's prompts
# and kvpress's query-agnostic mode do) or whole (kvpress's query-aware mode: context + question), the tokens are the
# same. A context ending in "\n\n" would not be: "\n\n" alone is one token, "\n\nWhat" is "\n", "\n", "What".
BOUNDARY = "\n"


def check_boundary(tokenizer: Tokenizer, context: str, question: str) -> None:
    """Raise ValueError unless ``context + question`` tokenizes as ``context`` then ``question``."""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    if ids(context + question) != ids(context) + ids(question):
        raise ValueError(f"context/question boundary is not token-stable: {context[-20:]!r} | {question[:20]!r}")


def family_records(
    style: Style, suite: str, family: str, tokenizer: Tokenizer, tokens: int, seed: int
) -> list[dict[str, object]]:
    """The jsonl records of one family: ``PER_FAMILY`` samples, needle depth sweeping 0 to 1 over contexts."""
    per_context = QUESTIONS_PER_CONTEXT.get(family, 1)
    n_contexts = PER_FAMILY // per_context
    out: list[dict[str, object]] = []
    for c in range(n_contexts):
        rng = random.Random(f"{NEEDLES_OF.get(suite, suite)}:{family}:{seed}:{c}")
        ctx = draft(style, family, rng, sweep_depth(c, n_contexts))
        longest = max((q for q, _ in ctx.questions), key=len)

        def build(n: int, ctx: Context = ctx, longest: str = longest) -> tuple[str, str]:
            return style.intro + insert_at_depths(style.filler(n), ctx.needles) + "\n", BOUNDARY + longest

        context, _ = fit_to_tokens(build, tokenizer, tokens)  # sized with the longest question: one shared context
        for q, (question, answers) in enumerate(ctx.questions):
            question = BOUNDARY + question
            check_boundary(tokenizer, context, question)
            out.append(
                {
                    "id": f"{suite}-{tokens}-{family}-{c * per_context + q:02d}",
                    "task": family,
                    "context": context,
                    "question": question,
                    "answers": answers,
                    "metric": "string_match_all",
                    "max_new_tokens": MAX_NEW_TOKENS[family],
                }
            )
    return out


def check_suite(suite: str) -> None:
    """Raises ``ValueError`` naming the accepted suites unless ``suite`` is a key of :data:`STYLES`."""
    if suite not in STYLES:
        raise ValueError(f"unknown suite {suite!r}; accepted: {', '.join(STYLES)}")


def suite_records(suite: str, tokenizer: Tokenizer, tokens: int, seed: int = 0) -> list[dict[str, object]]:
    """Every record of ``suite`` (a key of :data:`STYLES`), family by family."""
    check_suite(suite)
    style, seed = STYLES[suite], seed + SUITE_SEEDS[NEEDLES_OF.get(suite, suite)]
    return [r for f in FAMILIES for r in family_records(style, suite, f, tokenizer, tokens, seed)]


def suffix(tokens: int) -> str:
    """File-name size tag: ``1k`` for 1000, ``4k`` for 4000, else the number."""
    return f"{tokens // 1000}k" if tokens % 1000 == 0 else str(tokens)


def write_jsonl(path: Path, records: Sequence[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for r in records:
            handle.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1000, help="target tokens of context + question (1000)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/suites"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="base seed (suites add SUITE_SEEDS: heldout 1000, ...)")
    parser.add_argument("--suites", default="dev,heldout", help=f"comma-separated, of: {','.join(STYLES)}")
    parser.add_argument("--model", default="smollm2", help="tokenizer: 'smollm2' or a local HF directory")
    args = parser.parse_args(argv)
    try:  # before the tokenizer loads
        for suite in args.suites.split(","):
            check_suite(suite)
    except ValueError as err:
        parser.error(f"--suites: {err}")

    from transformers import AutoTokenizer

    from kvcompress.model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model)[0])
    for suite in args.suites.split(","):
        records = suite_records(suite, tokenizer, args.tokens, args.seed)
        path = args.out / f"{suite}-{suffix(args.tokens)}.jsonl"
        write_jsonl(path, records)
        print(f"{path}: {len(records)} samples, {len({r['context'] for r in records})} contexts")


if __name__ == "__main__":
    main()
