"""scripts/compare_kvpress.py (pure parts: press names, ratios, resume, table; no kvpress needed) and
scripts/make_suites.py (with a word-level stand-in tokenizer: sizes, families, shared contexts, determinism)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from kvcompress.tasks.jsonl import JsonlTask

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def compare(script_module):
    return script_module("compare_kvpress")


@pytest.fixture(scope="module")
def suites(script_module):
    return script_module("make_suites")


class WordTokenizer:
    """Words and single whitespace characters as tokens (stable ids from a growing vocabulary)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [self.vocab.setdefault(t, len(self.vocab)) for t in re.findall(r"\S+|\s", text)]}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self(text)["input_ids"]


def test_press_names(compare):
    assert compare.press_for("tova") == "TOVAPress"
    assert compare.press_for("h2o") == "ObservedAttentionPress"
    assert compare.press_for("streaming") == "StreamingLLMPress"
    assert compare.press_for("expected_attention") == "ExpectedAttentionPress"
    assert compare.press_for("full") == ""
    assert set(compare.PRESSES) == {
        "full",
        "tova",
        "snapkv",
        "keydiff",
        "knorm",
        "streaming",
        "expected_attention",
        "h2o",
        "kvzip",
    }
    with pytest.raises(ValueError, match="no kvpress press"):
        compare.press_for("lfu")


def test_press_classes_exist_when_kvpress_installed(compare):
    kvpress = pytest.importorskip("kvpress")
    for name in filter(None, compare.PRESSES.values()):
        assert hasattr(kvpress, name), name


def test_compression_ratio(compare):
    assert compare.compression_ratio(1) == 0.0
    assert compare.compression_ratio(4) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        compare.compression_ratio(0.5)


def test_cells_put_each_mode_baseline_first(compare):
    cells = compare.cells(["tova", "full", "snapkv"], [2.0, 4.0], ["query_aware", "query_agnostic"])
    assert cells[0] == ("query_aware", "full", 1.0)
    assert cells[5] == ("query_agnostic", "full", 1.0)
    assert len(cells) == 2 * (1 + 2 * 2)


def test_resume_skips_rows_present(compare, tmp_path):
    rows_path = tmp_path / "rows.jsonl"
    done = compare.make_row("ours", "query_aware", "tova", 4.0, [{"score": 100.0}], 0.25)
    rows_path.write_text(json.dumps(done) + "\n" + '{"key": "torn', encoding="utf-8")  # torn last line
    rows = compare.read_rows(rows_path)
    assert [r["key"] for r in rows] == [done["key"]]
    todo = [("ours", "query_aware", "tova", 4.0), ("kvpress", "query_aware", "tova", 4.0)]
    assert compare.pending(todo, rows) == [("kvpress", "query_aware", "tova", 4.0)]


