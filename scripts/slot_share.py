"""What share of a question's attention the tokens a setup evicts would have had, and what one summary slot gives.

Query-agnostic, a question is prefilled after compression, so whatever a head evicted is gone for its queries.
A summary slot (``budget.summary_slots=1``) stands in for it with the evicted keys' mean key and a logit bias of
``log(n)``. For each sample this script

1. runs the sample's query-agnostic request through the Engine under the setup (as ``scripts/inspect_allocation.py``
   does) and records which context positions each (layer, kv head) evicted at its one compression;
2. prefills the whole prompt (context, question, the template's tail) with the full cache, and takes the question's
   and the tail's queries (post-RoPE, every query head) and every context key;
3. for each question query ``q`` of query head ``h`` reading kv head ``g``, compares the evicted keys' exact share of
   its attention, ``Σ_evicted exp(s q.k)`` over that plus ``Σ_visible exp(s q.k)`` (the kept context and the
   question up to ``q``; ``s = head_dim^-1/2``), with the share one slot gives, ``n exp(s q.k_mean)`` in place of
   the evicted sum. The log of their ratio is the slot's **gap** for that query (Jensen's: never negative).

Printed per layer, means over the samples, the kv heads and their queries: the exact share, the slot's share, the
mean gap and its standard deviation over a head's queries (how far one constant per head could close it).

``--sketch 4,8`` adds a column per rank r: the gap left by a rank-r **sketch** of the evicted keys
(``budget.summary_sketch``, :mod:`kvcompress.cache.sketch`), the slot's ``log(n) + s q.mu`` plus a term over their
covariance's top r principal directions (``s^2/2 |W q|^2`` for Gaussian tails), which gives each query a share of
its own: its mean, its sd over a head's queries, and the fraction of queries it over-weighs by more than 1 nat (the
error that lost answers under a constant offset). ``--tails uniform`` models each direction as uniform instead.
``--save-gap FILE`` writes the mean gap per (layer, kv head) as JSON (``--gap-layers A-B``: those layers' only, zero
in the others), the offsets ``budget.summary_offset=FILE`` adds to every summary slot's bias. Measure them on samples
you do not evaluate on.

    python scripts/slot_share.py --path docs/results/suites/tune-4k.jsonl --sample-id tune-4000-passkey-00 \\
        --sample-id tune-4000-multikey-00 --setup recommended_query_agnostic --ratio 4 --save-gap gap.json

The evicted set is the setup's own; where it folds into a summary slot, the slot's token (its group's last member)
counts as kept. Queries come from the full cache, not the compressed one: the share a question would give the
evicted tokens had they stayed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from kvcompress.cache.sketch import TAILS, key_sketch, sketch_term
from kvcompress.experiment.prompts import Prompt, bind_tokenizer, build_prompt
from kvcompress.generate import as_request
from kvcompress.model import load_model
from kvcompress.model_runner import ModelRunner, make_cache, model_kv_geometry
from kvcompress.tasks.registry import build_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inspect_allocation import build_compressor, parse_layers, run_recorded  # noqa: E402


class QueryTap:
    """The observer of one full-cache prefill: its attention hands over the forward's observation window (the last
    ``observe_window`` queries) of every layer, kept as ``[H_q, window, D]`` per layer (post-RoPE, float32)."""

    def __init__(self) -> None:
        self.queries: list[torch.Tensor] = []

    def configure_step(self, step, observe_window: int) -> None:
        step.observer, step.obs_window = self, observe_window

    def observe_prefill(self, cache, obs) -> None:
        self.queries.append(obs.queries[0].float().clone())  # a copy, not a view of the forward's query buffer

    def observe_decode(self, cache, obs) -> None:  # a prefill only
        pass


def evicted_positions(lm, prompt: Prompt, setup: str, ratio: float, protected: int) -> list[list[torch.Tensor]]:
    """Per layer and kv head, the context positions ``setup`` evicts from ``prompt`` at ``ratio``, query-agnostic."""
    _, comp = build_compressor(setup, ratio, protected)
    bind_tokenizer(comp.policy, lm.tokenizer)
    request = as_request(0, prompt.context_ids, prompt.question_ids, "query_agnostic", 1, suffix=prompt.suffix_ids)
    run_recorded(lm.model, comp, request)
    if not comp.kept:
        raise ValueError(f"setup {setup!r} at {ratio:g}x did not compress its {len(prompt.context_ids)} context tokens")
    context = torch.arange(len(prompt.context_ids))
    return [
        [context[~torch.isin(context, positions[h][valid[h]])] for h in range(positions.shape[0])]
        for positions, valid in comp.kept
    ]


def full_cache_tensors(model, ids: list[int], tail: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The full cache's prefill of ``ids``: per layer the last ``tail`` positions' queries ``[H_q, tail, D]`` and
    every position's keys ``[H, T, D]`` in position order (both post-RoPE, float32)."""
    tap = QueryTap()
    runner = ModelRunner(model, make_cache(model, 1, len(ids)))
    seq = runner.cache.add_sequence(len(ids))
    with torch.no_grad():
        runner.forward([seq], [ids], tap, tail)
    keys = []
    for layer in range(runner.cache.num_layers):
        view = runner.cache.view(layer, [seq])
        order = view.positions[0].argsort(-1)  # [H, T]
        keys.append(view.keys[0].float().gather(1, order[..., None].expand(-1, -1, view.keys.shape[-1])))
    return tap.queries, keys


