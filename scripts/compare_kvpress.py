"""Compare kvcompress policies with NVIDIA kvpress presses of the same name on the same jsonl samples.

For every mode x policy x ratio (plus each side's full-cache baseline) this runs

- ours: ``experiments/run.py task=jsonl`` (kvcompress's normal evaluation path, one run directory per cell under
  ``DIR/ours/``), with the policy's default parameters;
- kvpress: scripts/kvpress_worker.py under the kvpress virtualenv's python (``--kvpress-python``), i.e.
  kvpress's own ``kv-press-text-generation`` pipeline, greedy, with ``compression_ratio = 1 - 1/ratio``;

scores both sides' predictions with the same ``kvcompress.tasks.metrics`` metric (each line's ``metric``), appends
one row per side and cell to ``DIR/rows.jsonl`` as it finishes (a re-run skips the cells already there, and a
kvpress cell cut short runs only the samples its worker output under ``DIR/kvpress/`` lacks) and
writes ``DIR/table.md``: per mode x policy x ratio, each side's score, its % of that side's own full cache and
its kept fraction (share of the prompt's KV entries held when decoding starts: ours from the run's
``tokens_kept / tokens_seen``; kvpress's from the prompt lengths, ``int(context * (1 - compression_ratio))``
kept of the compressed context plus the uncompressed question part).

Modes: ``query_agnostic`` is kvpress's default (context compressed, question prefilled afterwards);
``query_aware`` folds the question into the context on the kvpress side (``context + question``, question "")
and runs our ``task.mode=query_aware`` (our side then also compresses the chat template's assistant header,
which kvpress leaves in its uncompressed question part: a few tokens).

    python scripts/compare_kvpress.py --suite docs/results/suites/dev-1k.jsonl --policies tova,snapkv \\
        --ratios 2,4,8 --modes query_aware,query_agnostic --samples 40 --out outputs/compare_kvpress

``--fidelity --reference QDIR`` also measures kvpress's answer fidelity (kvcompress.experiment.fidelity): the worker
teacher-forces the full-cache answers of the quality_table results directory QDIR (its ``full`` setup, the answers
``quality_table.py --fidelity`` forced through our setups there) through each kvpress cell (``--force``), and
``DIR/fidelity.jsonl`` gets one quality_table-style row per sample, setup ``kvpress/<policy>``. Both sides are then
forced the same token ids, and ``scripts/paired_scores.py 'QDIR:<setup>' 'DIR:kvpress/<policy>' --metric nll``
pairs them sample by sample. Our side's fidelity comes from quality_table (one path for it), so ``--fidelity``
runs only kvpress cells.

See docs/COMPARE_KVPRESS.md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from kvcompress.experiment.fidelity import FIDELITY_FILE, answers_by_sample, fidelity_fields, fidelity_lines
from kvcompress.experiment.paired import prediction_scores, retained_percent, sign_test
from kvcompress.tasks.base import spread

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "scripts" / "kvpress_worker.py"
DEFAULT_MODEL = Path.home() / ".cache" / "kvcompress" / "models" / "smollm2-float32"
DEFAULT_KVPRESS_PYTHON = Path.home() / ".venvs" / "kvpress" / "bin" / "python"
MODES = ("query_aware", "query_agnostic")

# our policy name (conf/policy/<name>.yaml) -> kvpress 0.5.5 press class ("" = no press)
PRESSES: dict[str, str] = {
    "full": "",
    "tova": "TOVAPress",
    "snapkv": "SnapKVPress",
    "keydiff": "KeyDiffPress",
    "knorm": "KnormPress",
    "streaming": "StreamingLLMPress",
    "expected_attention": "ExpectedAttentionPress",
    "h2o": "ObservedAttentionPress",  # the worker loads the model with eager attention for it
    "kvzip": "KVzipPress",  # kvpress's default ranks all layers and heads together: compare with allocation=global
}
SIDES = ("ours", "kvpress")


def press_for(policy: str) -> str:
    """The kvpress class name of our ``policy`` ("" for ``full``); ValueError for an unmapped name."""
    if policy not in PRESSES:
        raise ValueError(f"no kvpress press for policy {policy!r}; accepted: {', '.join(PRESSES)}")
    return PRESSES[policy]


def compression_ratio(ratio: float) -> float:
    """kvpress's ``compression_ratio`` (fraction removed) for our ``budget.ratio`` (seen / kept)."""
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    return 1.0 - 1.0 / ratio


