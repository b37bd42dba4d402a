"""Collect the runs of a sweep into a table and a score-vs-compression chart.

    python scripts/report.py multirun/<sweep> [--out DIR] [--wandb offline|online [--project P] [--entity E]]

Reads every ``summary.json`` under the directory (incomplete runs have none and are skipped) and writes
``report.csv``, ``report.md`` and ``report.png`` into it (or ``--out``). A run's ``% of full`` divides its score
by the full-cache score of the same model/task/mode/seed/task config (``baseline_key`` in summary.json), taken
from an uncompressed run found in the directory, else from the run's own ``full_cache_score``.

``--wandb`` logs every complete run of the directory to wandb from its files (summary, config, per-sample table;
group = the directory name; runs already logged in that mode are left alone unless ``--wandb-force``), then a
``report`` run with the score-vs-compression chart and the table in ``<dir>/_report/wandb/``. Every run's offline
files then match ``<dir>/*/wandb/offline-run-*`` (docs/EXPERIMENTS.md, "Weights & Biases").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

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
REPORT_RUN_DIR = "_report"
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
    own = pd.to_numeric(df["full_cache_score"], errors="coerce")  # all-None columns are object dtype
    df["full_cache_score"] = df["baseline_key"].map(found).astype(float).fillna(own)
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


def baseline_command(df: pd.DataFrame, root: Path) -> str:
    """The command that adds the missing full-cache run to the sweep in ``root``: a run's overrides with
    ``policy=full`` and without budget settings (the baseline key covers model, task and seed only)."""
    overrides: list[str] = []
    for run_dir in df["run_dir"]:
        path = root / run_dir / ".hydra" / "overrides.yaml"
        if path.is_file():
            overrides = [str(o) for o in OmegaConf.load(path)]
            break
    keep = [o for o in overrides if not o.startswith(("policy=", "policy.", "budget.", "hydra.", "baselines_dir"))]
    return " ".join(["python experiments/run.py -m policy=full", *keep, f"hydra.sweep.dir={root}"])


def plot(df: pd.DataFrame, path: Path, root: Path | None = None) -> None:
    """Write :func:`figure` to ``path``."""
    fig = figure(df, root)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(df: pd.DataFrame, root: Path | None = None) -> plt.Figure:
    """Score and % of full-cache score against effective (logical) compression, log2 x-axis, y from 0 to 100.

    A fixed 0-100 y-axis keeps a 50-point drop looking like one. Without a full-cache score the right panel
    says which command produces it."""
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
        if full.empty:
            how = "no full-cache run in this sweep; add one with\n" + textwrap.fill(
                baseline_command(df, root or Path(".")),
                60,
                subsequent_indent="    ",
                break_on_hyphens=False,  # paths and options stay whole, so the command can be copied
                break_long_words=False,
            )
        else:
            how = "the full-cache run scored 0: % of full is undefined"
        ax_pct.text(0.5, 0.5, how, ha="center", va="center", fontsize=8, family="monospace", transform=ax_pct.transAxes)
    xs = df["logical_compression"]
    pct_max = compressed["pct_of_full"].max()
    top = max(100.0, float(df["score"].max()), 0.0 if pd.isna(pct_max) else float(pct_max))
    for ax, ylabel in ((ax_score, "score"), (ax_pct, "% of full-cache score")):
        ax.set_ylim(-2, top + 2)  # 0-100 (beyond 100 only when a run beats the full cache)
        ax.set_xscale("log", base=2)
        ax.set_xlim(xs.min() / 1.25, xs.max() * 1.25)  # explicit limits: an axis without points stays valid
        ax.set_xlabel("effective compression (tokens seen / kept)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_score.legend(fontsize=8)
    tasks = ", ".join(sorted(df["task"].unique()))
    fig.suptitle(f"{tasks}: score vs KV-cache compression ({', '.join(sorted(df['model'].unique()))})")
    fig.tight_layout()
    return fig


def log_runs_wandb(
    df: pd.DataFrame, root: Path, project: str, mode: str, entity: str | None, force: bool
) -> tuple[int, int]:
    """Log every complete run of the report to wandb from its files, grouped by ``root``'s name.

    Returns (logged, left alone because already logged in this mode)."""
    from kvcompress.experiment.tracking import log_finished_run

    logged = skipped = 0
    for run_dir in df["run_dir"].unique():
        if log_finished_run(root / run_dir, root.name, mode, project, entity, force) is None:
            skipped += 1
        else:
            logged += 1
    return logged, skipped


def log_wandb(df: pd.DataFrame, root: Path, project: str, mode: str, entity: str | None = None) -> Path:
    """Log the report to a wandb run in ``root/_report``: a score-vs-compression line per policy and the table.

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
    report_dir = root / REPORT_RUN_DIR  # beside the job directories, so <root>/*/wandb/offline-run-* matches it
    report_dir.mkdir(exist_ok=True)
    run = wandb.init(
        mode=mode,
        dir=str(report_dir),
        project=project,
        entity=entity,
        group=root.name,
        job_type="report",
        name=f"report-{root.name}",
        reinit="finish_previous",
    )
    logged: dict[str, object] = {"report": wandb.Table(dataframe=df[COLUMNS])}
    if xs:  # a sweep of uncompressed runs only has no line to draw
        logged["score_vs_compression"] = wandb.plot.line_series(
            xs=xs, ys=ys, keys=keys, title="score vs logical compression", xname="logical compression"
        )
    run.log(logged)
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
        help="also log every run (summary, config, samples table) and a report run (chart, table) to wandb",
    )
    parser.add_argument("--project", default="kvcompress", help="wandb project (with --wandb)")
    parser.add_argument("--entity", default=None, help="wandb entity (with --wandb)")
    parser.add_argument("--wandb-force", action="store_true", help="log runs again even if already logged")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    out = args.out or args.root
    out.mkdir(parents=True, exist_ok=True)
    df = collect(args.root)
    df[COLUMNS].to_csv(out / "report.csv", index=False)
    write_markdown(df, out / "report.md")
    plot(df, out / "report.png", args.root)
    print((out / "report.md").read_text(encoding="utf-8"))
    print(f"{len(df)} runs -> {out / 'report.csv'}, {out / 'report.md'}, {out / 'report.png'}")
    if args.wandb:
        logged, skipped = log_runs_wandb(df, args.root, args.project, args.wandb, args.entity, args.wandb_force)
        print(f"wandb: {logged} runs logged, {skipped} already logged ({args.wandb}; --wandb-force logs them again)")
        print(f"wandb report run: {log_wandb(df, args.root, args.project, args.wandb, args.entity)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
