"""What a setup keeps of the full cache's score pooled over several result directories, each one draw of a suite
(or one part of a draw): per draw and pooled, per compressed (mode, ratio) cell, the % of full and what it retained
of the full cache's own answers (kvcompress.experiment.paired). Pooling sums the scores over every sample before
dividing, so each sample weighs the same whatever draw it comes from; this is how docs/RESULTS.md pools the
held-out 4k draws. Each % of full comes with its 95% bootstrap interval over the samples (seeded, 10,000
resamples): a target inside it is not decided by these samples, however many draws they come from.

Each argument is ``PATH:LABEL`` as in ``scripts/paired_scores.py`` (a results directory and a quality_table setup
label, or a compare_kvpress ``side/policy``); each directory's own full-cache rows are its reference. A draw
whose 8x and 16x rows live in two directories is two arguments: its samples pool once per cell.

    python scripts/pooled_scores.py \\
        'docs/results/heldout-4k-kvzip-qwin32-n40:kvzip+global:policy.window=32' \\
        'docs/results/heldout2-4k-kvzip-qwin32:kvzip+global:policy.window=32' --ratios 8

``--against`` takes a second pool (the same draws under another setup) and compares the two sample by sample over
every draw at once: the sign test on the scores and on the losses against each side's full cache, as
paired_scores.py does for one directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvcompress.experiment.paired import (
    Cells,
    Pooled,
    add_cell_filters,
    load_sides,
    merge_cells,
    pair_cells,
    pooled_cells,
    render,
    render_retained,
    retained_pairs,
    side_arg,
)


def load_pool(sides: list[tuple[Path, str]], modes: list[str] | None, ratios: list[float] | None) -> list[tuple]:
    """Per side ``(PATH:LABEL, cells, full)``, cells kept to ``modes`` / ``ratios`` (None: all); raises
    ``ValueError``."""
    return [(f"{path}:{label}", cells, full) for path, label, cells, full in load_sides(sides, modes, ratios)]


def render_pool(pool: list[tuple]) -> tuple[str, Cells, Cells]:
    """Markdown table of each draw's cells and of the pooled ones, with the merged cells and full caches."""
    lines = [
        "| mode | ratio | results | n | full | score | % of full | 95% interval | retained |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(c: Pooled, name: str) -> str:
        return (
            f"| {c.mode} | {c.ratio:g} | {name} | {c.n} | {c.full:.1f} | {c.score:.1f} | {c.percent:.1f}% "
            f"| {c.low:.1f}–{c.high:.1f}% | {c.retained:.1f}% |"
        )

    for name, cells, full in pool:
        lines += [row(c, name) for c in pooled_cells(cells, full)]
    merged = merge_cells([(name, cells) for name, cells, _ in pool])
    full = merge_cells([(name, f) for name, _, f in pool])
    label = f"**pooled, {len(pool)} {'directory' if len(pool) == 1 else 'directories'}**"
    lines += [row(c, label) for c in pooled_cells(merged, full)]
    return "\n".join(lines), merged, full


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sides", nargs="+", type=side_arg, help="PATH:LABEL, one per draw (or part of one)")
    parser.add_argument("--against", nargs="+", type=side_arg, default=[], help="PATH:LABEL of a second pool")
    add_cell_filters(parser)
    args = parser.parse_args(argv)
    try:
        pools = [load_pool(sides, args.modes, args.ratios) for sides in (args.sides, args.against) if sides]
        tables = [render_pool(pool) for pool in pools]
    except ValueError as err:
        print(f"pooled_scores: {err}", file=sys.stderr)
        return 2
    if not any(pooled_cells(merged, full) for _, merged, full in tables):
        print("pooled_scores: no compressed cell with full-cache rows of its mode in these results", file=sys.stderr)
        return 2
    for title, (table, _, _) in zip(("", "--against:\n\n")[: len(tables)], tables, strict=True):
        print(f"{title}{table}\n")
    if len(tables) == 2:
        (_, a, full_a), (_, b, full_b) = tables
        print("Pooled, sample by sample (first pool against --against):\n")
        print(render(pair_cells(a, b), "pool", "--against"))
        print("\nAgainst each side's full cache, per sample (retained: capped at the full cache's score):\n")
        print(render_retained(retained_pairs(a, b, full_a, full_b), "pool", "--against"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
