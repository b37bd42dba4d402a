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

Two oracles ask what an answer needs, on top of a setup's own choice:
- ``--keep TEXT`` keeps TEXT's tokens (its first occurrence in the prompt, e.g. the whole needle sentence) in every
  kv head of every layer, above the budget's threshold; they count against the budget like any kept token.
- ``--only-layers A-B`` compresses layers A to B only, at about ``--ratio`` among themselves; every other layer
  keeps its whole prompt (the overall budget ratio is set to ``L / (L - n + n / ratio)`` for n compressed layers
  of L; global allocation only). Which layers' eviction loses an answer, then.
- ``--mass MODE`` evicts nothing but stands in for what the setup evicts, to ask whether an answer needs the
  evicted tokens' content or only their share of each head's attention. ``zero``: the evicted tokens keep their
  keys (so their exact attention mass) and get zero values; ``mean``: they keep their keys and get their head's
  mean evicted value. ``--mass-groups G`` averages over G groups of each head's evicted tokens, consecutive in
  position, instead of all of them. Memory is not saved under this oracle; the tables report what the setup would
  have kept. (Summary slots, ``budget.summary_slots`` in a setup, are the real thing: the mean key too, one slot;
  ``budget.summary_sketch=R`` gives that slot each query's share of its own, from a rank-R sketch of the keys.)
The ranks reported are still the policy's own.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from kvcompress.budget import Budget
from kvcompress.cache.paged import HeadView, PagedKVCache
from kvcompress.compressor import Compressor
from kvcompress.engine import Engine, peak_tokens
from kvcompress.experiment.policy_config import load_policy
from kvcompress.experiment.prompts import bind_tokenizer, build_prompt
from kvcompress.experiment.setups import resolve_setup, split_setups
from kvcompress.generate import as_request
from kvcompress.model import load_model
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
    """A :class:`Compressor` that records its first compression of a sequence, per layer: ``before``, the ranks
    ``[H, L]`` the policy gave and their positions ``[H, L]`` (the very ranks eviction used: the protected window
    and sinks not yet lifted, so the percentiles compare the policy's own order), and ``kept``, the positions
    ``[H, L]`` and valid mask ``[H, L]`` each head held right after eviction. ``keep_positions`` and
    ``only_layers`` are the module's oracles; ``before`` records the policy's ranks without them."""

    before: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    keep_positions: list[int] = field(default_factory=list)  # oracle: kept in every head of every layer
    only_layers: tuple[int, int] | None = None  # oracle: layers outside [a, b] keep everything
    mass: str | None = None  # oracle: stand-ins for the evicted tokens' values (zero, mean), see the module doc
    mass_groups: int = 1
    _recording: bool = field(default=False, init=False, repr=False)

    def compress(self, cache: PagedKVCache, seq_ids: list[int], budget: Budget | None = None) -> int:
        # a compression that splits its sequences (some past budget.summary_max_ratio) calls this again: the outer
        # call's recording hooks are in place already
        if self._recording or self.before or not self.compresses(budget or self.budget) or not seq_ids:
            return super().compress(cache, seq_ids, budget)
        rank_layers = self.policy.rank_layers  # wrapped, not called twice: a policy may draw its ranks (random)

        def recording(views: list[HeadView], seen: torch.Tensor) -> list[torch.Tensor]:
            ranks = rank_layers(views, seen)
            for view, r in zip(views, ranks, strict=True):
                self.before.append(
                    (finite_ranks(r)[0].masked_fill(~view.valid[0], torch.nan).cpu(), view.positions[0].cpu())
                )
            return [self.oracle(view, r) for view, r in zip(views, ranks, strict=True)]

        evict = cache.evict

        def standing_in(ids: list[int], keep: torch.Tensor) -> int:
            for layer in range(cache.num_layers):
                v = cache.view(layer, ids, with_kv=True)
                kept = v.valid & keep[layer, :, :, : v.valid.shape[-1]]
                self.kept.append((v.positions[0].cpu(), kept[0].cpu()))
                stand_in(cache, v, v.valid & ~kept, self.mass, self.mass_groups)
            return evict(ids, torch.ones_like(keep))

        self.policy.rank_layers = recording
        if self.mass:
            cache.evict = standing_in
        self._recording = True
        try:
            freed = super().compress(cache, seq_ids, budget)
        finally:
            self._recording = False
            del self.policy.rank_layers
            if self.mass:
                del cache.evict
        for layer in range(cache.num_layers if not self.mass else 0):
            v = cache.view(layer, seq_ids[:1], with_kv=False)
            self.kept.append((v.positions[0].cpu(), v.valid[0].cpu()))
        return freed

    def oracle(self, view: HeadView, ranks: torch.Tensor) -> torch.Tensor:
        """``ranks`` ``[S, H, L]`` of ``view``'s layer with the oracles applied: ``keep_positions`` and, outside
        ``only_layers``, every slot ranked +inf (the compressor's clamp puts them above any policy score)."""
        if self.only_layers and not self.only_layers[0] <= view.layer <= self.only_layers[1]:
            return torch.full_like(ranks, torch.inf)
        if not self.keep_positions:
            return ranks
        forced = torch.isin(view.positions, torch.tensor(self.keep_positions, device=view.positions.device))
        return ranks.masked_fill(forced, torch.inf)


MASS_MODES = ("zero", "mean")


def stand_in(cache: PagedKVCache, view: HeadView, gone: torch.Tensor, mode: str, groups: int) -> None:
    """Overwrite the values of the ``gone`` slots (``[S, H, L]`` of ``view``) in place with ``mode``'s stand-ins
    (module doc): each head's gone slots, in position order, form ``groups`` consecutive groups of near-equal size,
    and a group's mean value (or zero) replaces its members' own."""
    v_flat = cache.v_cache.view(-1, cache.head_dim)
    for s, h in gone.any(-1).nonzero().tolist():
        idx = gone[s, h].nonzero().squeeze(-1)
        idx = idx[view.positions[s, h, idx].argsort()]
        for members in idx.tensor_split(min(groups, len(idx))):
            slots = view.slots[s, h, members]
            if mode == "zero":
                v_flat[slots] = 0
                continue
            v_flat[slots] = view.values[s, h, members].mean(0)


def only_layers_ratio(ratio: float, layers: tuple[int, int], num_layers: int) -> float:
    """The overall budget ratio that holds ``layers`` (inclusive) at about ``ratio`` while every other layer keeps
    its whole prompt."""
    n = layers[1] - layers[0] + 1
    return num_layers / (num_layers - n + n / ratio)


def parse_layers(text: str, num_layers: int | None = None, flag: str = "--only-layers") -> tuple[int, int]:
    """``"A-B"`` -> ``(A, B)``; ``ValueError`` (naming the command-line ``flag``) unless 0 <= A <= B (< ``num_layers``
    when given)."""
    try:
        a, b = (int(x) for x in text.split("-"))
    except ValueError:
        raise ValueError(f"{flag} takes a layer range A-B, like 0-13, got {text!r}") from None
    if not 0 <= a <= b or (num_layers is not None and b >= num_layers):
        top = f" and B < {num_layers}, the model's layer count" if num_layers is not None else ""
        raise ValueError(f"{flag} A-B needs 0 <= A <= B{top}, got {text!r}")
    return a, b


def percentile(ranks: torch.Tensor, positions: torch.Tensor, wanted: list[int]) -> float:
    """The lowest, over kv heads and ``wanted`` positions, of a wanted token's percentile within its own head's
    ranks: ``ranks`` / ``positions`` ``[H, L]`` of one layer, NaN ranks for padded slots (ignored)."""
    lowest = 100.0
    for h in range(ranks.shape[0]):
        real = ~ranks[h].isnan()
        r, p = ranks[h][real], positions[h][real]
        for value in r[torch.isin(p, torch.tensor(wanted))]:
            lowest = min(lowest, 100.0 * float((r < value).float().mean()))
    return lowest


def run_recorded(model, comp: RecordingCompressor, request: Request) -> RequestOutput:
    """Run ``request`` alone through the Engine, the one driver (``comp`` records its compression)."""
    engine = Engine(model, comp, max_seqs=1, max_tokens_per_head=peak_tokens(request, comp))
    return engine.run([request])[0]


def build_compressor(setup: str, ratio: float, protected: int) -> tuple[str, RecordingCompressor]:
    """``(label, compressor)`` of a quality-table setup at ``ratio``; ``ValueError`` names what is wrong (an
    unknown setup, policy field or allocator argument, an allocation the policy does not compose with)."""
    label, pol, allocation, overrides, allocator_args, budget_args = resolve_setup(setup)
    if "head_bias" in overrides:
        raise ValueError(f"setup {label!r} needs a head-bias file, which this script does not take")
    policy = load_policy(pol, **overrides)
    budget = Budget(
        ratio=ratio, protected_window=protected, allocation=allocation, allocator_args=allocator_args, **budget_args
    )
    return label, RecordingCompressor(policy, budget)


def inspect(
    lm,
    sample: Sample,
    setup: str,
    ratio: float,
    protected: int,
    mode: str,
    find: tuple[str, ...] = (),
    keep: tuple[str, ...] = (),
    only_layers: tuple[int, int] | None = None,
    mass: str | None = None,
    mass_groups: int = 1,
) -> None:
    """Run ``sample`` under ``setup`` and print where the budget went; ``keep``, ``only_layers`` and ``mass`` are the
    oracles of the module docstring."""
    tok = lm.tokenizer
    num_layers = lm.model.config.num_hidden_layers
    overall = only_layers_ratio(ratio, only_layers, num_layers) if only_layers else ratio
    label, comp = build_compressor(setup, overall, protected)
    comp.only_layers, comp.mass, comp.mass_groups = only_layers, mass, mass_groups
    bind_tokenizer(comp.policy, tok)
    prompt = build_prompt(tok, sample)
    request = as_request(
        0,
        prompt.context_ids,
        prompt.question_ids,
        mode,
        sample.max_new_tokens,
        [tok.eos_token_id],
        suffix=prompt.suffix_ids,
    )
    compressed = list(request.prompt_ids)
    for text in keep:
        pos = answer_positions(tok, compressed, text)
        if not pos:
            raise ValueError(
                f"--keep {text!r} does not occur in what is compressed (the context, and the question when "
                f"query-aware): give text copied from it"
            )
        comp.keep_positions += pos
    out = run_recorded(lm.model, comp, request)
    answers = {a: answer_positions(tok, compressed, a) for a in [*sample.answers, *find, *keep]}
    oracles = [f"keeping {len(comp.keep_positions)} tokens in every head"] if keep else []
    if only_layers:
        oracles.append(f"compressing layers {only_layers[0]}-{only_layers[1]} only (overall {overall:.3g}x)")
    if mass:
        oracles.append(f"evicting nothing: {mass} stand-ins over {mass_groups} group(s) per head")
    print(f"\n{label} at {ratio:g}x, {mode}: {len(compressed)} tokens compressed" + "".join(f"; {o}" for o in oracles))
    for a, pos in answers.items():
        print(f"  answer {a!r}: " + (f"positions {pos[0]}-{pos[-1]}" if pos else "not in the compressed prompt"))
    found = {a: pos for a, pos in answers.items() if pos}
    print("layer | kept per head (min-max) | " + " | ".join(f"{a!r} kept, lowest pct" for a in found))
    for layer, ((positions, valid), (ranks, before)) in enumerate(zip(comp.kept, comp.before, strict=True)):
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
    ap.add_argument("--ratio", type=float, default=2.0, help="> 1")
    ap.add_argument("--mode", default="query_aware", choices=["query_aware", "query_agnostic"])
    ap.add_argument("--task", default="niah_single")
    ap.add_argument("--path", help="the suite file, with --task jsonl")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=10, help="generated task size (its sample ids depend on it)")
    ap.add_argument("--sample", type=int, default=0, help="which sample to inspect (index; jsonl: in the file)")
    ap.add_argument("--sample-id", help="which sample to inspect (id; overrides --sample)")
    ap.add_argument("--find", action="append", default=[], help="more text to track, like an answer (repeatable)")
    ap.add_argument(
        "--keep", action="append", default=[], help="oracle: keep this text's tokens in every head (repeatable)"
    )
    ap.add_argument("--only-layers", help="oracle: compress layers A-B only (e.g. 0-13), the others keep everything")
    ap.add_argument("--mass", choices=MASS_MODES, help="oracle: stand-ins for the evicted tokens (see above)")
    ap.add_argument("--mass-groups", type=int, default=1, help="groups of evicted tokens per head, for --mass")
    ap.add_argument("--protected", type=int, default=32, help="protected window (the RESULTS commands' 32)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not args.ratio > 1:
        ap.error(f"--ratio must be > 1 (a compression ratio), got {args.ratio:g}")
    try:  # bad setups and layer ranges fail before the model loads
        only_layers = parse_layers(args.only_layers) if args.only_layers else None
        setups = split_setups(args.setups)
        for name in setups:
            _, comp = build_compressor(name, args.ratio, args.protected)
            if only_layers and comp.budget.allocation != "global":
                raise ValueError(
                    f"--only-layers needs setups with the global allocation (like kvzip+global), got {name!r}: "
                    f"only the global threshold moves the other layers' budget to the compressed ones"
                )
    except ValueError as err:
        ap.error(str(err))
    if args.mass_groups < 1:
        ap.error(f"--mass-groups must be >= 1, got {args.mass_groups}")
    if args.task == "jsonl" and not args.path:
        ap.error("--task jsonl needs --path FILE.jsonl")
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2")
    try:
        if args.task == "jsonl":
            samples = build_task("jsonl", path=args.path, tokenizer=lm.tokenizer).samples()
        else:
            task = build_task(args.task, tokenizer=lm.tokenizer, n_samples=args.samples, target_tokens=args.tokens)
            samples = task.samples()
    except (ValueError, FileNotFoundError) as err:
        ap.error(str(err))
    if args.sample_id is not None:
        by_id = {s.sample_id: s for s in samples}
        if args.sample_id not in by_id:
            ap.error(f"--sample-id {args.sample_id!r} is not in the task; it has {', '.join(by_id)}")
        sample = by_id[args.sample_id]
    elif not 0 <= args.sample < len(samples):
        ap.error(f"--sample {args.sample} is out of range: the task has {len(samples)} samples")
    else:
        sample = samples[args.sample]
    try:
        if only_layers:
            parse_layers(args.only_layers, lm.model.config.num_hidden_layers)
        find, keep = tuple(args.find), tuple(args.keep)
        for setup in setups:
            inspect(
                lm,
                sample,
                setup,
                args.ratio,
                args.protected,
                args.mode,
                find,
                keep,
                only_layers,
                args.mass,
                args.mass_groups,
            )
    except ValueError as err:  # a budget the prompt cannot meet (BudgetError), a prompt too long for the engine
        ap.error(str(err))


if __name__ == "__main__":
    main()
