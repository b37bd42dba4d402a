"""Where a setup spends the budget on one sample, and what it keeps of the answer.

The sample runs through the Engine exactly as in ``scripts/quality_table.py`` (KVzip's reconstruction, the
question before compression when query-aware and after it when query-agnostic). Just before the one compression
the per-(layer, kv head) ranks are recorded; after it, what each head kept. Printed per layer: the tokens kept
per kv head (min-max), and for each answer of the sample (its first occurrence in the compressed prompt; add more
text to track with ``--find TEXT``) the fraction of its tokens still cached (mean over kv heads) and their lowest
percentile among that layer's ranks (0: ranked below everything else in the head, 100: above; min over kv heads
and the answer's tokens). Then the prediction and its score.

    python scripts/inspect_allocation.py --setups lfu+global,lfu+uniform --ratio 2 --sample 0
    python scripts/inspect_allocation.py --task jsonl --path docs/results/suites/heldout-4k.jsonl \
        --sample-id heldout-4000-person-00 --setups kvzip+global --ratio 8

Setups take the quality table's syntax (``kvzip+global:policy.window=32``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from kvcompress.budget import Budget
from kvcompress.cache.paged import PagedKVCache
from kvcompress.compressor import Compressor
from kvcompress.engine import Engine, peak_tokens
from kvcompress.experiment.policy_config import load_policy
from kvcompress.experiment.prompts import bind_tokenizer, build_prompt
from kvcompress.experiment.setups import resolve_setup, split_setups
from kvcompress.generate import as_request
from kvcompress.model import load_model
from kvcompress.model_runner import paged_attention
from kvcompress.policies.base import finite_ranks
from kvcompress.sequence import Request, RequestOutput
from kvcompress.tasks.base import Sample
from kvcompress.tasks.metrics import score
from kvcompress.tasks.registry import build_task


def answer_positions(tokenizer, ids: list[int], answer: str) -> list[int]:
    """Positions of the first occurrence of ``answer``'s tokens in ``ids``, tokenized as it appears mid-text
    (after a space) or on its own; [] when neither occurs."""
    for text in (" " + answer, answer):
        want = tokenizer(text, add_special_tokens=False).input_ids
        for i in range(len(ids) - len(want) + 1):
            if ids[i : i + len(want)] == want:
                return list(range(i, i + len(want)))
    return []


@dataclass
class RecordingCompressor(Compressor):
    """A :class:`Compressor` that keeps, per layer, the ranks ``[H, L]`` and positions ``[H, L]`` of the first
    sequence it compresses, as the policy ranks them just before eviction (the protected window and sinks not
    lifted: the percentiles compare the policy's own ranks)."""

    before: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def compress(self, cache: PagedKVCache, seq_ids: list[int], budget: Budget | None = None) -> int:
        if not self.before and self.compresses(budget or self.budget):
            seen = torch.as_tensor(cache.seen[seq_ids], device=cache.device)
            for layer in range(cache.num_layers):
                v = cache.view(layer, seq_ids[:1], with_kv=self.policy.needs_kv)
                ranks = finite_ranks(self.policy.rank(v, seen[:1])).masked_fill(~v.valid, torch.nan)
                self.before.append((ranks[0].cpu(), v.positions[0].cpu()))
        return super().compress(cache, seq_ids, budget)


def percentile(ranks: torch.Tensor, positions: torch.Tensor, wanted: list[int]) -> float:
    """Lowest percentile of the ``wanted`` positions among one layer's ``[H, L]`` ranks, over heads and tokens."""
    lowest = 100.0
    for h in range(ranks.shape[0]):
        r = ranks[h][~ranks[h].isnan()]
        hit = torch.isin(positions[h, : r.numel()], torch.tensor(wanted))
        for value in ranks[h, : r.numel()][hit]:
            lowest = min(lowest, 100.0 * float((r < value).float().mean()))
    return lowest


def run_recorded(
    model, comp: RecordingCompressor, request: Request
) -> tuple[RequestOutput, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run ``request`` alone through the Engine; returns its output and, per layer, the positions ``[H, L]`` and
    valid mask ``[H, L]`` of what its cache held when it began to decode (after compression and, query-agnostic,
    the question)."""
    engine = Engine(model, comp, max_seqs=1, max_tokens_per_head=peak_tokens(request, comp))
    engine.add_request(request)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    with paged_attention(model):
        while engine.has_unfinished:
            engine.step()
            running = [s for s in engine.running if s.request is not None and s.decoding]
            if running and not kept:
                for layer in range(engine.cache.num_layers):
                    v = engine.cache.view(layer, [running[0].seq_id], with_kv=False)
                    kept.append((v.positions[0].cpu(), v.valid[0].cpu()))
    return engine.finished[request.request_id], kept


def inspect(
    lm, sample: Sample, setup: str, ratio: float, protected: int, mode: str, find: tuple[str, ...] = ()
) -> None:
    tok = lm.tokenizer
    label, pol, allocation, overrides, allocator_args = resolve_setup(setup)
    policy = load_policy(pol, **overrides)
    bind_tokenizer(policy, tok)
    prompt = build_prompt(tok, sample)
    budget = Budget(ratio=ratio, protected_window=protected, allocation=allocation, allocator_args=allocator_args)
    comp = RecordingCompressor(policy, budget)
    request = as_request(
        0,
        prompt.context_ids,
        prompt.question_ids,
        mode,
        sample.max_new_tokens,
        [tok.eos_token_id],
        suffix=prompt.suffix_ids,
    )
    out, kept = run_recorded(lm.model, comp, request)
    compressed = list(request.prompt_ids)
    answers = {a: answer_positions(tok, compressed, a) for a in [*sample.answers, *find]}
    print(f"\n{label} at {ratio:g}x, {mode}: {len(compressed)} tokens compressed")
    for a, pos in answers.items():
        print(f"  answer {a!r}: " + (f"positions {pos[0]}-{pos[-1]}" if pos else "not in the compressed prompt"))
    found = {a: pos for a, pos in answers.items() if pos}
    print("layer | kept per head (min-max) | " + " | ".join(f"{a!r} kept, lowest pct" for a in found))
    for layer, ((positions, valid), (ranks, before)) in enumerate(zip(kept, comp.before, strict=True)):
        lengths = valid.sum(-1)
        cells = []
        for pos in found.values():
            have = torch.stack([torch.isin(torch.tensor(pos), positions[h][valid[h]]) for h in range(len(lengths))])
            cells.append(f"{float(have.float().mean()):.2f}, {percentile(ranks, before, pos):5.1f}")
        print(f"{layer:5d} | {int(lengths.min()):4d}-{int(lengths.max()):4d} | " + " | ".join(cells))
    pred = tok.decode(out.tokens, skip_special_tokens=True)
    print(f"prediction ({score(sample.metric, pred, sample.answers, sample):.0f}): {pred!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="lfu+global,lfu+uniform", help="quality-table setups, comma separated")
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--mode", default="query_aware", choices=["query_aware", "query_agnostic"])
    ap.add_argument("--task", default="niah_single")
    ap.add_argument("--path", help="the suite file, with --task jsonl")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=10, help="task size (sample ids depend on it)")
    ap.add_argument("--sample", type=int, default=0, help="which sample to inspect (index)")
    ap.add_argument("--sample-id", help="which sample to inspect (id; overrides --sample)")
    ap.add_argument("--find", action="append", default=[], help="more text to track, like an answer (repeatable)")
    ap.add_argument("--protected", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    try:
        setups = split_setups(args.setups)
        for name in setups:
            resolve_setup(name)
    except ValueError as err:
        ap.error(str(err))
    if args.task == "jsonl" and not args.path:
        ap.error("--task jsonl needs --path FILE.jsonl")
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2")
    if args.task == "jsonl":
        samples = build_task("jsonl", path=args.path, tokenizer=lm.tokenizer).samples()
    else:
        samples = build_task(args.task, tokenizer=lm.tokenizer, n_samples=args.samples, target_tokens=args.tokens)
        samples = samples.samples()
    if args.sample_id is not None:
        by_id = {s.sample_id: s for s in samples}
        if args.sample_id not in by_id:
            ap.error(f"--sample-id {args.sample_id!r} is not in the task; it has {', '.join(by_id)}")
        sample = by_id[args.sample_id]
    elif not 0 <= args.sample < len(samples):
        ap.error(f"--sample {args.sample} is out of range: the task has {len(samples)} samples")
    else:
        sample = samples[args.sample]
    for setup in setups:
        inspect(lm, sample, setup, args.ratio, args.protected, args.mode, tuple(args.find))


if __name__ == "__main__":
    main()
