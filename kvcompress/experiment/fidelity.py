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

from kvcompress.sequence import RequestOutput

FIDELITY_FILE = "fidelity.jsonl"
METRICS = ("nll", "match", "worst")


def fidelity_row(out: RequestOutput) -> dict:
    """The fidelity fields of a teacher-forced request's output (see the module docstring)."""
    if out.forced_logprobs is None or out.greedy_tokens is None:
        raise ValueError(f"request {out.request_id!r} was not teacher-forced (no forced_ids): it has no fidelity")
    n = len(out.tokens)
    misses = [i for i, (g, t) in enumerate(zip(out.greedy_tokens, out.tokens, strict=True)) if g != t]
    return {
        "tokens": n,
        "nll": -math.fsum(out.forced_logprobs) / n if n else 0.0,
        "match": (n - len(misses)) / n if n else 1.0,
        "first_miss": misses[0] if misses else n,
        "worst": -min(out.forced_logprobs, default=0.0),
        "logprobs": [round(lp, 4) for lp in out.forced_logprobs],
    }


def metric_value(row: dict, metric: str) -> float:
    """A fidelity row's ``metric`` oriented so that higher is better, as paired comparisons count "ahead": minus
    the NLL or the worst token's NLL, the match in %."""
    if metric not in METRICS:
        raise ValueError(f"unknown fidelity metric {metric!r}; choose from {', '.join(METRICS)}")
    if metric not in row:
        raise ValueError(f"this fidelity row has no {metric!r} (written before it was recorded): {row}")
    return 100 * float(row[metric]) if metric == "match" else -float(row[metric])
