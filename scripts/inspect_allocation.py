"""Where a policy/allocator pair spends the budget: kept tokens per layer and how much of the needle each keeps.

Prefills one needle-in-a-haystack prompt, compresses it, and prints per layer the kept tokens (min–max over kv
heads) and the fraction of the needle's value tokens still cached (mean over kv heads), then the answer.

    python scripts/inspect_allocation.py --setups lfu:global,lfu:uniform --ratio 2 --sample 0
"""

from __future__ import annotations

import argparse

import torch

from kvcompress.budget import Budget
from kvcompress.compressor import Compressor
from kvcompress.experiment.policy_config import load_policy
from kvcompress.experiment.prompts import build_prompt
from kvcompress.generate import generate
from kvcompress.model import load_model
from kvcompress.model_runner import ModelRunner, make_cache
from kvcompress.tasks.registry import build_task


def needle_positions(ids: list[int], value_ids: list[int]) -> list[int]:
    """Positions of the first occurrence of ``value_ids`` in ``ids`` (the needle's value tokens)."""
    for i in range(len(ids) - len(value_ids) + 1):
        if ids[i : i + len(value_ids)] == value_ids:
            return list(range(i, i + len(value_ids)))
    raise ValueError("the needle value does not occur in the prompt as the same tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="lfu:global,lfu:uniform", help="policy:allocation pairs, comma separated")
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--task", default="niah_single")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=10, help="task size (sample ids depend on it)")
    ap.add_argument("--sample", type=int, default=0, help="which sample to inspect")
    ap.add_argument("--protected", type=int, default=32)
    args = ap.parse_args()
    lm = load_model("smollm2")
    tok = lm.tokenizer
    sample = build_task(args.task, tokenizer=tok, n_samples=args.samples, target_tokens=args.tokens).samples()[
        args.sample
    ]
    ids = build_prompt(tok, sample).ids
    needle = needle_positions(ids, tok(sample.answers[0], add_special_tokens=False).input_ids)
    print(f"{sample.sample_id}: {len(ids)} prompt tokens, value {sample.answers[0]!r} at positions {needle}")
    for setup in args.setups.split(","):
        name, allocation = setup.split(":")
        policy = load_policy(name)
        budget = Budget(ratio=args.ratio, protected_window=args.protected, allocation=allocation)
        comp = Compressor(policy, budget)
        runner = ModelRunner(lm.model, make_cache(lm.model, 1, len(ids)))
        seq = runner.cache.add_sequence()
        runner.forward([seq], [ids], comp, comp.window)  # the prompt in one forward, the policy observing
        comp.compress(runner.cache, [seq])
        print(f"\n{name} + {allocation} at {args.ratio:g}x")
        print("layer | kept per head (min-max) | needle tokens kept")
        for layer in range(runner.cache.num_layers):
            view = runner.cache.view(layer, [seq], with_kv=False)
            kept = view.lengths[0]
            have = torch.stack(
                [torch.isin(torch.tensor(needle), view.positions[0, h][view.valid[0, h]]) for h in range(len(kept))]
            )
            print(f"{layer:5d} | {int(kept.min()):4d}-{int(kept.max()):4d} | {float(have.float().mean()):.2f}")
        out = generate(lm.model, [ids], comp, sample.max_new_tokens, [tok.eos_token_id])[0]
        print("answer:", repr(tok.decode(out.tokens, skip_special_tokens=True)))


if __name__ == "__main__":
    main()
