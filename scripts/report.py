"""Collect the runs of a sweep into a table and a score-vs-compression chart.

    python scripts/report.py multirun/2026-01-01_12-00-00 [--out DIR]

Reads every ``summary.json`` under the directory (incomplete runs have none and are skipped) and writes
``report.csv``, ``report.md`` and ``report.png`` into it (or ``--out``). A run's ``% of full`` divides its score
by the full-cache score of the same model/task/mode/seed/task config (``baseline_key`` in summary.json), taken
from an uncompressed run found in the directory, else from the run's own ``full_cache_score``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import pandas as pd  # noqa: E402

COLUMNS = [
    "policy",
    "allocation",
    "mode",
    "task",
    "model",
    "compression_ratio",
    "logical_compression",
    "physical_compression",
    "score",
    "full_cache_score",
    "pct_of_full",
    "n_samples",
    "kv_bytes_allocated_peak",
    "wall_s",
    "run_dir",
]
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ("-", "--", "-.", ":")
MD_COLUMNS = {
    "policy": "policy",
    "allocation": "allocation",
    "compression_ratio": "nominal ratio",
    "logical_compression": "logical compression",
    "physical_compression": "physical compression",
    "score": "score",
    "pct_of_full": "% of full",
}


def collect(root: Path) -> pd.DataFrame:
    """One row per complete run under ``root``, with the full-cache score and % of it filled in."""
    rows = []
    for path in sorted(root.rglob("summary.json")):
        summary = json.loads(path.read_text(encoding="utf-8"))
        if summary.get("complete"):
            rows.append({**summary, "run_dir": str(path.parent.relative_to(root))})
    if not rows:
        raise SystemExit(f"error: no complete run (summary.json) under {root}")
    df = pd.DataFrame(rows)
    uncompressed = (df["policy"] == "full") | ((df["compression_ratio"] == 1) & df["max_cache_tokens"].isna())
    df["uncompressed"] = uncompressed
    found = df[uncompressed].groupby("baseline_key")["score"].mean()
    df["full_cache_score"] = df["baseline_key"].map(found).fillna(df["full_cache_score"]).astype(float)
    df["pct_of_full"] = 100.0 * df["score"] / df["full_cache_score"].where(df["full_cache_score"] > 0)
    return df.sort_values(["task", "mode", "policy", "allocation", "compression_ratio"]).reset_index(drop=True)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table of the report's main columns (numbers rounded for reading).

    Identical rows are shown once: a full-cache job ignores ``budget.ratio``, so a ratio grid repeats it."""
    header = list(MD_COLUMNS.values())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in df.drop_duplicates(subset=list(MD_COLUMNS)).iterrows():
        cells = []
        for key in MD_COLUMNS:
            value = row[key]
            if isinstance(value, float):
                cells.append(
                    "-"
                    if math.isnan(value)
                    else f"{value:.3g}"
                    if key == "compression_ratio"
                    else f"{value:.2f}"
                    if "compression" in key
                    else f"{value:.1f}"
                )
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(df: pd.DataFrame, path: Path) -> None:
    parts = ["# KV-cache compression report\n"]
    for (task, mode, model), sub in df.groupby(["task", "mode", "model"], sort=True):
        parts.append(f"\n## {task} ({mode}, {model}, {int(sub['n_samples'].iloc[0])} samples)\n\n")
        parts.append(markdown_table(sub))
    path.write_text("".join(parts), encoding="utf-8")


def line_labels(df: pd.DataFrame) -> pd.Series:
    """Legend label per row: the policy, plus allocation/mode/task when the report holds several of them."""
    label = df["policy"].astype(str)
    for key in ("allocation", "mode", "task"):
        if df[key].nunique() > 1:
            label = label + "/" + df[key].astype(str)
    return label


def plot(df: pd.DataFrame, path: Path) -> None:
    """Score and % of full-cache score against effective (logical) compression, log2 x-axis."""
    fig, (ax_score, ax_pct) = plt.subplots(1, 2, figsize=(12, 4.5))
    compressed = df[~df["uncompressed"]].assign(label=line_labels(df[~df["uncompressed"]]))
    for i, (label, sub) in enumerate(compressed.groupby("label", sort=True)):
        sub = sub.sort_values("logical_compression")
        # marker and dash vary too, so policies with equal scores stay visible on top of each other
        style = {
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": DASHES[i % len(DASHES)],
            "label": label,
            "markersize": 9 - (i % 3) * 2,
            "alpha": 0.85,
        }
        ax_score.plot(sub["logical_compression"], sub["score"], **style)
        ax_pct.plot(sub["logical_compression"], sub["pct_of_full"], **style)
    full = df.loc[df["uncompressed"], "score"]
    if not full.empty:
        ax_score.axhline(full.mean(), color="black", linewidth=1, label=f"full cache ({full.mean():.1f})")
        ax_pct.axhline(100.0, color="black", linewidth=1, label="full cache")
    if compressed["pct_of_full"].isna().all():
        ax_pct.text(0.5, 0.5, "no full-cache run with a score > 0", ha="center", transform=ax_pct.transAxes)
    xs = df["logical_compression"]
    for ax, ylabel in ((ax_score, "score"), (ax_pct, "% of full-cache score")):
        ax.set_xscale("log", base=2)
        ax.set_xlim(xs.min() / 1.25, xs.max() * 1.25)  # explicit limits: an axis without points stays valid
        ax.set_xlabel("effective compression (tokens seen / kept)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_score.legend(fontsize=8)
    tasks = ", ".join(sorted(df["task"].unique()))
    fig.suptitle(f"{tasks}: score vs KV-cache compression ({', '.join(sorted(df['model'].unique()))})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_wandb(df: pd.DataFrame, root: Path, project: str, mode: str) -> Path:
    """Log the report to a wandb run in ``root``: a score-vs-compression line per policy and the table.

    Returns the run's local directory (upload it with ``wandb sync`` when ``mode`` is offline).
    """
    import wandb

    compressed = df[~df["uncompressed"]].assign(label=line_labels(df[~df["uncompressed"]]))
    xs, ys, keys = [], [], []
    for label, sub in compressed.groupby("label", sort=True):
        sub = sub.sort_values("logical_compression")
        xs.append(sub["logical_compression"].tolist())
        ys.append(sub["score"].tolist())
        keys.append(label)
    run = wandb.init(
        mode=mode, dir=str(root), project=project, group=root.name, job_type="report", name=f"report-{root.name}"
    )
    chart = wandb.plot.line_series(
        xs=xs, ys=ys, keys=keys, title="score vs logical compression", xname="logical compression"
    )
    run.log({"score_vs_compression": chart, "report": wandb.Table(dataframe=df[COLUMNS])})
    run.finish()
    return Path(run.dir).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="multirun (or any) directory holding run directories")
    parser.add_argument("--out", type=Path, default=None, help="where to write report.* (default: root)")
    parser.add_argument(
        "--wandb",
        choices=("offline", "online"),
        default=None,
        help="also log the chart and table to a wandb run (in root/wandb)",
    )
    parser.add_argument("--project", default="kvcompress", help="wandb project (with --wandb)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    df = collect(args.root)
    df[COLUMNS].to_csv(out / "report.csv", index=False)
    write_markdown(df, out / "report.md")
    plot(df, out / "report.png")
    print((out / "report.md").read_text(encoding="utf-8"))
    print(f"{len(df)} runs -> {out / 'report.csv'}, {out / 'report.md'}, {out / 'report.png'}")
    if args.wandb:
        print(f"wandb run: {log_wandb(df, args.root, args.project, args.wandb)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
