"""Sample-by-sample comparison of two setups' results: per (mode, ratio) cell, both mean scores over the samples
both scored, how many samples A wins and loses against B, and the sign test's p (kvcompress.experiment.paired).

Each side is ``PATH:LABEL``: a results directory (or its rows.jsonl) and a quality_table setup label or a
compare_kvpress ``side/policy``. A bad label gets the list of labels the file holds.

When both files also hold their full cache's rows (quality_table's ``full`` setup, compare_kvpress's
``side/full``), a second table splits each cell against them: what each side keeps of its full cache's score
(each sample capped at the full cache's score) and what it gains above it, with the sign test on each sample's
loss against its own full cache. A cell can be won through gains alone, on samples the full cache misses.

    python scripts/paired_scores.py \\
        'docs/results/dev-1k-kvzip-alloc-n20:kvzip+global' \\
        'docs/results/kvpress-dev-1k-kvzip-n20:kvpress/kvzip'

``--metric nll`` (or ``match``, ``worst``) compares the two on answer fidelity instead (quality_table
``--fidelity``): each sample's NLL of the full cache's answer, shown negated so that "ahead" is the lower NLL, its
greedy match in %, or its worst token's NLL (negated).
A continuous measure splits samples that both score 0 or both 100, so it separates setups that scores cannot; its
table adds the Wilcoxon signed-rank test's p, which also weighs how far apart each sample's two values are. kvpress's
fidelity rows (``compare_kvpress.py --fidelity``, label ``kvpress/<policy>``) pair with quality_table's:

    python scripts/paired_scores.py 'docs/results/dev-1k-agnostic-fidelity-n40:kvzip+global' \\
        'docs/results/kvpress-dev-1k-kvzip-agnostic-n40:kvpress/kvzip' --metric nll
"""

from __future__ import annotations

import argparse
import sys

from kvcompress.experiment.fidelity import METRICS
from kvcompress.experiment.paired import (
    add_cell_filters,
    full_cells,
    keep_cells,
    load_cells,
    pair_cells,
    render,
    render_retained,
    retained_pairs,
    side_arg,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=side_arg, help="PATH:LABEL of the setup counted as ahead when it scores higher")
    parser.add_argument("b", type=side_arg, help="PATH:LABEL of the setup it is compared with")
    add_cell_filters(parser)
    parser.add_argument(
        "--metric",
        choices=("score", *METRICS),
        default="score",
        help="score (rows.jsonl), or from fidelity.jsonl: nll, worst (both shown negated), match (%%)",
    )
    args = parser.parse_args(argv)
    try:
        a, b = (load_cells(path, label, args.metric) for path, label in (args.a, args.b))
    except ValueError as err:
        print(f"paired_scores: {err}", file=sys.stderr)
        return 2
    a, b = (keep_cells(side, args.modes, args.ratios) for side in (a, b))
    pairs = pair_cells(a, b)
    if not pairs:
        print("paired_scores: the two sides share no (mode, ratio) cell with common sample ids", file=sys.stderr)
        return 2
    print(render(pairs, args.a[1], args.b[1], samples=args.metric == "score"))
    if args.metric != "score":
        return 0
    try:
        full_a, full_b = (full_cells(path, label) for path, label in (args.a, args.b))
        retained = retained_pairs(a, b, full_a, full_b)
    except ValueError as err:
        print(f"\n(no split against the full cache: {err})")
        return 0
    if retained:
        print("\nAgainst each side's full cache, per sample (retained: capped at the full cache's score):\n")
        print(render_retained(retained, args.a[1], args.b[1]))
    else:
        print("\n(no split against the full cache: no compressed cell has full-cache rows of its mode on both sides)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