def test_kvpress_cell_cut_short_resumes_with_the_samples_it_lacks(compare, tmp_path, monkeypatch):
    """The worker appends a line per sample; a cell stopped mid-write (s1's line torn) reruns s1 and s2 only, and its
    row counts each sample once (before, a rerun appended the whole cell again and scored s0 twice)."""
    import argparse

    suite = tmp_path / "suite.jsonl"
    suite.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "context": "C", "question": "Q", "answers": [f"a{i}"]}) + "\n" for i in range(3)
        ),
        encoding="utf-8",
    )
    asked: list[list[str]] = []

    def worker(args, inp, out, policy, cr, *extra):  # what scripts/kvpress_worker.py appends, one line a sample
        ids = [json.loads(line)["id"] for line in inp.read_text(encoding="utf-8").splitlines()]
        asked.append(ids)
        with out.open("a", encoding="utf-8") as handle:
            for i in ids:
                line = json.dumps({"id": i, "prediction": f"a{i[1:]}", "context_tokens": 8, "question_tokens": 2})
                if i == "s1" and len(asked) == 1:
                    handle.write(line[:12])  # stopped mid-write
                    raise KeyboardInterrupt
                handle.write(line + "\n")

    monkeypatch.setattr(compare, "_worker", worker)
    args = argparse.Namespace(out=tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        compare.run_kvpress(args, suite, "query_agnostic", "kvzip", 4.0)
    row = compare.run_kvpress(args, suite, "query_agnostic", "kvzip", 4.0)
    assert asked == [["s0", "s1", "s2"], ["s1", "s2"]]
    assert [p["id"] for p in row["predictions"]] == ["s0", "s1", "s2"]
    assert row["n_samples"] == 3 and row["score"] == 100.0
    assert compare.run_kvpress(args, suite, "query_agnostic", "kvzip", 4.0)["n_samples"] == 3
    assert asked[2:] == []  # a finished cell runs nothing again


def test_kvpress_worker_appends_so_a_resumed_cell_keeps_its_finished_samples(script_module, tmp_path, monkeypatch):
    """The worker itself (kvpress, the model and its pipeline stood in) appends to ``--out``: a second call with the
    samples a cut-short cell lacks keeps the first call's lines (it used to reopen the file with "w" and drop them)."""
    import types

    import torch

    monkeypatch.setitem(sys.modules, "kvpress", types.SimpleNamespace())
    worker = script_module("kvpress_worker")

    class Pipe:
        def __call__(self, context, questions, press, max_new_tokens):
            return {"answers": [f" answer to {q}" for q in questions]}

        def preprocess(self, context, questions, answer_prefix, max_context_length):
            return {"context_ids": torch.zeros(1, 7), "questions_ids": [torch.zeros(1, 2) for _ in questions]}

    model = types.SimpleNamespace(device="cpu", to=lambda device: model)
    monkeypatch.setattr(worker.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(worker.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr(worker, "pipeline", lambda *a, **k: Pipe())
    out = tmp_path / "preds.jsonl"
    for ids in (["s0"], ["s1", "s2"]):
        inp = tmp_path / "in.jsonl"
        inp.write_text(
            "".join(json.dumps({"id": i, "context": "C", "question": i, "max_new_tokens": 4}) + "\n" for i in ids),
            encoding="utf-8",
        )
        argv = ["kvpress_worker", "--model", "M", "--input", str(inp), "--out", str(out), "--threads", "0"]
        monkeypatch.setattr(sys, "argv", argv)
        worker.main()
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(line["id"], line["prediction"]) for line in lines] == [
        ("s0", "answer to s0"),
        ("s1", "answer to s1"),
        ("s2", "answer to s2"),
    ]
    assert lines[0]["context_tokens"] == 7 and lines[0]["question_tokens"] == 2


def test_table(compare):
    preds = lambda *scores: [{"id": f"s{i}", "score": s} for i, s in enumerate(scores)]
    rows = [
        compare.make_row("ours", "query_aware", "tova", 4.0, preds(50.0, 100.0), 0.25),
        compare.make_row("ours", "query_aware", "full", 1.0, preds(100.0, 0.0), 1.0),
        compare.make_row("kvpress", "query_aware", "full", 1.0, preds(100.0, 100.0), 1.0),
        compare.make_row("kvpress", "query_aware", "tova", 4.0, preds(100.0, 50.0), 0.254),
    ]
    lines = compare.render_table(rows).splitlines()
    assert lines[0].startswith("| mode | policy | ratio | ours score")
    assert lines[2] == (
        "| query_aware | full | 1 | 50.0 | 100 | 100 | 1.000 | 100.0 | 100 | 100 | 1.000 | 2 | 0 / 1 | 1.00 |"
    )
    # ours: 150% of its full score, of which it retained 50% (s1 is a gain on a sample its full cache misses)
    assert lines[3] == (
        "| query_aware | tova | 4 | 75.0 | 150 | 50 | 0.250 | 75.0 | 75 | 75 | 0.254 | 2 | 1 / 1 | 1.00 |"
    )
    # a side not run yet shows dashes
    partial = compare.render_table(rows[:1]).splitlines()[2]
    assert partial == "| query_aware | tova | 4 | 75.0 | - | - | 0.250 | - | - | - | - | 2 | - | - |"


def test_paired_counts_samples_by_id_and_gives_the_sign_test(compare):
    """Samples match by id, whatever their order; ties are left out of the sign test."""
    preds = lambda scores: [{"id": f"s{i}", "score": s} for i, s in enumerate(scores)]
    ours = compare.make_row("ours", "query_aware", "kvzip", 8.0, preds([100.0] * 8 + [0.0, 50.0]), 0.13)
    theirs = compare.make_row("kvpress", "query_aware", "kvzip", 8.0, preds([0.0] * 8 + [0.0, 100.0])[::-1], 0.13)
    ahead, behind, p = compare.paired(ours, theirs)
    assert (ahead, behind) == (8, 1) and p == pytest.approx(20 / 512)  # 2 * P(X <= 1), X ~ Bin(9, 1/2)
    assert compare.paired(ours, ours)[:2] == (0, 0) and compare.paired(ours, ours)[2] == 1.0
    assert compare.paired(ours, None) is None
    row = compare.render_table([ours, theirs]).splitlines()[2]
    assert row.endswith("| 10 | 8 / 1 | 0.04 |")


def test_sides_run_apart_into_one_table(compare, tmp_path, monkeypatch):
    """One process per side (``--sides``) shares rows.jsonl: each runs only its side's cells, and the table written
    last holds both sides."""
    suite = tmp_path / "suite.jsonl"
    suite.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "context": "C", "question": "Q", "answers": ["x"]}) + "\n" for i in range(3)
        ),
        encoding="utf-8",
    )
    ran: list[tuple[str, str, float]] = []

    def fake(side):
        def run(args, subset, mode, policy, ratio):
            ran.append((side, policy, ratio))
            return compare.make_row(side, mode, policy, ratio, [{"id": "s0", "score": 100.0 / ratio}], 1 / ratio)

        return run

    monkeypatch.setattr(compare, "run_ours", fake("ours"))
    monkeypatch.setattr(compare, "run_kvpress", fake("kvpress"))
    base = ["--suite", str(suite), "--policies", "kvzip", "--ratios", "4", "--out", str(tmp_path / "out")]
    compare.main([*base, "--sides", "ours"])
    assert ran == [("ours", "full", 1.0), ("ours", "kvzip", 4.0)]
    compare.main([*base, "--sides", "kvpress"])
    compare.main(base)  # both sides done: nothing runs again
    assert ran[2:] == [("kvpress", "full", 1.0), ("kvpress", "kvzip", 4.0)]
    table = (tmp_path / "out" / "table.md").read_text(encoding="utf-8").splitlines()
    assert table[3] == (
        "| query_aware | kvzip | 4 | 25.0 | 25 | 25 | 0.250 | 25.0 | 25 | 25 | 0.250 | 1 | 0 / 0 | 1.00 |"
    )
    with pytest.raises(SystemExit):
        compare.parse_args([*base, "--sides", "ours,vllm"])


