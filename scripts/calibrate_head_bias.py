"""Profile KV-Compress's head bias for a model: one additive offset per (layer, kv head, sequence-length bin).

Runs the ``lfu`` policy's observation over calibration prompts (the model's forward over the paged cache, as the
engine runs it, but stopped before compression), and for each prompt and head takes the head's own metric at its
``1 - 1/ratio`` quantile (the last token a uniform budget would keep) and the same quantile over every head of the
prompt. A head's bias is the mean, over the prompts of its length bin, of the second minus the first (the method is
documented in :mod:`kvcompress.policies.head_bias`). The recent ``--protected`` tokens are left out: the budget
keeps them whatever their score. Calibrate on prompts you do not evaluate on (the dev suite, not the held-out one).

    python scripts/calibrate_head_bias.py --path docs/results/suites/dev-1k.jsonl --ratio 8 \\
        --out ~/.cache/kvcompress/head_bias/smollm2-L2-sum-x8.npz
    python experiments/run.py policy=lfu policy.head_bias=~/.cache/kvcompress/head_bias/smollm2-L2-sum-x8.npz ...

Write the bias for the metric you will rank with (``--metric``, ``--window``, ``--pool-kernel``): the offsets are in
that metric's units.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from kvcompress.budget import Budget
from kvcompress.compressor import Compressor
from kvcompress.experiment.prompts import build_prompt
from kvcompress.model import load_model
from kvcompress.model_runner import ModelRunner, make_cache
from kvcompress.policies.head_bias import HeadBias
from kvcompress.policies.lfu import METRICS, LFUPolicy
from kvcompress.tasks.base import TaskDataError, spread
from kvcompress.tasks.jsonl import JsonlTask


def head_quantiles(runner: ModelRunner, policy: LFUPolicy, ids: list[int], ratio: float, protected: int):
    """Prefill ``ids`` with ``policy`` observing; return ``(per_head [L, H], pooled)``: the metric at the
    ``1 - 1/ratio`` quantile of each head's unprotected slots, and of all heads' together."""
    cache = runner.cache
    seq = cache.add_sequence(len(ids))
    try:
        comp = Compressor(policy, Budget(ratio=ratio, protected_window=protected))
        runner.forward([seq], [ids], comp, comp.window)
        seen = torch.as_tensor(cache.seen[[seq]], device=cache.device)
        level = 1.0 - 1.0 / ratio
        per_head, pooled = [], []
        for layer in range(cache.num_layers):
            view = cache.view(layer, [seq], with_kv=False)
            scores = policy.metric_of(view, seen)[0].float()  # [H, L]
            free = view.valid[0] & (view.positions[0] < int(seen[0]) - protected)
            per_head.append(torch.stack([torch.quantile(scores[h][free[h]], level) for h in range(scores.shape[0])]))
            pooled.append(scores[free])
        return torch.stack(per_head).cpu().numpy(), float(torch.quantile(torch.cat(pooled), level))
    finally:
        cache.release(seq)
        policy.release(seq)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", required=True, help="jsonl calibration samples (kvcompress's jsonl task format)")
    ap.add_argument("--out", required=True, help="where to write the .npz (keys bias, pos_bins)")
    ap.add_argument("--model", default="smollm2", help="'smollm2' or a local HF checkpoint directory")
    ap.add_argument("--samples", type=int, default=None, help="use this many samples, spread over the file")
    ap.add_argument("--ratio", type=float, default=8.0, help="compression whose per-head threshold is centred")
    ap.add_argument("--bins", default="0", help="sequence-length bin edges, comma separated, starting at 0")
    ap.add_argument("--mode", default="query_aware", choices=["query_aware", "query_agnostic"])
    ap.add_argument("--protected", type=int, default=32, help="recent tokens left out (the budget keeps them)")
    ap.add_argument("--metric", default="L2-sum", choices=METRICS)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--pool-kernel", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for the 135M model)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        edges = np.array([int(b) for b in args.bins.split(",")])
        bias_bins = HeadBias(np.zeros((1, 1, edges.size)), edges)  # validates the edges
    except ValueError as err:
        ap.error(f"--bins {args.bins!r}: {err}")
    if args.ratio <= 1:
        ap.error(f"--ratio must be > 1 (a compression to centre the heads at), got {args.ratio}")
    lm = load_model(args.model)
    try:
        samples = spread(JsonlTask(args.path, tokenizer=lm.tokenizer).samples(), args.samples)
    except TaskDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prompts = [build_prompt(lm.tokenizer, s) for s in samples]
    ids = [p.context_ids + p.question_ids if args.mode == "query_aware" else p.context_ids for p in prompts]
    policy = LFUPolicy(metric=args.metric, window=args.window, pool_kernel=args.pool_kernel)
    runner = ModelRunner(lm.model, make_cache(lm.model, 1, max(map(len, ids))))
    L, H = runner.cache.num_layers, runner.cache.num_kv_heads
    total, count = np.zeros((L, H, edges.size)), np.zeros(edges.size)
    for prompt_ids in tqdm(ids, desc="calibration prompts"):
        if len(prompt_ids) <= args.protected * args.ratio:
            continue  # too short to leave an unprotected quantile worth measuring
        per_head, pooled = head_quantiles(runner, policy, prompt_ids, args.ratio, args.protected)
        b = int(bias_bins.bins_of(torch.tensor([len(prompt_ids)]))[0])
        total[:, :, b] += pooled - per_head
        count[b] += 1
    if not count.any():
        print(f"error: no calibration prompt is longer than {args.protected * args.ratio:g} tokens", file=sys.stderr)
        return 2
    filled = np.flatnonzero(count)
    nearest = filled[np.abs(np.arange(edges.size)[:, None] - filled[None, :]).argmin(1)]  # empty bins copy a neighbour
    bias = total[:, :, nearest] / count[nearest]
    out = Path(args.out).expanduser()
    HeadBias(bias, edges).save(out)
    print(f"wrote {out}: bias {bias.shape} from {int(count.sum())} prompts (per bin {count.astype(int).tolist()})")
    print(f"bias range [{bias.min():.3g}, {bias.max():.3g}], mean |bias| {np.abs(bias).mean():.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
