"""Paired, sample-by-sample comparison of two result sets: how many samples one setup wins and loses against
another, and whether that split could be chance (two-sided exact sign test, ties left out).

At n = 20 a cell two samples apart is usually p > 0.5, so a mean difference alone says little; this is the test
behind every "ahead / behind, p" figure in docs/RESULTS.md. It reads both result formats:

* ``scripts/quality_table.py`` rows (one per sample: ``setup``, ``mode``, ``ratio``, ``sample_id``, ``score``),
  selected by their setup label;
* ``scripts/compare_kvpress.py`` rows (one per cell: ``side``, ``mode``, ``policy``, ``ratio``, ``predictions``
  with ``id`` and ``score``), selected by ``side/policy``, e.g. ``kvpress/kvzip``;
* ``fidelity.jsonl`` rows, quality_table's or compare_kvpress's (label ``kvpress/<policy>``), for a fidelity
  ``metric`` (:mod:`kvcompress.experiment.fidelity`): minus the NLL of the full cache's answer, or its greedy
  match in %, so that higher is better there too.

A compressed run can also score *above* its full cache, on samples the full cache misses (SmolLM2 loops on some
passkeys with the whole context in view). Such gains count in the mean like any other point, so two setups can
differ in score only through them. :func:`retained_pairs` separates the two: each sample's score capped at the same
side's full-cache score is what the compression retained of the full cache's answers, and what lies above the cap
is gained; they sum to the usual % of full. Its sign test counts, per sample, which side lost less of its own full
cache's score.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvcompress.experiment.fidelity import FIDELITY_FILE, metric_value

# (mode, ratio) -> sample id -> score in [0, 100]
Cells = dict[tuple[str, float], dict[str, float]]


@dataclass(frozen=True)
class Pair:
    """One (mode, ratio) cell: the ``n`` samples both sides scored, each side's mean score over them, the samples
    ``a`` scores above / below ``b``, the sign test's two-sided p-value (1.0 when every sample ties) and the
    Wilcoxon signed-rank test's (:func:`signed_rank_p`), which weighs each sample by how far apart the two are:
    for continuous values (fidelity) it can see what the sign test cannot; on 0 / 100 scores it adds nothing."""

    mode: str
    ratio: float
    n: int
    mean_a: float
    mean_b: float
    ahead: int
    behind: int
    p: float
    p_ranks: float = 1.0


def side_arg(text: str) -> tuple[Path, str]:
    """A command line's ``PATH:LABEL`` (the path holds no colon; the label may: ``kvzip+global:policy.window=32``);
    raises ``argparse.ArgumentTypeError``, which argparse reports in one line naming the argument."""
    path, sep, label = text.partition(":")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected PATH:LABEL (e.g. docs/results/x:kvzip+global), got {text!r}")
    return Path(path), label


def add_cell_filters(parser: argparse.ArgumentParser) -> None:
    """``--modes`` and ``--ratios`` on a results script's command line, each comma-separated and parsed into a list
    (None: every cell); a ratio that is not a number is argparse's one-line error naming ``--ratios``. Apply them
    with :func:`keep_cells`."""
    parser.add_argument(
        "--modes", type=lambda text: text.split(","), default=None, help="comma-separated modes to keep (default: all)"
    )
    parser.add_argument("--ratios", type=ratio_list, default=None, help="comma-separated ratios to keep (default: all)")


def ratio_list(text: str) -> list[float]:
    """``"8,16"`` -> ``[8.0, 16.0]``; raises ``argparse.ArgumentTypeError`` for anything else."""
    try:
        return [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def keep_cells(cells: Cells, modes: list[str] | None, ratios: list[float] | None) -> Cells:
    """The cells of ``cells`` in ``modes`` and at ``ratios`` (None: any)."""
    return {
        key: scores
        for key, scores in cells.items()
        if (modes is None or key[0] in modes) and (ratios is None or key[1] in ratios)
    }


def sign_test(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[int, int, float]:
    """``(ahead, behind, p)`` over the sample ids both hold: ``a`` above / below ``b``, and the exact binomial
    two-sided p-value of that split under no difference."""
    from scipy.stats import binomtest

    common = a.keys() & b.keys()
    ahead = sum(a[i] > b[i] for i in common)
    behind = sum(a[i] < b[i] for i in common)
    return ahead, behind, binomtest(ahead, ahead + behind).pvalue if ahead + behind else 1.0


def signed_rank_p(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """The two-sided p-value of the Wilcoxon signed-rank test on ``a - b`` over the sample ids both hold (ties, a
    zero difference, left out as the sign test leaves them; 1.0 when every sample ties). Exact for small n and no
    tied ranks, the normal approximation otherwise (scipy's choice)."""
    from scipy.stats import wilcoxon

    diffs = [a[i] - b[i] for i in sorted(a.keys() & b.keys()) if a[i] != b[i]]
    return float(wilcoxon(diffs).pvalue) if diffs else 1.0


def prediction_scores(row: Mapping) -> dict[str, float]:
    """Sample id -> score of a compare_kvpress row's ``predictions`` (those without an id are left out)."""
    return {p["id"]: float(p["score"]) for p in row["predictions"] if "id" in p}


def load_cells(path: Path, label: str, metric: str = "score") -> Cells:
    """The per-sample scores of ``label`` in ``path`` (a ``rows.jsonl`` or the directory holding one): a setup
    label of quality_table rows, or ``side/policy`` of compare_kvpress rows. With a fidelity ``metric`` (``nll``,
    ``match``) the values come from the directory's ``fidelity.jsonl`` instead (:func:`metric_value`). Raises
    ``ValueError`` naming the labels the file does hold when ``label`` is not among them."""
    name = "rows.jsonl" if metric == "score" else FIDELITY_FILE
    path = path / name if path.is_dir() else path
    if not path.is_file():
        hint = "" if metric == "score" else " (run its quality_table command again with --fidelity)"
        raise ValueError(f"no results at {path}: give a {name} or the directory holding one{hint}")
    cells: Cells = {}
    labels: set[str] = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if metric != "score":
            if "setup" not in row:
                raise ValueError(
                    f"{path}:{n}: --metric {metric} reads fidelity rows (quality_table, compare_kvpress), not this row"
                )
            own = row["setup"]
            scores = {row["sample_id"]: metric_value(row, metric)}
        elif "setup" in row:
            own = row["setup"]
            scores = {row["sample_id"]: float(row["score"])}
        elif "side" in row and "predictions" in row:
            own = f"{row['side']}/{row['policy']}"
            scores = prediction_scores(row)
        else:
            raise ValueError(f"{path}:{n}: not a quality_table or compare_kvpress row (keys: {sorted(row)})")
        labels.add(own)
        if own == label:
            cells.setdefault((row["mode"], float(row["ratio"])), {}).update(scores)
    if not cells:
        raise ValueError(f"{path} has no rows for {label!r}; it holds: {', '.join(sorted(labels)) or 'nothing'}")
    return cells


def pair_cells(a: Cells, b: Cells) -> list[Pair]:
    """One :class:`Pair` per (mode, ratio) both hold, in (mode, ratio) order, over the samples both scored."""
    pairs = []
    for key in sorted(a.keys() & b.keys()):
        common = a[key].keys() & b[key].keys()
        if not common:
            continue
        ahead, behind, p = sign_test(a[key], b[key])
        mean_a, mean_b = (sum(cell[i] for i in common) / len(common) for cell in (a[key], b[key]))
        ranks = signed_rank_p(a[key], b[key])
        pairs.append(Pair(key[0], key[1], len(common), mean_a, mean_b, ahead, behind, p, ranks))
    return pairs


@dataclass(frozen=True)
class Retained:
    """One (mode, ratio) cell split against each side's own full cache (ratio 1, same mode, same file), over the
    samples both sides and both full caches scored. ``retained_*``: the sum over samples of min(score, full score), in
    % of the full cache's summed score (at most 100); ``gained_*``: what the side scores above its full cache, in
    the same unit; retained + gained is the cell's % of full. ``losses`` pairs each sample's loss against its own
    full cache, max(0, full - score), negated so that "ahead" is the side that lost less of that sample (its means
    are minus the mean losses; its ahead / behind and p are the sign test on them). With equal full caches this is
    the sign test on the capped scores."""

    losses: Pair
    retained_a: float
    gained_a: float
    retained_b: float
    gained_b: float


def full_cells(path: Path, label: str) -> Cells:
    """The full-cache scores stored beside ``label`` in ``path``: setup ``full`` for quality_table rows,
    ``<side>/full`` for compare_kvpress rows (``label`` is ``side/policy`` there). Raises ``ValueError`` when the
    file holds none."""
    rows = path / "rows.jsonl" if path.is_dir() else path
    if not rows.is_file():
        raise ValueError(f"no results at {rows}: give a rows.jsonl or the directory holding one")
    with rows.open(encoding="utf-8") as fh:
        first = next((line for line in fh if line.strip()), None)
    if first is None:
        raise ValueError(f"{rows} is empty")
    return load_cells(path, "full" if "setup" in json.loads(first) else f"{label.split('/', 1)[0]}/full")


def reference(full: Cells, key: tuple[str, float]) -> dict[str, float] | None:
    """The full-cache scores that the compressed cell ``key`` is measured against (the same mode at ratio 1); None
    when ``key`` is itself a ratio-1 cell or ``full`` lacks its mode."""
    return None if key[1] == 1.0 else full.get((key[0], 1.0))


def retained_percent(scores: Mapping[str, float], full: Mapping[str, float]) -> float | None:
    """The % of the full cache's summed score, over the sample ids both hold, that ``scores`` retained: each sample
    capped at its full-cache score. None when the full cache scores nothing on those samples."""
    common = scores.keys() & full.keys()
    total = sum(full[i] for i in common)
    return 100 * sum(min(scores[i], full[i]) for i in common) / total if total else None


def retained_pairs(a: Cells, b: Cells, full_a: Cells, full_b: Cells) -> list[Retained]:
    """One :class:`Retained` per compressed (mode, ratio) cell both sides hold and both full caches cover, over
    the sample ids all four hold. Cells of a mode either full cache lacks, and cells whose full caches score
    nothing there (no % of zero), are left out."""
    out = []
    for key in sorted(a.keys() & b.keys()):
        ref_a, ref_b = reference(full_a, key), reference(full_b, key)
        if ref_a is None or ref_b is None:
            continue
        common = a[key].keys() & b[key].keys() & ref_a.keys() & ref_b.keys()
        sum_a, sum_b = sum(ref_a[i] for i in common), sum(ref_b[i] for i in common)
        if not (sum_a and sum_b):
            continue
        loss_a = {i: min(a[key][i], ref_a[i]) - ref_a[i] for i in common}
        loss_b = {i: min(b[key][i], ref_b[i]) - ref_b[i] for i in common}
        (losses,) = pair_cells({key: loss_a}, {key: loss_b})
        retained_a = retained_percent({i: a[key][i] for i in common}, ref_a)
        retained_b = retained_percent({i: b[key][i] for i in common}, ref_b)
        gained_a = 100 * sum(a[key][i] for i in common) / sum_a - retained_a
        gained_b = 100 * sum(b[key][i] for i in common) / sum_b - retained_b
        out.append(Retained(losses, retained_a, gained_a, retained_b, gained_b))
    return out


def render_retained(cells: list[Retained], name_a: str, name_b: str) -> str:
    """Markdown table of ``cells``: per side what it retained of its full cache's score and what it gained above it
    (% of full), then the sign test on the losses against the full caches, and the totals over every cell."""
    lines = [
        f"| mode | ratio | n | {name_a} retained / gained (% of full) | {name_b} retained / gained (% of full) "
        "| ahead / behind on losses | p |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for k in cells:
        c = k.losses
        lines.append(
            f"| {c.mode} | {c.ratio:g} | {c.n} | {k.retained_a:.0f}% / {k.gained_a:+.0f}% | {k.retained_b:.0f}% / "
            f"{k.gained_b:+.0f}% | {c.ahead} / {c.behind} | {c.p:.2f} |"
        )
    ahead, behind = sum(k.losses.ahead for k in cells), sum(k.losses.behind for k in cells)
    lines.append(f"\nOn losses against the full caches: ahead on {ahead} sample-cells, behind on {behind}.")
    return "\n".join(lines)


def render(pairs: list[Pair], name_a: str, name_b: str, samples: bool = True) -> str:
    """Markdown table of ``pairs``, one row per cell, then the totals over every cell (with ``samples``, also the
    summed difference in samples, which only scores in [0, 100] have; without, continuous values, also the
    signed-rank test's p)."""
    ranks = "" if samples else " signed-rank p |"
    lines = [
        f"| mode | ratio | n | {name_a} | {name_b} | ahead / behind | sign test p |{ranks}",
        "|---|---:|---:|---:|---:|---|---:|" + ("" if samples else "---:|"),
    ]
    digits = 1 if samples else 3
    for c in pairs:
        tests = f"{c.p:.2f} |" if samples else f"{c.p:.2g} | {c.p_ranks:.2g} |"
        lines.append(
            f"| {c.mode} | {c.ratio:g} | {c.n} | {c.mean_a:.{digits}f} | {c.mean_b:.{digits}f} "
            f"| {c.ahead} / {c.behind} | {tests}"
        )
    ahead, behind = sum(c.ahead for c in pairs), sum(c.behind for c in pairs)
    summed = sum((c.mean_a - c.mean_b) * c.n / 100 for c in pairs)
    total = f"; {summed:+.1f} samples." if samples else "."
    lines.append(f"\nOver {len(pairs)} cells: ahead on {ahead} sample-cells, behind on {behind}{total}")
    return "\n".join(lines)


def merge_cells(sides: list[tuple[str, Cells]]) -> Cells:
    """One set of cells holding every ``(name, cells)`` side's samples: draws of a suite pooled, or one draw's
    results kept in several directories. A sample id two sides hold in the same cell must have the same value
    there (the full cache's rows copied beside each run do); a conflict raises ``ValueError`` naming both sides."""
    merged: Cells = {}
    where: dict[tuple[tuple[str, float], str], str] = {}
    for name, cells in sides:
        for key, scores in cells.items():
            cell = merged.setdefault(key, {})
            for sample, value in scores.items():
                if sample in cell and cell[sample] != value:
                    raise ValueError(
                        f"sample {sample} ({key[0]}, {key[1]:g}x) scores {cell[sample]:g} in {where[key, sample]} "
                        f"and {value:g} in {name}: pool distinct draws, or the same run's rows"
                    )
                cell[sample] = value
                where.setdefault((key, sample), name)
    return merged


@dataclass(frozen=True)
class Pooled:
    """One compressed (mode, ratio) cell over the samples its full cache (ratio 1, same mode) also scored: their
    number, the two mean scores, the cell's summed score in % of the full cache's summed score (a sum over samples
    before dividing, so each sample weighs the same whatever draw it comes from), what it retained of the full
    cache's answers in the same unit (:func:`retained_percent`), and ``percent``'s 95% bootstrap interval
    (``low``, ``high``; :func:`bootstrap_percent`)."""

    mode: str
    ratio: float
    n: int
    full: float
    score: float
    percent: float
    retained: float
    low: float
    high: float


def bootstrap_percent(
    scores: list[float], full: list[float], draws: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``100 * sum(scores) / sum(full)``, the samples (paired: ``scores[i]`` and
    ``full[i]`` are one sample's compressed and full-cache scores) drawn with replacement ``draws`` times. A
    resample whose full cache scores nothing is left out. Seeded, so a table is reproducible.

    This is how far the pooled figure could move with another set of samples like these: a target inside the
    interval is not yet decided either way by these samples."""
    if len(scores) != len(full) or not scores:
        raise ValueError(f"bootstrap_percent needs paired, non-empty scores (got {len(scores)} and {len(full)})")
    if sum(full) <= 0:
        raise ValueError("bootstrap_percent: the full cache scores nothing on these samples, so no % of full exists")
    if draws < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap_percent needs draws >= 1 and 0 < level < 1 (got {draws} and {level})")
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(scores), size=(draws, len(scores)))
    num = np.asarray(scores, dtype=float)[pick].sum(1)
    den = np.asarray(full, dtype=float)[pick].sum(1)
    ratios = 100 * num[den > 0] / den[den > 0]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def pooled_cells(cells: Cells, full: Cells) -> list[Pooled]:
    """One :class:`Pooled` per compressed cell of ``cells`` whose mode ``full`` covers and whose full cache scores
    something on its samples, in (mode, ratio) order."""
    out = []
    for key in sorted(cells):
        ref = reference(full, key)
        if ref is None:
            continue
        common = sorted(cells[key].keys() & ref.keys())
        total = sum(ref[i] for i in common)
        if not total:
            continue
        summed = sum(cells[key][i] for i in common)
        retained = retained_percent(cells[key], ref)
        assert retained is not None  # total > 0
        n = len(common)
        low, high = bootstrap_percent([cells[key][i] for i in common], [ref[i] for i in common])
        out.append(Pooled(*key, n, total / n, summed / n, 100 * summed / total, retained, low, high))
    return out


def lost_samples(cells: Cells, full: Cells) -> dict[tuple[str, float], list[str]]:
    """Per compressed (mode, ratio) cell of ``cells`` whose mode ``full`` covers: the ids (sorted) of the samples
    scored below the full cache's score on them, the answers the compression lost. A cell that lost none maps to
    an empty list."""
    out: dict[tuple[str, float], list[str]] = {}
    for key in sorted(cells):
        ref = reference(full, key)
        if ref is None:
            continue
        out[key] = sorted(i for i in cells[key].keys() & ref.keys() if cells[key][i] < ref[i])
    return out


def load_sides(
    sides: list[tuple[Path, str]], modes: list[str] | None, ratios: list[float] | None
) -> list[tuple[Path, str, Cells, Cells]]:
    """Per ``PATH:LABEL`` side ``(path, label, cells, full)``: the label's cells kept to ``modes`` / ``ratios``
    (None: all) and the full-cache cells stored beside them (:func:`full_cells`); raises ``ValueError``."""
    return [
        (path, label, keep_cells(load_cells(path, label), modes, ratios), full_cells(path, label))
        for path, label in sides
    ]