def cell_key(side: str, mode: str, policy: str, ratio: float) -> str:
    return f"{side}|{mode}|{policy}|x{ratio:g}"


def cells(policies: Sequence[str], ratios: Sequence[float], modes: Sequence[str]) -> list[tuple[str, str, float]]:
    """(mode, policy, ratio) to evaluate: each mode's full baseline first, then every policy x ratio."""
    out: list[tuple[str, str, float]] = []
    for mode in modes:
        out.append((mode, "full", 1.0))
        out += [(mode, p, float(r)) for p in policies if p != "full" for r in ratios]
    return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows already in a jsonl file such as ``rows.jsonl`` (none if it does not exist; a torn last line from a crash
    is ignored)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row under an exclusive lock, so that one run per side (``--sides``) can share ``path``."""
    with path.open("a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(json.dumps(row) + "\n")


def pending(todo: Iterable[tuple[str, str, str, float]], rows: Sequence[dict[str, Any]]) -> list[tuple]:
    """The (side, mode, policy, ratio) cells of ``todo`` without a row yet."""
    done = {r["key"] for r in rows}
    return [c for c in todo if cell_key(*c) not in done]


select_samples = spread  # n records spread evenly over the file, or all of them


def kvpress_inputs(records: Sequence[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """The worker's input lines for ``mode`` (query-aware: question folded into the context)."""
    out = []
    for r in records:
        context, question = r["context"], r["question"]
        if mode == "query_aware":
            context, question = context + question, ""
        out.append(
            {
                "id": r["id"],
                "context": context,
                "question": question,
                "max_new_tokens": r.get("max_new_tokens", 64),
            }
        )
    return out


