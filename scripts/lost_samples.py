"""The samples a setup loses against its own full cache, per results directory and (mode, ratio) cell: the ids to
try a variant on first, with quality_table's ``--ids``, before running it on a whole suite.

Each argument is ``PATH:LABEL`` as in ``scripts/paired_scores.py`` (a results directory and a quality_table setup
label); each directory's own full-cache rows are the reference, and a sample is lost where the setup scores below
them (half of a two-needle answer counts). One line per cell: ``PATH MODE RATIOx N ids``.

    python scripts/lost_samples.py 'docs/results/heldout3-4k-kvzip-qwin32:kvzip+global:policy.window=32' --ratios 8

``--ids-only`` prints only the comma-separated ids, for one directory and one cell, to pass straight on:

    IDS=$(python scripts/lost_samples.py 'docs/results/heldout3-4k-kvzip-qwin32:kvzip+global:policy.window=32' \\
        --modes query_aware --ratios 8 --ids-only)
    python scripts/quality_table.py --task jsonl --path docs/results/suites/heldout3-4k.jsonl --samples 40 \\
        --protected 32 --ratios 8 --modes query_aware --ids $IDS --out /tmp/screen --setups <variant>
"""

from __future__ import annotations

import argparse
import sys

from kvcompress.experiment.paired import add_cell_filters, load_sides, lost_samples, side_arg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sides", nargs="+", type=side_arg, help="PATH:LABEL, one per results directory")
    add_cell_filters(parser)
    parser.add_argument("--ids-only", action="store_true", help="only the ids, for one directory and one cell")
    args = parser.parse_args(argv)
    lines: list[tuple[str, tuple[str, float], list[str]]] = []
    try:
        for path, _, cells, full in load_sides(args.sides, args.modes, args.ratios):
            lines += [(str(path), key, ids) for key, ids in lost_samples(cells, full).items()]
    except ValueError as err:
        print(f"lost_samples: {err}", file=sys.stderr)
        return 2
    if not lines:
        print("lost_samples: no compressed cell with full-cache rows of its mode in these results", file=sys.stderr)
        return 2
    if args.ids_only:
        if len(lines) != 1:
            cells = ", ".join(f"{p} {m} {r:g}x" for p, (m, r), _ in lines)
            print(f"lost_samples: --ids-only needs one cell; these results hold {len(lines)}: {cells}", file=sys.stderr)
            return 2
        print(",".join(lines[0][2]))
        return 0
    for path, (mode, ratio), ids in lines:
        print(f"{path} {mode} {ratio:g}x {len(ids)} {','.join(ids)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
