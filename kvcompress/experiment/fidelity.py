"""Answer fidelity: how much of the full cache's own answer a compressed cache keeps, token by token.

A task score is one bit per sample (the answer matched or not), so at n = 40 two setups a sample or two apart
cannot be told apart. Fidelity teacher-forces the full cache's greedy answer through the compressed cache
(:attr:`kvcompress.sequence.Request.forced_ids`, everything else as in generation) and records, per sample:

* ``nll``: the answer's mean negative log-likelihood per token (nats). The full cache's own value is its floor;
  what compression adds above it is what it lost of that answer, also where the answer survives greedy decoding;
* ``match``: the fraction of the answer's tokens that greedy decoding, given the answer so far, would emit too
  (1 under the full cache, up to re-tokenising its decoded text);
* ``first_miss``: the first token where they differ (``tokens`` when none does): where a greedy answer would
  have left the full cache's;
* ``worst``: the largest NLL of any one of its tokens. A retrieval answer turns on a few tokens (a passkey's
  digits): a compression can make the answer's wording likelier, lowering ``nll``, and still flip one digit,
  which ``worst`` and ``match`` see;
* ``logprobs``: every token's log-probability (4 decimals), from which any other measure can be derived later.

These are paired, continuous per-sample measures: :mod:`kvcompress.experiment.paired` compares two setups on them
(``scripts/paired_scores.py --metric nll``) as it does on scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from kvcompress.sequence import RequestOutput

FIDELITY_FILE = "fidelity.jsonl"
METRICS = ("nll", "match", "worst")


def answer_ids(record: Mapping[str, Any], tokenizer: Any) -> list[int]:
    """The answer tokens forced for one full-cache prediction record (a ``predictions.jsonl`` record or a
    quality_table row): its ``output_ids``, or its ``prediction`` text re-tokenised without special tokens for
    records that hold no ids. One rule for every caller, so that what our setups and kvpress's presses are forced
    is the same token ids."""
    ids = record.get("output_ids")
    return list(ids) if ids is not None else tokenizer.encode(record["prediction"], add_special_tokens=False)


def answers_by_sample(records: Iterable[Mapping[str, Any]], tokenizer: Any) -> dict[str, list[int]]:
    """Sample id -> :func:`answer_ids` of each full-cache record (records of one mode, keyed by ``sample_id``)."""
    return {r["sample_id"]: answer_ids(r, tokenizer) for r in records}


def fidelity_row(out: RequestOutput) -> dict:
    """The fidelity fields of a teacher-forced request's output (see the module docstring)."""
    if out.forced_logprobs is None or out.greedy_tokens is None:
        raise ValueError(f"request {out.request_id!r} was not teacher-forced (no forced_ids): it has no fidelity")
    return fidelity_fields(out.tokens, out.forced_logprobs, out.greedy_tokens)


def fidelity_fields(tokens: Sequence[int], logprobs: Sequence[float], greedy: Sequence[int]) -> dict:
    """The fidelity fields of one forced answer: its ``tokens``, each one's log-probability under the compressed
    cache, and the token greedy decoding would have emitted at each step (all three of the answer's length). Shared
    by our engine's forced requests and the kvpress worker's (``scripts/compare_kvpress.py --fidelity``)."""
    if not len(tokens) == len(logprobs) == len(greedy):
        raise ValueError(f"{len(tokens)} tokens, {len(logprobs)} log-probs and {len(greedy)} greedy tokens differ")
    n = len(tokens)
    misses = [i for i, (g, t) in enumerate(zip(greedy, tokens, strict=True)) if g != t]
    return {
        "tokens": n,
        "nll": -math.fsum(logprobs) / n if n else 0.0,
        "match": (n - len(misses)) / n if n else 1.0,
        "first_miss": misses[0] if misses else n,
        "worst": -min(logprobs, default=0.0),
        "logprobs": [round(lp, 4) for lp in logprobs],
    }


def metric_value(row: dict, metric: str) -> float:
    """A fidelity row's ``metric`` oriented so that higher is better, as paired comparisons count "ahead": minus
    the NLL or the worst token's NLL, the match in %."""
    if metric not in METRICS:
        raise ValueError(f"unknown fidelity metric {metric!r}; choose from {', '.join(METRICS)}")
    if metric not in row:
        raise ValueError(f"this fidelity row has no {metric!r} (written before it was recorded): {row}")
    return 100 * float(row[metric]) if metric == "match" else -float(row[metric])


def fidelity_lines(rows: list[dict], mode: str, ratios: list[float], full_setup: str = "full") -> list[str]:
    """Markdown lines of ``mode``'s answer fidelity per setup and ratio: mean NLL per token of the full cache's
    answer and the % of its tokens greedy decoding keeps, over the samples the full cache (setup ``full_setup``)
    was forced on too."""
    full = {r["sample_id"]: r["nll"] for r in rows if r["mode"] == mode and r["setup"] == full_setup}
    setups = sorted({r["setup"] for r in rows if r["mode"] == mode} - {full_setup})
    if not full or not setups:
        return []
    head = " | ".join(f"{r:g}x NLL (+ over full) / match" for r in ratios)
    lines = [
        f"\nAnswer fidelity (the full cache's answer forced; its own NLL {sum(full.values()) / len(full):.3f}, "
        f"n={len(full)}):\n",
        f"| policy | {head} |",
        "|---|" + "---|" * len(ratios),
    ]
    for setup in setups:
        cells = []
        for ratio in ratios:
            rs = [r for r in rows if (r["mode"], r["setup"], r["ratio"]) == (mode, setup, ratio)]
            rs = [r for r in rs if r["sample_id"] in full]
            if not rs:
                cells.append("-")
                continue
            nll = sum(r["nll"] for r in rs) / len(rs)
            base = sum(full[r["sample_id"]] for r in rs) / len(rs)
            match = 100 * sum(r["match"] for r in rs) / len(rs)
            cells.append(f"{nll:.3f} ({nll - base:+.3f}) / {match:.0f}%")
        lines.append(f"| {setup} | " + " | ".join(cells) + " |")
    return lines