def head_shares(q: torch.Tensor, keys: torch.Tensor, evicted: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For queries ``q`` ``[G, M, D]`` (a kv head's query heads; the last M positions of the prompt) over that head's
    keys ``[T, D]`` with ``evicted`` context positions: the exact evicted share, one slot's share, and the gap, each
    ``[G, M]`` (module docstring)."""
    T, D = keys.shape
    M = q.shape[1]
    s = D**-0.5
    logits = s * q @ keys.T  # [G, M, T]
    gone = torch.zeros(T, dtype=torch.bool, device=keys.device)
    gone[evicted.to(keys.device)] = True
    pos = torch.arange(T, device=keys.device)
    causal = pos[None, :] <= pos[T - M :, None]  # [M, T]
    visible = causal & ~gone
    rest = logits.masked_fill(~visible, -math.inf).logsumexp(-1)
    exact = logits[..., gone].logsumexp(-1)
    slot = math.log(int(gone.sum())) + s * q @ keys[gone].mean(0)
    return torch.sigmoid(exact - rest), torch.sigmoid(slot - rest), exact - slot


def sketch_gaps(
    q: torch.Tensor, gone: torch.Tensor, slot_gap: torch.Tensor, ranks: list[int], tails: str = "gaussian"
) -> list[torch.Tensor]:
    """For queries ``q`` ``[G, M, D]`` of one head and the keys it evicted, ``gone`` ``[n, D]``: per rank r in
    ``ranks``, the gap the rank-r sketch leaves, ``[G, M]``. The sketch is the slot (whose gap ``slot_gap``
    :func:`head_shares` gives) plus its ``tails`` term (:mod:`kvcompress.cache.sketch`; ``s^2/2 |W q|^2`` for a
    Gaussian), so its gap is the slot's less that term."""
    s = gone.shape[-1] ** -0.5
    members = torch.ones(gone.shape[0], dtype=torch.bool, device=gone.device)
    w = key_sketch(gone, members, max(ranks, default=0))  # rows by descending eigenvalue: w[:r] is the rank-r sketch
    return [slot_gap - sketch_term(s * q @ w[:r].T, tails) for r in ranks]


def mean_over_samples(
    sums: dict[tuple[int, int], torch.Tensor], layers: int, heads: int, gap_layers: tuple[int, int] | None
) -> tuple[list[tuple[int, torch.Tensor]], list[list[float]]]:
    """From per-(layer, kv head) sums ``[exact share, slot share, gap, gap sd, *three per sketch rank, samples]``
    over the samples: the printed table, ``(layer, [C] means over its heads and samples)`` of the C columns before
    the count, for each layer where some head evicted, and
    the mean gap ``[layers][heads]`` the model's geometry gives the file (0 for a head that never evicted, or for a
    layer outside ``gap_layers``)."""
    table = []
    gap = [[0.0] * heads for _ in range(layers)]
    for layer in range(layers):
        rows = [sums[(layer, h)] for h in range(heads) if (layer, h) in sums]
        if rows:
            table.append((layer, sum(r[:-1] for r in rows) / sum(r[-1] for r in rows)))
        if gap_layers is not None and not gap_layers[0] <= layer <= gap_layers[1]:
            continue
        for h in range(heads):
            if (layer, h) in sums:
                gap[layer][h] = float(sums[(layer, h)][2] / sums[(layer, h)][-1])
    return table, gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", required=True, help="a jsonl suite (scripts/make_suites.py)")
    ap.add_argument("--sample-id", action="append", required=True, help="a sample of the suite (repeatable)")
    ap.add_argument("--setup", default="recommended_query_agnostic", help="a quality-table setup")
    ap.add_argument("--ratio", type=float, default=4.0, help="> 1")
    ap.add_argument("--protected", type=int, default=32)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--save-gap", help="write the mean gap per (layer, kv head) to this JSON file")
    ap.add_argument("--gap-layers", help="with --save-gap: keep layers A-B's gaps only (e.g. 0-6), zero elsewhere")
    ap.add_argument("--sketch", default="", help="ranks of the Gaussian sketch to measure too, e.g. 4,8,16")
    ap.add_argument("--tails", default="gaussian", choices=TAILS, help="the sketch's model of each direction")
    args = ap.parse_args()
    try:
        ranks = [int(r) for r in args.sketch.split(",")] if args.sketch else []
    except ValueError:
        ap.error(f"--sketch takes ranks separated by commas, like 4,8,16, got {args.sketch!r}")
    if any(r < 1 for r in ranks):
        ap.error(f"--sketch ranks must be >= 1, got {args.sketch!r}")
    if args.ratio <= 1:
        ap.error(f"--ratio must be > 1, got {args.ratio:g}")
    if args.gap_layers and not args.save_gap:
        ap.error("--gap-layers chooses the layers --save-gap writes: give --save-gap FILE too")
    try:
        gap_layers = parse_layers(args.gap_layers, flag="--gap-layers") if args.gap_layers else None
        build_compressor(args.setup, args.ratio, args.protected)
    except ValueError as err:
        ap.error(str(err))
    torch.set_num_threads(1)
    lm = load_model(args.model)
    if gap_layers is not None:
        try:
            parse_layers(args.gap_layers, lm.model.config.num_hidden_layers, flag="--gap-layers")
        except ValueError as err:
            ap.error(str(err))
    by_id = {s.sample_id: s for s in build_task("jsonl", path=args.path, tokenizer=lm.tokenizer).samples()}
    unknown = [i for i in args.sample_id if i not in by_id]
    if unknown:
        ap.error(f"--sample-id {', '.join(unknown)} not in {args.path}; it has {', '.join(list(by_id)[:5])}, ...")
    # (layer, kv head) -> [exact, slot, gap, gap sd, *(sketch gap, its sd, over-weighted) per rank, samples]
    sums: dict[tuple[int, int], torch.Tensor] = {}
    for sid in args.sample_id:
        prompt = build_prompt(lm.tokenizer, by_id[sid])
        try:
            evicted = evicted_positions(lm, prompt, args.setup, args.ratio, args.protected)
        except ValueError as err:  # BudgetError among them: a budget the prompt cannot meet
            ap.error(f"{sid}: {err}")
        queries, keys = full_cache_tensors(lm.model, prompt.ids, len(prompt.ids) - len(prompt.context_ids))
        if ranks and max(ranks) > keys[0].shape[-1]:
            ap.error(f"--sketch ranks must be at most the head dim, {keys[0].shape[-1]}, got {args.sketch!r}")
        for layer, (q, k) in enumerate(zip(queries, keys, strict=True)):
            H = k.shape[0]
            group = q.shape[0] // H
            for h in range(H):
                if evicted[layer][h].numel() == 0:
                    continue
                qh = q[h * group : (h + 1) * group]
                exact, slot, gap = head_shares(qh, k[h], evicted[layer][h])
                cells = [exact.mean(), slot.mean(), gap.mean(), gap.std()]
                for g in sketch_gaps(qh, k[h][evicted[layer][h]], gap, ranks, args.tails):
                    cells += [g.mean(), g.std(), (g < -1).float().mean()]
                row = torch.tensor([*cells, 1.0])
                sums[(layer, h)] = sums.get((layer, h), torch.zeros(len(row))) + row
        print(f"{sid}: done", file=sys.stderr)
    table, gap = mean_over_samples(sums, *model_kv_geometry(lm.model)[:2], gap_layers)
    print(f"{args.setup} at {args.ratio:g}x, query-agnostic, {len(args.sample_id)} sample(s): the question's queries")
    sketch_head = "".join(f" | rank-{r} {args.tails} sketch: gap, sd, over by > 1" for r in ranks)
    print("layer | evicted share, exact | one slot's | gap (nats) | gap sd over a head's queries" + sketch_head)
    for layer, m in table:
        sketched = "".join(f" | {m[i]:5.2f} {m[i + 1]:4.2f} {m[i + 2]:4.2f}" for i in range(4, len(m), 3))
        print(f"{layer:5d} | {m[0]:20.3f} | {m[1]:10.3f} | {m[2]:10.2f} | {m[3]:5.2f}" + sketched)
    if args.save_gap:
        out = {
            "setup": args.setup,
            "ratio": args.ratio,
            "model": args.model,
            "samples": args.sample_id,
            "layers": args.gap_layers or "all",
            "gap": gap,
        }
        Path(args.save_gap).write_text(json.dumps(out, indent=1))
        print(f"gap per (layer, kv head) written to {args.save_gap}")


if __name__ == "__main__":
    main()