def make_row(
    side: str, mode: str, policy: str, ratio: float, preds: Sequence[dict[str, Any]], kept: float, **extra: Any
) -> dict[str, Any]:
    """One ``rows.jsonl`` line: mean score over ``preds`` (each with ``score``) and the kept fraction."""
    return {
        "key": cell_key(side, mode, policy, ratio),
        "side": side,
        "mode": mode,
        "policy": policy,
        "ratio": ratio,
        "score": sum(p["score"] for p in preds) / max(len(preds), 1),
        "kept_fraction": kept,
        "n_samples": len(preds),
        "predictions": list(preds),
        **extra,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def paired(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> tuple[int, int, float] | None:
    """``(ahead, behind, p)``: the samples (matched by id) on which our score is above / below kvpress's, and the
    two-sided exact sign test's p-value of that split (ties left out; 1.0 when every sample ties). None when a
    side is missing or its predictions carry no ids. A cell a few samples apart at n = 20 is usually p > 0.3."""
    if not ours or not theirs:
        return None
    mine, other = prediction_scores(ours), prediction_scores(theirs)
    return sign_test(mine, other) if mine.keys() & other.keys() else None


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per mode x policy x ratio, for ours and kvpress the score, its % of the side's own full score, the
    % of that full score it retained (each sample capped at its full-cache score) and the kept KV fraction; then
    the paired per-sample comparison (:func:`paired`)."""
    by_key = {r["key"]: r for r in rows}
    lines = [
        "| mode | policy | ratio | ours score | ours % of full | ours retained | ours kept | kvpress score "
        "| kvpress % of full | kvpress retained | kvpress kept | n | samples ours ahead / behind | sign test p |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    seen: list[tuple[str, str, float]] = []
    for r in rows:
        cell = (r["mode"], r["policy"], r["ratio"])
        if cell not in seen:
            seen.append(cell)
    seen.sort(key=lambda c: (c[0], c[1] != "full", c[1], c[2]))
    for mode, policy, ratio in seen:
        cols: list[str] = []
        n = None
        sides = {side: by_key.get(cell_key(side, mode, policy, ratio)) for side in ("ours", "kvpress")}
        for side, row in sides.items():
            full = by_key.get(cell_key(side, mode, "full", 1.0))
            score = row["score"] if row else None
            pct = 100.0 * score / full["score"] if row and full and full["score"] else None
            retained = retained_percent(prediction_scores(row), prediction_scores(full)) if row and full else None
            cols += [_fmt(score, ".1f"), _fmt(pct, ".0f"), _fmt(retained, ".0f")]
            cols.append(_fmt(row["kept_fraction"] if row else None, ".3f"))
            n = n or (row["n_samples"] if row else None)
        pair = paired(sides["ours"], sides["kvpress"])
        cols += [_fmt(n, "d"), f"{pair[0]} / {pair[1]}" if pair else "-", _fmt(pair[2] if pair else None, ".2f")]
        lines.append(f"| {mode} | {policy} | {ratio:g} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def _score(record: dict[str, Any], prediction: str) -> float:
    from kvcompress.tasks.metrics import score

    return score(record.get("metric", "string_match_all"), prediction, record["answers"])


def ours_dir(out: Path, mode: str, policy: str, ratio: float) -> Path:
    """The experiments/run.py run directory of one cell of our side."""
    return out / "ours" / mode / f"{policy}-x{ratio:g}"


def cell_overrides(args: argparse.Namespace, subset: Path, mode: str, policy: str, ratio: float) -> list[str]:
    """The Hydra overrides every cell of our side sets (``--ours-override``'s follow them)."""
    return [
        "task=jsonl",
        f"task.path={subset}",
        f"task.mode={mode}",
        f"policy={policy}",
        f"budget.ratio={1 if policy == 'full' else ratio:g}",
        "model=hf",
        f"model.path={args.model}",
        f"model.device={args.device}",
        f"model.dtype={args.dtype}",
        "baselines_dir=null",
        "progress=false",
    ]


def ran_with(args: argparse.Namespace, subset: Path, mode: str, policy: str, ratio: float) -> list[str] | None:
    """The ``--ours-override`` entries the finished cell ran with (from its run directory's ``.hydra/overrides.yaml``,
    the overrides :func:`cell_overrides` sets for every cell left out), or None when it has no such file."""
    path = ours_dir(args.out, mode, policy, ratio) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    fixed = {o.partition("=")[0] for o in cell_overrides(args, subset, mode, policy, ratio)}
    return [o for o in yaml.safe_load(path.read_text(encoding="utf-8")) or [] if o.partition("=")[0] not in fixed]


def bearing(overrides: Sequence[str], policy: str) -> list[str]:
    """The overrides that change a cell of ``policy``'s predictions: for the full cache, none of the policy's or
    the budget's (it evicts nothing)."""
    unused = ("policy.", "budget.") if policy == "full" else ()
    return [o for o in overrides if not o.startswith(unused)]


def run_ours(args: argparse.Namespace, subset: Path, mode: str, policy: str, ratio: float) -> dict[str, Any]:
    """One cell through experiments/run.py; predictions rescored here with the same metric as kvpress's."""
    run_dir = ours_dir(args.out, mode, policy, ratio)
    overrides = [*cell_overrides(args, subset, mode, policy, ratio), *args.ours_override]
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), *overrides, f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    records = {r["id"]: r for r in _load_jsonl(subset)}
    preds = []
    seen = kept = 0
    for rec in _load_jsonl(run_dir / "predictions.jsonl"):
        if "sample_id" not in rec:
            continue
        ref = records[rec["sample_id"]]
        preds.append({"id": rec["sample_id"], "prediction": rec["prediction"], "score": _score(ref, rec["prediction"])})
        seen += rec["tokens_seen"]
        kept += rec["tokens_kept"]
    return make_row("ours", mode, policy, ratio, preds, kept / max(seen, 1), wall_s=time.perf_counter() - t0)


def _worker(args: argparse.Namespace, inp: Path, out: Path, policy: str, cr: float, *extra: str) -> None:
    """Run the kvpress worker on ``inp`` into ``out`` under the kvpress virtualenv's python."""
    cmd = [
        str(args.kvpress_python),
        str(WORKER),
        "--model",
        str(args.model),
        "--input",
        str(inp),
        "--out",
        str(out),
        "--press",
        press_for(policy),
        "--compression-ratio",
        repr(cr),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv must not see kvcompress
    subprocess.run(cmd, check=True, env=env)


def run_kvpress(args: argparse.Namespace, subset: Path, mode: str, policy: str, ratio: float) -> dict[str, Any]:
    """One cell through the kvpress worker; kept fraction from the prompt lengths it reports. The worker appends a
    line per sample, so a cell cut short resumes: only the samples its output file lacks are run again
    (:func:`worker_lines`), and ``wall_s`` is then the resumed part's time."""
    records = _load_jsonl(subset)
    work, cr = _cell(args, mode, policy, ratio)
    out = work / f"{policy}-x{ratio:g}.jsonl"
    done = {line["id"] for line in worker_lines(out)}
    todo = [line for line in kvpress_inputs(records, mode) if line["id"] not in done]
    t0 = time.perf_counter()
    if todo:
        inp = work / "input.jsonl"
        _write_jsonl(inp, todo)
        _worker(args, inp, out, policy, cr)
    by_id = {r["id"]: r for r in records}
    preds = []
    total = held = 0
    for p in worker_lines(out):
        if p["id"] not in by_id:  # a line of another --samples choice run into the same directory
            continue
        preds.append({"id": p["id"], "prediction": p["prediction"], "score": _score(by_id[p["id"]], p["prediction"])})
        total += p["context_tokens"] + p["question_tokens"]
        held += int(p["context_tokens"] * (1 - cr)) + p["question_tokens"]
    return make_row("kvpress", mode, policy, ratio, preds, held / max(total, 1), wall_s=time.perf_counter() - t0)


def reference_answers(reference: Path, mode: str, ids: Sequence[str], tokenizer: Any) -> dict[str, list[int]]:
    """Sample id -> the token ids forced in ``mode``'s fidelity cells: the ``full`` setup's predictions in the
    quality_table results directory ``reference`` (the answers ``quality_table.py --fidelity`` forced through our
    setups there), as quality_table forces them (:func:`~kvcompress.experiment.fidelity.answer_ids`). Exits with one
    line when ``reference`` holds no full-cache answer for any of ``ids`` (this run's samples)."""
    path = reference / "rows.jsonl"
    if not path.is_file():
        sys.exit(f"error: --reference {reference}: no rows.jsonl there (give a quality_table results directory)")
    wanted = set(ids)
    full = [
        r for r in read_rows(path) if (r.get("setup"), r.get("mode")) == ("full", mode) and r.get("sample_id") in wanted
    ]
    if not full:
        sys.exit(
            f"error: --reference {reference} has no full-cache answer (setup full, mode {mode}) for any of this "
            "run's samples: give the quality_table directory of the same suite, samples and mode"
        )
    if len(full) < len(ids):
        print(f"note: --reference has full-cache answers for {len(full)} of {len(ids)} samples ({mode})", flush=True)
    return answers_by_sample(full, tokenizer)


def _cell(args: argparse.Namespace, mode: str, policy: str, ratio: float) -> tuple[Path, float]:
    """A kvpress cell's work directory (made if missing) and its ``compression_ratio`` (0 for ``full``)."""
    work = args.out / "kvpress" / mode
    work.mkdir(parents=True, exist_ok=True)
    return work, 0.0 if policy == "full" else compression_ratio(ratio)


def worker_lines(path: Path) -> list[dict[str, Any]]:
    """The worker's lines already in ``path`` (none if it does not exist). A torn last line (the worker stopped
    mid-write) is cut off so that the next append starts clean."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def forced_lines(path: Path, answers: dict[str, list[int]]) -> list[dict[str, Any]]:
    """The worker's ``--force`` lines already in ``path`` (:func:`worker_lines`); a line that forced other token ids
    than ``answers`` holds now (the reference changed) stops the run with one error line."""
    lines = worker_lines(path)
    for line in lines:
        if line.get("forced_ids", answers.get(line["id"])) != answers.get(line["id"]):
            sys.exit(
                f"error: {path} forced other answers for {line['id']} than --reference holds now; "
                "use another --out, or delete that file to force the new ones"
            )
    return lines


def kvpress_fidelity(
    args: argparse.Namespace, subset: Path, mode: str, policy: str, ratio: float, answers: dict[str, list[int]]
) -> list[dict[str, Any]]:
    """The fidelity rows of one kvpress cell: ``answers`` forced through it by the worker (``--force``), resuming
    from the samples its output file already holds (:func:`forced_lines`). Samples without an answer (an empty
    one, or none in the reference) are left out."""
    work, cr = _cell(args, mode, policy, ratio)
    out = work / f"fidelity-{policy}-x{ratio:g}.jsonl"
    done = {line["id"] for line in forced_lines(out, answers)}
    todo = [
        {**line, "forced_ids": answers[line["id"]]}
        for line in kvpress_inputs(_load_jsonl(subset), mode)
        if line["id"] not in done and answers.get(line["id"])
    ]
    if todo:
        inp = work / "fidelity-input.jsonl"
        _write_jsonl(inp, todo)
        _worker(args, inp, out, policy, cr, "--force")
        inp.unlink()  # transient: the worker echoes each line's forced ids into its output
    return [
        {
            "setup": f"kvpress/{policy}",
            "mode": mode,
            "ratio": ratio,
            "sample_id": p["id"],
            **fidelity_fields(answers[p["id"]], p["logprobs"], p["greedy"]),
            "prompt_tokens": p["context_tokens"] + p["question_tokens"],
        }
        for p in forced_lines(out, answers)
    ]


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", type=Path, required=True, help="jsonl samples (e.g. from scripts/make_suites.py)")
    parser.add_argument("--policies", default="tova", help=f"comma-separated, from: {','.join(PRESSES)}")
    parser.add_argument("--ratios", default="2,4,8", help="comma-separated budget ratios (seen / kept)")
    parser.add_argument("--modes", default="query_aware", help="comma-separated: query_aware,query_agnostic")
    parser.add_argument(
        "--sides", default="ours,kvpress", help="comma-separated sides to run (one process per side uses two cores)"
    )
    parser.add_argument("--samples", type=int, default=None, help="use N samples spread over the suite (all)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (rows.jsonl, table.md)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF model directory for both sides")
    parser.add_argument("--kvpress-python", type=Path, default=DEFAULT_KVPRESS_PYTHON)
    parser.add_argument("--device", default="cpu", help="both sides (e.g. cuda)")
    parser.add_argument("--dtype", default="float32", help="both sides: float32 | bfloat16 | float16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the kvpress worker")
    parser.add_argument(
        "--ours-override", action="append", default=[], help="extra Hydra override for our runs (repeatable)"
    )
    parser.add_argument(
        "--fidelity", action="store_true", help="also force the full cache's answers through kvpress (see above)"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="with --fidelity: a quality_table results directory whose full setup's answers are forced",
    )
    args = parser.parse_args(argv)
    if args.fidelity and args.reference is None:
        parser.error("--fidelity forces a quality_table directory's full-cache answers: give it as --reference DIR")
    if args.reference is not None and not args.fidelity:
        parser.error("--reference chooses the answers --fidelity forces; give --fidelity too")
    if args.fidelity and "kvpress" not in args.sides:
        parser.error(
            "--fidelity forces answers through kvpress's cells: --sides must include kvpress (ours: quality_table)"
        )
    args.policies = [p for p in args.policies.split(",") if p]
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    args.modes = [m for m in args.modes.split(",") if m]
    args.sides = [s for s in args.sides.split(",") if s]
    if not args.sides or any(s not in SIDES for s in args.sides):
        parser.error(f"--sides {','.join(args.sides)!r}: accepted: a comma-separated subset of {','.join(SIDES)}")
    for p in args.policies:
        press_for(p)
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        parser.error(f"unknown mode(s) {bad}; accepted: {', '.join(MODES)}")
    args.out = args.out.resolve()
    args.suite = args.suite.resolve()
    if args.reference is not None:
        args.reference = args.reference.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    subset = args.out / "samples.jsonl"
    records = [{**r, "id": str(r.get("id", f"{args.suite.stem}:{i}"))} for i, r in enumerate(_load_jsonl(args.suite))]
    chosen = select_samples(records, args.samples)  # every line carries its id: both sides name samples alike
    if not subset.is_file():
        _write_jsonl(subset, chosen)
    elif _load_jsonl(subset) != chosen:
        sys.exit(f"error: {args.out} holds rows for other samples (samples.jsonl differs); use another --out")
    rows_path = args.out / "rows.jsonl"
    todo = [(side, *c) for c in cells(args.policies, args.ratios, args.modes) for side in args.sides]
    left = pending(todo, read_rows(rows_path))
    for side, mode, policy, ratio in todo:  # a finished cell of ours is not taken for another --ours-override's
        done = side == "ours" and (side, mode, policy, ratio) not in left
        ran = ran_with(args, subset, mode, policy, ratio) if done else None
        if ran is not None and bearing(ran, policy) != bearing(args.ours_override, policy):
            sys.exit(
                f"error: {ours_dir(args.out, mode, policy, ratio)} ran our side with --ours-override {ran or 'none'}, "
                f"not {args.ours_override or 'none'}; use another --out"
            )
    print(f"{len(todo) - len(left)} of {len(todo)} cells already in {rows_path}", flush=True)
    for side, mode, policy, ratio in left:
        runner = run_ours if side == "ours" else run_kvpress
        row = runner(args, subset, mode, policy, ratio)
        append_row(rows_path, row)
        print(f"{side:8s} {mode} {policy} x{ratio:g}: score {row['score']:.1f} kept {row['kept_fraction']:.3f}")
        write_table(args.out)
    if args.fidelity:
        fidelity_pass(args, subset)
    print(write_table(args.out))


def load_tokenizer(model: Path) -> Any:
    """The tokenizer of the HF model directory both sides run."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def fidelity_pass(args: argparse.Namespace, subset: Path) -> None:
    """Every kvpress cell's fidelity rows that ``DIR/fidelity.jsonl`` lacks (:func:`kvpress_fidelity`)."""
    path = args.out / FIDELITY_FILE
    have = {(r["setup"], r["mode"], r["ratio"], r["sample_id"]) for r in read_rows(path)}
    tokenizer = load_tokenizer(args.model)
    ids = [r["id"] for r in _load_jsonl(subset)]
    answers_of: dict[str, dict[str, list[int]]] = {}
    for mode, policy, ratio in cells(args.policies, args.ratios, args.modes):
        if mode not in answers_of:
            answers_of[mode] = reference_answers(args.reference, mode, ids, tokenizer)
        new = [
            r
            for r in kvpress_fidelity(args, subset, mode, policy, ratio, answers_of[mode])
            if (r["setup"], r["mode"], r["ratio"], r["sample_id"]) not in have
        ]
        for row in new:
            append_row(path, row)
        if new:
            print(f"kvpress  {mode} {policy} x{ratio:g}: fidelity of {len(new)} samples", flush=True)


def write_table(out: Path) -> str:
    """Rebuild ``out/table.md`` from every row in ``out/rows.jsonl`` (another side's process may have added some);
    returns the table."""
    table = render_table(read_rows(out / "rows.jsonl"))
    forced = read_rows(out / FIDELITY_FILE)
    for mode in sorted({r["mode"] for r in forced}):
        ratios = sorted({r["ratio"] for r in forced if r["mode"] == mode} - {1.0})
        lines = fidelity_lines(forced, mode, ratios, full_setup="kvpress/full")
        table += "\n".join([f"\n{mode}:", *lines]) + "\n" if lines else ""
    (out / "table.md").write_text(table, encoding="utf-8")
    return table


if __name__ == "__main__":
    main()
