"""Quality of every policy at several compression ratios, in both evaluation modes, on the embedded model.

For each policy, every sample goes through one engine: its prompt (query-aware) or context (query-agnostic) is
prefilled once, forked once per ratio, each fork compressed to its own budget, and the forks of several samples
decode together. Results append to ``<out>/rows.jsonl`` as they complete (re-running resumes); the Markdown table
goes to ``<out>/table.md``. ``<out>/setups.json`` records what each setup label ran (its policy and budget fields
that differ from their defaults), and a rerun refuses to resume a label that now resolves to another config, e.g.
a preset changed since (:mod:`kvcompress.experiment.setup_record`). Rows written before that record was kept are
refused too, unless ``--adopt-rows`` says they ran what their labels resolve to now.

    python scripts/quality_table.py --out results/quality --samples 3 --tokens 1000

A setup (:mod:`kvcompress.experiment.setups`) is a named policy config, ``<policy>+<allocation>`` with any
``conf/policy`` name and an allocator or a named ``conf/budget`` config, or a preset (``conf/experiment``, run as
``experiment=<name>`` runs it). It may carry arguments after a colon, each ``key=value`` for the allocator
(``budget.allocator_args``), ``policy.key=value`` for the policy's fields or ``budget.key=value`` for the budget's:

    --setups lfu+global,lfu+global_floor_normalized,lfu_avg+global,lfu+global:floor=0.2,normalize=sum,hybrid
    --setups kvzip+global:policy.prefix_keep=4
    --setups recommended_query_aware,recommended_query_agnostic:budget.summary_sketch=0

``--fidelity`` also teacher-forces the full cache's answer to each sample through every setup and ratio
(kvcompress.experiment.fidelity), into ``<out>/fidelity.jsonl``: per sample the answer's NLL per token, the share
of its tokens greedy decoding would emit too, and where it first would not. Rows are resumed like the scores, so an
existing results directory gets them by re-running its command with ``--fidelity``; compare two setups on them with
``scripts/paired_scores.py --metric nll``.

``--ids`` runs a few samples of a suite by id, e.g. the ones a cell lost, to try a variant on them first:

    --task jsonl --path docs/results/suites/heldout-4k.jsonl --samples 40 \\
        --ids heldout-4000-multikey-01,heldout-4000-person-00

``--full-from DIR`` takes the full cache's rows of those samples from an earlier run's ``DIR/rows.jsonl`` (the
draw's own results) instead of running the full cache again: they are copied into ``<out>/rows.jsonl``, so a screen
of a variant on a few lost samples costs only the variant. Samples DIR has no full row for run the full cache.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch

from kvcompress.budget import Budget
from kvcompress.compressor import Compressor
from kvcompress.engine import Engine, peak_tokens
from kvcompress.experiment.fidelity import FIDELITY_FILE, answer_ids, fidelity_lines, fidelity_row
from kvcompress.experiment.paired import retained_percent
from kvcompress.experiment.policy_config import load_policy
from kvcompress.experiment.prompts import bind_tokenizer, build_prompt
from kvcompress.experiment.setup_record import SETUPS_FILE, check_resume, config_record, read_records, write_records
from kvcompress.experiment.setups import SETUPS, check_setup, resolve_setup, split_setups
from kvcompress.generate import as_request
from kvcompress.model import load_model
from kvcompress.model_runner import model_kv_geometry, paged_attention
from kvcompress.policies.head_bias import HeadBias
from kvcompress.sequence import RequestOutput
from kvcompress.tasks.base import spread
from kvcompress.tasks.metrics import score
from kvcompress.tasks.registry import build_task


def run_setup(
    model,
    tok,
    samples,
    policy_name,
    allocation,
    ratios,
    protected,
    mode,
    overrides=None,
    max_seqs: int = 8,
    allocator_args: dict | None = None,
    protected_fraction: float | None = None,
    budget_args: dict | None = None,
    forced: dict[str, list[int]] | None = None,
) -> Iterator[tuple[str, list[dict]]]:
    """Every sample under every ratio through one engine; yields ``(sample_id, rows)`` as each sample completes.

    The requests of one sample share its prompt (query-aware) or context (query-agnostic): the engine prefills it
    once, forks it per ratio and compresses each fork to its own budget. With ``forced`` (sample id -> the full
    cache's answer tokens) each request teacher-forces its sample's answer instead of generating, and the rows hold
    its fidelity (:func:`~kvcompress.experiment.fidelity.fidelity_row`) instead of a score."""
    policy = load_policy(policy_name, **(overrides or {}))
    bind_tokenizer(policy, tok)
    prompts = {s.sample_id: build_prompt(tok, s) for s in samples}

    def budget(ratio: float = 1.0) -> Budget:
        return setup_budget(allocation, protected, protected_fraction, allocator_args, budget_args, ratio)

    compressor = Compressor(policy, budget())
    requests = [
        as_request(
            (sample.sample_id, r),
            prompts[sample.sample_id].context_ids,
            prompts[sample.sample_id].question_ids,
            mode,
            len(forced[sample.sample_id]) if forced else sample.max_new_tokens,
            [tok.eos_token_id],
            suffix=prompts[sample.sample_id].suffix_ids,
            budget=budget(r),
            share_prefix=sample.sample_id,
            forced_ids=forced[sample.sample_id] if forced else (),
        )
        for sample in samples
        for r in ratios
    ]
    longest = max(peak_tokens(r, compressor) for r in requests)  # KVzip's reconstruction included
    engine = Engine(model, compressor, max_seqs=max_seqs, max_tokens_per_head=longest)
    for request in requests:
        engine.add_request(request)
    by_id = {s.sample_id: s for s in samples}
    with paged_attention(model):
        yield from _collect(engine, by_id, ratios, tok, forced is not None)


def setup_budget(
    allocation: str,
    protected: int,
    protected_fraction: float | None,
    allocator_args: dict | None,
    budget_args: dict | None,
    ratio: float = 1.0,
) -> Budget:
    """A setup's budget at ``ratio``: the script's protected window and fraction, unless the setup's own budget
    fields (``budget_args``) set them."""
    fields = dict(protected_window=protected, protected_fraction=protected_fraction, allocator_args=allocator_args)
    return Budget(ratio=ratio, allocation=allocation, **{**fields, **(budget_args or {})})


def setup_records(wanted: list[tuple], protected: int, protected_fraction: float | None) -> dict[str, dict]:
    """Label -> :func:`~kvcompress.experiment.setup_record.config_record` of each resolved setup of ``wanted``
    but the full cache (whose rows no budget changes)."""
    return {
        label: config_record(
            load_policy(policy, **overrides),
            setup_budget(allocation, protected, protected_fraction, allocator_args, budget_args),
        )
        for label, policy, allocation, overrides, allocator_args, budget_args in wanted
        if label != "full"
    }


def _collect(engine: Engine, by_id: dict, ratios: list[float], tok, forced: bool) -> Iterator[tuple[str, list[dict]]]:
    """Step the engine; yield each sample's rows (fidelity rows when ``forced``) once every ratio has finished."""
    outputs: dict[str, dict[float, RequestOutput]] = defaultdict(dict)
    while engine.has_unfinished:
        for out in engine.step():
            sample_id, r = out.request_id
            outputs[sample_id][r] = out
            if len(outputs[sample_id]) < len(ratios):
                continue
            sample, finished = by_id[sample_id], outputs.pop(sample_id)
            rows = []
            for ratio in ratios:
                o = finished[ratio]
                if forced:
                    rows.append({"ratio": ratio, **fidelity_row(o), "prompt_tokens": o.prompt_tokens})
                    continue
                pred = tok.decode(o.tokens, skip_special_tokens=True)
                rows.append(
                    {
                        "ratio": ratio,
                        "prediction": pred,
                        "output_ids": list(o.tokens),
                        "score": score(sample.metric, pred, sample.answers, sample),
                        "logical": o.memory.logical_compression,
                        "physical": o.memory.physical_compression,
                        "prompt_tokens": o.prompt_tokens,
                    }
                )
            yield sample_id, rows


def written(rows: list[dict]) -> set[tuple[str, str, str, float]]:
    """The (setup, mode, sample id, ratio) of ``rows`` already written, as :func:`missing_ratios` takes them."""
    return {(r["setup"], r["mode"], r["sample_id"], float(r["ratio"])) for r in rows}


def missing_ratios(
    samples: list, label: str, mode: str, ratios: list[float], done: set, answers: dict | None = None
) -> dict[tuple[float, ...], list]:
    """What is left to run of setup ``label`` in ``mode``: the ratios a sample lacks (``[1.0]`` for ``full``) ->
    the samples lacking exactly those, given ``done`` ((setup, mode, sample id, ratio) already written). With
    ``answers`` ((mode, sample id) -> the full cache's answer tokens: the fidelity pass), a sample whose answer is
    empty has nothing to force and is left out."""
    missing: dict[tuple[float, ...], list] = {}
    for s in samples:
        lacks = tuple(r for r in ([1.0] if label == "full" else ratios) if (label, mode, s.sample_id, r) not in done)
        if lacks and (answers is None or answers[mode, s.sample_id]):
            missing.setdefault(lacks, []).append(s)
    return missing


def select_samples(samples: list, first: int | None, ids: str | None) -> list:
    """The first ``first`` samples (all: None), then only those whose ``sample_id`` is in the comma-separated
    ``ids`` (all: None), in suite order; ``ValueError`` naming any id that is not among them."""
    samples = samples[:first]
    if ids is None:
        return samples
    wanted = {i.strip() for i in ids.split(",") if i.strip()}
    known = [s.sample_id for s in samples]
    unknown = sorted(wanted.difference(known))
    if unknown or not wanted:
        shown = ", ".join(known[:3]) + (", ..." if len(known) > 3 else "")
        problem = f"{', '.join(unknown)} not among" if unknown else "no id given; pick from"
        raise ValueError(
            f"--ids: {problem} the {len(known)} samples chosen (--samples / --first), whose ids look like {shown}"
        )
    return [s for s in samples if s.sample_id in wanted]


def full_rows_from(source: list[dict], samples: list, modes: list[str], done: set) -> list[dict]:
    """The full-cache rows of ``source`` (an earlier run's rows) for ``samples`` in ``modes`` that ``done`` does
    not hold yet, in ``source``'s order, each (mode, sample id, ratio) once."""
    wanted = {(m, s.sample_id) for m in modes for s in samples}
    taken, out = set(done), []
    for r in source:
        key = written([r])
        if r["setup"] == "full" and (r["mode"], r["sample_id"]) in wanted and key.isdisjoint(taken):
            taken |= key
            out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/quality")
    ap.add_argument("--task", default="passkey")
    ap.add_argument(
        "--path", default=None, help="jsonl samples for --task jsonl (e.g. docs/results/suites/dev-1k.jsonl)"
    )
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--first", type=int, default=None, help="run only the first N samples (ids stay stable)")
    ap.add_argument(
        "--ids", default=None, help="run only these sample ids, comma-separated (from the --samples chosen)"
    )
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument(
        "--ratios", default=None, help="comma-separated, default 2,4,8,16 (--table-only: the ratios in the rows)"
    )
    ap.add_argument("--protected", type=int, default=16)
    ap.add_argument(
        "--protected-fraction",
        type=float,
        default=None,
        help="budget.protected_fraction: recent window = min(--protected, fraction x per-head budget)",
    )
    ap.add_argument("--modes", default="query_aware,query_agnostic")
    ap.add_argument(
        "--setups",
        default=",".join(s[0] for s in SETUPS),
        help="comma-separated setups (see above); the full cache always runs, and '' runs only it",
    )
    ap.add_argument("--max-seqs", type=int, default=8, help="sequences the engine runs at once (forks included)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for the 135M model)")
    ap.add_argument("--head-bias", help="head-bias .npz for lfu-bias+global (scripts/calibrate_head_bias.py)")
    ap.add_argument(
        "--full-from",
        metavar="DIR",
        help="copy the full cache's rows of the chosen samples from DIR/rows.jsonl instead of running it (see above)",
    )
    ap.add_argument(
        "--fidelity",
        action="store_true",
        help="also teacher-force the full cache's answers through every setup, into OUT/fidelity.jsonl (see above)",
    )
    ap.add_argument(
        "--adopt-rows",
        action="store_true",
        help=f"rows in OUT written before OUT/{SETUPS_FILE} was kept ran what their labels resolve to now: record "
        "that and resume them (without it they are refused; see kvcompress.experiment.setup_record)",
    )
    ap.add_argument(
        "--table-only",
        action="store_true",
        help="rewrite OUT/table.md from OUT/rows.jsonl and exit (runs nothing)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows_path, fidelity_path = out / "rows.jsonl", out / FIDELITY_FILE
    try:
        ratios = [float(r) for r in (args.ratios or "2,4,8,16").split(",")]
    except ValueError:
        ap.error(f"--ratios takes comma-separated numbers, got {args.ratios!r}")
    source = Path(args.full_from) / "rows.jsonl" if args.full_from and not args.table_only else None
    if source is not None and not source.is_file():
        ap.error(f"--full-from: no {source} (give the results directory of an earlier run, e.g. the draw's own)")
    try:
        rows = read_rows(rows_path) if rows_path.exists() else []
        source_rows = read_rows(source) if source is not None else []
    except ValueError as err:
        ap.error(str(err))
    if args.table_only:
        if not rows:
            ap.error(f"--table-only: no rows in {rows_path} to build the table from")
        if args.ratios is None:
            ratios = sorted({float(r["ratio"]) for r in rows} - {1.0})
        write_table(rows_path, out / "table.md", ratios, fidelity_path)
        return
    done = written(rows)
    try:  # bad setups fail before the model loads
        wanted = [resolve_setup(name) for name in split_setups(args.setups)]
        for setup in wanted:
            if "head_bias" in setup[3] and not args.head_bias:
                raise ValueError(f"setup {setup[0]!r} needs --head-bias FILE.npz (scripts/calibrate_head_bias.py)")
            check_setup(*setup)
        if args.head_bias:
            HeadBias.load(args.head_bias)
            with_bias = {"head_bias": args.head_bias}
            wanted = [(*w[:3], {**w[3], **with_bias} if "head_bias" in w[3] else w[3], *w[4:]) for w in wanted]
    except (ValueError, FileNotFoundError) as err:
        ap.error(str(err))
    try:  # rows under a label that now resolves to another config are not resumed as its own
        with_rows = {r["setup"] for r in [*rows, *read_fidelity(fidelity_path)]}
        now = setup_records(wanted, args.protected, args.protected_fraction)
        records = check_resume(out, read_records(out), now, with_rows, args.adopt_rows)
    except ValueError as err:
        ap.error(str(err))
    wanted.append(("full", "full", "uniform", {}, {}, {}))
    if args.task == "jsonl" and not args.path:
        ap.error("--task jsonl needs --path FILE.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    write_records(out, records)
    lm = load_model("smollm2")
    try:  # an offsets file measured for another model fails before any sample runs
        for file in {w[5]["summary_offset"] for w in wanted if w[5].get("summary_offset")}:
            Budget(summary_slots=1, summary_offset=file).offsets(*model_kv_geometry(lm.model)[:2])
    except ValueError as err:
        ap.error(str(err))
    if args.task == "jsonl":
        samples = spread(build_task("jsonl", path=args.path, tokenizer=lm.tokenizer).samples(), args.samples)
    else:
        task = build_task(args.task, tokenizer=lm.tokenizer, n_samples=args.samples, target_tokens=args.tokens)
        samples = task.samples()
    try:
        samples = select_samples(samples, args.first, args.ids)
        copied = full_rows_from(source_rows, samples, args.modes.split(","), done)
    except ValueError as err:
        ap.error(str(err))
    if copied:
        with rows_path.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in copied)
        done |= written(copied)
        print(f"{len(copied)} full-cache rows copied from {args.full_from}", flush=True)
    t0 = time.perf_counter()

    def run(path: Path, done: set, answers: dict[tuple[str, str], list[int]] | None) -> None:
        """Every (mode, setup) of ``wanted`` at every ratio, on the samples whose (setup, mode, sample id, ratio)
        is not ``done``, appending rows to ``path`` as each sample completes (a rerun with more ratios runs only
        those); with ``answers`` ((mode, sample id) -> the full cache's answer tokens), the fidelity pass."""
        for mode in args.modes.split(","):
            for label, pol, alloc, overrides, allocator_args, budget_args in wanted:
                for rs, pending in missing_ratios(samples, label, mode, ratios, done, answers).items():
                    forced = None if answers is None else {s.sample_id: answers[mode, s.sample_id] for s in pending}
                    results = run_setup(
                        lm.model,
                        lm.tokenizer,
                        pending,
                        pol,
                        alloc,
                        list(rs),
                        args.protected,
                        mode,
                        overrides,
                        args.max_seqs,
                        allocator_args,
                        args.protected_fraction,
                        budget_args,
                        forced,
                    )
                    with path.open("a") as f:
                        for sample_id, rows in results:
                            for row in rows:
                                f.write(
                                    json.dumps({"setup": label, "mode": mode, "sample_id": sample_id, **row}) + "\n"
                                )
                            f.flush()
                            os.fsync(f.fileno())
                            kind = "fidelity" if forced else "score"
                            print(
                                f"{mode} {sample_id} {label} {kind} done at {time.perf_counter() - t0:.0f}s", flush=True
                            )

    run(rows_path, done, None)
    if args.fidelity:
        full = [r for r in read_rows(rows_path) if r["setup"] == "full"]
        answers = {(r["mode"], r["sample_id"]): answer_ids(r, lm.tokenizer) for r in full}
        forced_done = written(read_fidelity(fidelity_path))
        run(fidelity_path, forced_done, answers)
    write_table(rows_path, out / "table.md", ratios, fidelity_path)


def _read_jsonl(path: Path, required: set[str], kind: str) -> list[dict]:
    """The rows of ``path``, each a JSON object holding the ``required`` keys; ``ValueError`` naming the first line
    that is not one (a blank line, broken JSON, another script's rows) as not a ``kind`` row."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
        missing = required - set(row) if isinstance(row, dict) else {"all"}
        if missing:
            raise ValueError(f"{path}:{n}: not a {kind} row (missing {', '.join(sorted(missing))})")
        rows.append(row)
    return rows


def read_rows(rows_path: Path) -> list[dict]:
    """The rows of a quality_table ``rows.jsonl`` (see :func:`_read_jsonl`)."""
    return _read_jsonl(rows_path, {"setup", "mode", "sample_id", "ratio", "score"}, "quality_table")


def read_fidelity(path: Path) -> list[dict]:
    """The rows of a ``fidelity.jsonl``, none when it does not exist yet (see :func:`_read_jsonl`)."""
    required = {"setup", "mode", "sample_id", "ratio", "nll", "match"}
    return _read_jsonl(path, required, "fidelity") if path.exists() else []


def write_table(rows_path: Path, table_path: Path, ratios: list[float], fidelity_path: Path | None = None) -> None:
    """Markdown table of every setup's mean score per mode and ratio: the score; its % of the full cache's score
    and the % it *retained* (each sample capped at its full-cache score; the rest of the % of full was gained on
    samples the full cache misses), both over the samples the full cache scored too; and the mean logical /
    physical compression. With fidelity rows, each mode gets their table too (:func:`fidelity_lines`)."""
    rows = read_rows(rows_path)
    forced = read_fidelity(fidelity_path) if fidelity_path is not None else []
    agg: dict[tuple, list] = defaultdict(list)
    for r in rows:
        agg[(r["mode"], r["setup"], r["ratio"])].append(r)
    lines = []
    for mode in sorted({r["mode"] for r in rows}):
        full = {r["sample_id"]: r["score"] for r in agg.get((mode, "full", 1.0), [])}  # none yet: no % of full
        full_score = sum(full.values()) / max(len(full), 1)
        lines.append(f"\n### {mode} (full cache: {full_score:.1f}, n={len(full)})\n")
        setups = sorted({r["setup"] for r in rows if r["mode"] == mode} - {"full"})
        if not setups:
            lines.append("The full cache only: no compressed setup has run.")
            continue
        lines += [
            "| policy | " + " | ".join(f"{r:g}x score (% full, retained) [logical/physical]" for r in ratios) + " |",
            "|---|" + "---|" * len(ratios),
        ]
        for setup in setups:
            cells = []
            for ratio in ratios:
                rs = agg.get((mode, setup, ratio), [])
                if not rs:
                    cells.append("-")
                    continue
                s = sum(r["score"] for r in rs) / len(rs)
                lg = sum(r["logical"] for r in rs) / len(rs)
                ph = sum(r["physical"] for r in rs) / len(rs)
                both = {r["sample_id"]: r["score"] for r in rs if r["sample_id"] in full}
                of_full = sum(full[i] for i in both)
                if of_full:
                    pct = f"{100 * sum(both.values()) / of_full:.0f}%, retained {retained_percent(both, full):.0f}%"
                else:
                    pct = "n/a"
                cells.append(f"{s:.0f} ({pct}) [{lg:.1f}/{ph:.1f}]")
            lines.append(f"| {setup} | " + " | ".join(cells) + " |")
        lines += fidelity_lines(forced, mode, ratios)
    table_path.write_text("\n".join(lines) + "\n")
    print(table_path.read_text())


if __name__ == "__main__":
    main()