def test_a_finished_cell_of_ours_is_not_resumed_under_another_ours_override(compare, tmp_path, monkeypatch):
    """Rows key on (side, mode, policy, ratio) only: a rerun with another ``--ours-override`` would skip a cell that
    ran another config, so the cell's ``.hydra/overrides.yaml`` is read back and such a rerun stops. The full cache's
    cell ignores policy and budget overrides (it evicts nothing)."""
    suite = tmp_path / "suite.jsonl"
    suite.write_text(json.dumps({"id": "s0", "context": "C", "question": "Q", "answers": ["x"]}) + "\n")
    out = tmp_path / "out"
    base = ["--suite", str(suite), "--policies", "kvzip", "--ratios", "4", "--sides", "ours", "--out", str(out)]
    ran: list[str] = []

    def fake(args, subset, mode, policy, ratio):  # what experiments/run.py leaves: the cell's Hydra overrides
        hydra = compare.ours_dir(args.out, mode, policy, ratio) / ".hydra"
        hydra.mkdir(parents=True)
        overrides = [*compare.cell_overrides(args, subset, mode, policy, ratio), *args.ours_override]
        (hydra / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        ran.append(policy)
        return compare.make_row("ours", mode, policy, ratio, [{"id": "s0", "score": 0.0}], 1 / ratio)

    monkeypatch.setattr(compare, "run_ours", fake)
    compare.main([*base, "--ours-override", "budget.allocation=global"])
    compare.main([*base, "--ours-override", "budget.allocation=global"])  # the same config: nothing runs again
    assert ran == ["full", "kvzip"]
    with pytest.raises(SystemExit, match=r"kvzip-x4 ran our side with --ours-override \['budget.allocation=global'\]"):
        compare.main([*base, "--ours-override", "policy.window=32"])
    with pytest.raises(SystemExit, match="not none; use another --out"):
        compare.main(base)
    assert compare.bearing(["policy.window=32", "task.n=3"], "full") == ["task.n=3"]


def test_fidelity_forces_the_reference_answers_through_kvpress_and_resumes(compare, tmp_path, monkeypatch):
    """--fidelity --reference QDIR: each kvpress cell gets one fidelity row per sample that QDIR's full cache
    answered (an empty answer is not forced), computed from the worker's forced log-probs as our engine's are; a
    rerun forces only what the worker's output lacks (a torn last line included); a changed reference stops the
    run instead of mixing answers; bad arguments get one-line errors."""
    from kvcompress.experiment.fidelity import fidelity_fields

    suite = tmp_path / "suite.jsonl"
    suite.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "context": "C", "question": "Q", "answers": ["x"]}) + "\n" for i in range(3)
        ),
        encoding="utf-8",
    )
    qdir = tmp_path / "q"
    qdir.mkdir()

    def reference(answers: dict[str, str]) -> None:
        full = {"setup": "full", "mode": "query_aware", "ratio": 1.0, "score": 0.0}
        rows = [{**full, "sample_id": i, "prediction": text} for i, text in answers.items()]
        (qdir / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def run_kvpress(args, subset, mode, policy, ratio):
        return compare.make_row("kvpress", mode, policy, ratio, [{"id": "s0", "score": 0.0}], 1 / ratio)

    forced: list[tuple[str, list[str]]] = []

    def worker(args, inp, out, policy, cr, *extra):  # what scripts/kvpress_worker.py --force appends
        assert extra == ("--force",)
        lines = [json.loads(line) for line in inp.read_text(encoding="utf-8").splitlines()]
        forced.append((policy, [line["id"] for line in lines]))
        with out.open("a", encoding="utf-8") as handle:
            for line in lines:
                ids = line["forced_ids"]
                row = {
                    "id": line["id"],
                    "forced_ids": ids,
                    "logprobs": [-cr - 0.1] * len(ids),
                    "greedy": [*ids[:-1], -1],
                }
                handle.write(json.dumps({**row, "context_tokens": 5, "question_tokens": 2}) + "\n")

    tokenizer = WordTokenizer()
    monkeypatch.setattr(compare, "run_kvpress", run_kvpress)
    monkeypatch.setattr(compare, "_worker", worker)
    monkeypatch.setattr(compare, "load_tokenizer", lambda model: tokenizer)
    out = tmp_path / "out"
    base = ["--suite", str(suite), "--policies", "kvzip", "--ratios", "4", "--out", str(out), "--sides", "kvpress"]
    reference({"s0": "the code 123", "s1": "", "s2": "no idea", "elsewhere": "x"})
    compare.main([*base, "--fidelity", "--reference", str(qdir)])
    assert forced == [("full", ["s0", "s2"]), ("kvzip", ["s0", "s2"])]  # s1's answer is empty: nothing to force
    rows = [json.loads(line) for line in (out / "fidelity.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["setup"], r["ratio"], r["sample_id"]) for r in rows] == [
        ("kvpress/full", 1.0, "s0"),
        ("kvpress/full", 1.0, "s2"),
        ("kvpress/kvzip", 4.0, "s0"),
        ("kvpress/kvzip", 4.0, "s2"),
    ]
    ids = tokenizer.encode("the code 123")
    expected = fidelity_fields(ids, [-0.85] * len(ids), [*ids[:-1], -1])
    assert {k: rows[2][k] for k in expected} == expected
    assert rows[2]["match"] < 1 and rows[2]["prompt_tokens"] == 7
    assert "kvpress/kvzip" in (out / "table.md").read_text(encoding="utf-8")
    assert not list(out.rglob("fidelity-input.jsonl"))  # the worker's input is not left beside the results

    # a cell cut short mid-line: s2's line torn, fidelity.jsonl never got it; a rerun forces s2 alone
    cell = out / "kvpress" / "query_aware" / "fidelity-kvzip-x4.jsonl"
    first, second = cell.read_text(encoding="utf-8").splitlines()
    cell.write_text(first + "\n" + second[:10], encoding="utf-8")
    (out / "fidelity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]), encoding="utf-8")
    compare.main([*base, "--fidelity", "--reference", str(qdir)])
    assert forced[2:] == [("kvzip", ["s2"])]
    assert len((out / "fidelity.jsonl").read_text(encoding="utf-8").splitlines()) == 4
    assert len(cell.read_text(encoding="utf-8").splitlines()) == 2

    reference({"s0": "another answer", "s2": "no idea"})  # the reference changed under a finished directory
    with pytest.raises(SystemExit, match="forced other answers for s0 than --reference holds now"):
        compare.main([*base, "--fidelity", "--reference", str(qdir)])
    reference({"other": "yes"})
    with pytest.raises(SystemExit, match="no full-cache answer .* for any of this run's samples"):
        compare.main([*base, "--out", str(tmp_path / "out2"), "--fidelity", "--reference", str(qdir)])
    with pytest.raises(SystemExit, match="no rows.jsonl there"):
        compare.main([*base, "--out", str(tmp_path / "out3"), "--fidelity", "--reference", str(tmp_path)])
    for bad in (
        ["--reference", str(qdir)],
        ["--fidelity"],
        ["--fidelity", "--reference", str(qdir), "--sides", "ours"],
    ):
        with pytest.raises(SystemExit):
            compare.parse_args([*base, *bad])


@pytest.mark.slow
def test_kvpress_forced_full_cache_gives_our_engines_log_probs(compare, tmp_path):
    """The real worker, where the kvpress virtualenv is installed (scripts/make_kvpress_venv.sh; CI has none):
    kvpress's full cache, forced with the answers quality_table forced through ours, gives the same log-prob per
    token as our engine did (recorded in the committed dev-1k fidelity run), and the same greedy tokens."""
    if not (compare.DEFAULT_KVPRESS_PYTHON.is_file() and compare.DEFAULT_MODEL.is_dir()):
        pytest.skip("no kvpress virtualenv or converted model (scripts/make_kvpress_venv.sh)")
    results = SCRIPTS.parent / "docs" / "results"
    reference = results / "dev-1k-agnostic-fidelity-n40"
    out = tmp_path / "out"
    compare.main(
        ["--suite", str(results / "suites" / "dev-1k.jsonl"), "--policies", "full", "--modes", "query_agnostic"]
        + ["--sides", "kvpress", "--samples", "2", "--out", str(out), "--fidelity", "--reference", str(reference)]
    )
    theirs = [json.loads(line) for line in (out / "fidelity.jsonl").read_text(encoding="utf-8").splitlines()]
    ours = {}
    for line in (reference / "fidelity.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["setup"] == "full":
            ours[row["sample_id"]] = row
    assert len(theirs) == 2
    for row in theirs:
        mine = ours[row["sample_id"]]
        assert row["tokens"] == mine["tokens"] and row["match"] == mine["match"] == 1.0
        assert row["logprobs"] == pytest.approx(mine["logprobs"], abs=3e-4)


def test_kvpress_inputs_fold_question_in_query_aware(compare):
    recs = [{"id": "a", "context": "C\n", "question": "\nQ?", "answers": ["x"], "max_new_tokens": 8}]
    aware = compare.kvpress_inputs(recs, "query_aware")[0]
    agnostic = compare.kvpress_inputs(recs, "query_agnostic")[0]
    assert (aware["context"], aware["question"]) == ("C\n\nQ?", "")
    assert (agnostic["context"], agnostic["question"], agnostic["max_new_tokens"]) == ("C\n", "\nQ?", 8)


def test_select_samples_spreads(compare):
    recs = [{"id": i} for i in range(40)]
    assert [r["id"] for r in compare.select_samples(recs, 5)] == [0, 8, 16, 24, 32]
    assert compare.select_samples(recs, None) == recs


def test_suites(suites, tmp_path):
    tok = WordTokenizer()
    dev = suites.suite_records("dev", tok, 300)
    assert dev == suites.suite_records("dev", tok, 300)  # deterministic
    held, tune = suites.suite_records("heldout", tok, 300), suites.suite_records("tune", tok, 300)
    assert len(dev) == len(held) == len(tune) == 40
    for records in (dev, held, tune):
        assert [r["task"] for r in records] == [f for f in suites.FAMILIES for _ in range(8)]
        for r in records:
            assert all(a in r["context"] for a in r["answers"])
            assert len(tok("".join((r["context"], r["question"])))["input_ids"]) <= 300
        # multikey and person ask two questions of each context
        assert len({r["context"] for r in records}) == 32
    for a, b in ((dev, held), (tune, held), (tune, dev)):  # tune, the 4k tuning suite, shares no wording
        assert not {r["context"] for r in a} & {r["context"] for r in b}
        assert not {r["question"] for r in a} & {r["question"] for r in b}
    assert not set(suites.TUNE.names) & set(suites.HELDOUT.names)
    assert not set(suites.TUNE.cities) & set(suites.HELDOUT.cities)
    draws = [held]
    # heldout's wording and haystack, drawn anew
    for name in ("heldout2", "heldout3", "heldout4", "heldout5", "heldout6", "heldout7", "heldout8", "heldout9"):
        again = suites.suite_records(name, tok, 300)
        assert [r["id"].replace(f"{name}-", "heldout-") for r in again] == [r["id"] for r in held]
        assert {r["question"].split()[0] for r in again} == {r["question"].split()[0] for r in held}
        for earlier in draws:
            assert not {r["context"] for r in again} & {r["context"] for r in earlier}
            # a person's city comes from a pool of about ten, so two draws share some by chance (heldout7 and
            # heldout6 share four); passkeys, references, words and numbers are drawn fresh
            drawn = [(a, h) for a, h in zip(again, earlier, strict=True) if "-person-" not in a["id"]]
            assert sum(a["answers"] == h["answers"] for a, h in drawn) <= 2
        draws.append(again)
    path = tmp_path / "dev.jsonl"
    suites.write_jsonl(path, dev)
    samples = JsonlTask(path).samples()
    assert len({s.context_id for s in samples}) == 32
    assert samples[0].sample_id == "dev-300-passkey-00"


@pytest.mark.parametrize("suite", ["varied", "devprose"])
def test_suite_asks_its_sources_questions_in_another_haystack(suites, suite, capsys):
    """varied and devprose ask heldout's / dev's questions about the same needles at the same depths
    (``NEEDLES_OF``); only the haystack differs."""
    tok, source = WordTokenizer(), suites.NEEDLES_OF[suite]
    src, new = suites.suite_records(source, tok, 600), suites.suite_records(suite, tok, 600)
    assert [r["id"].replace(f"{source}-", f"{suite}-") for r in src] == [r["id"] for r in new]
    for s, n in zip(src, new, strict=True):
        assert (s["question"], s["answers"]) == (n["question"], n["answers"])
        assert s["context"] != n["context"] and all(a in n["context"] for a in n["answers"])
        assert "The grass is green." not in n["context"]  # RULER's noise: dev's haystack only
    with pytest.raises(
        ValueError,
        match="unknown suite 'essays'; accepted: dev, heldout, varied, devprose, tune, heldout2, heldout3, heldout4, "
        "heldout5, heldout6, heldout7, heldout8, heldout9",
    ):
        suites.suite_records("essays", WordTokenizer(), 600)
    with pytest.raises(SystemExit):  # the command line says so in one line, before loading a tokenizer
        suites.main(["--suites", "heldout,essays"])
    assert "--suites: unknown suite 'essays'" in capsys.readouterr().err


def test_haystacks_varied_never_repeats_heldout_and_devprose_cycle_their_own(suites):
    """varied's haystack has no sentence twice; heldout's and devprose's cycle 12 sentences each, none shared."""
    haystack = suites.varied_filler(500)
    assert len(set(haystack)) == 500 and suites.varied_filler(20) == haystack[:20]
    held, prose = suites.heldout_filler(500), suites.devprose_filler(500)
    assert len(set(held)) == len(set(prose)) == 12 and prose[:12] == prose[12:24]
    assert not set(held) & set(prose)
