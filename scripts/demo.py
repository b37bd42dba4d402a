"""Generate an answer through the compressed paged cache of the embedded model and print the memory saved.

python scripts/demo.py [--policy lfu] [--allocation global] [--ratio 8] [--tokens 1000]
"""

from __future__ import annotations

import argparse
import time

from kvcompress.budget import Budget
from kvcompress.compressor import Compressor
from kvcompress.experiment.policy_config import load_policy
from kvcompress.experiment.prompts import bind_tokenizer, build_prompt
from kvcompress.generate import generate
from kvcompress.model import load_model
from kvcompress.tasks.passkey import Passkey


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="embedded model name or a local HF checkpoint directory")
    ap.add_argument("--policy", default="lfu", help="a name from conf/policy/")
    ap.add_argument("--allocation", default="global", help="uniform | pyramid | adakv | global")
    ap.add_argument("--ratio", type=float, default=8.0)
    ap.add_argument("--tokens", type=int, default=1000, help="prompt length of the passkey task")
    args = ap.parse_args()

    lm = load_model(args.model)
    print(f"loaded {args.model} in {lm.load_s:.1f}s ({'cached copy' if lm.from_cache else 'converted from GGUF'})")
    sample = Passkey(lm.tokenizer, n_samples=1, target_tokens=args.tokens, seed=1).samples()[0]
    ids = build_prompt(lm.tokenizer, sample).ids
    policy = load_policy(args.policy)
    bind_tokenizer(policy, lm.tokenizer)  # KVzip's repeat prompt in the model's tokens
    comp = Compressor(policy, Budget(ratio=args.ratio, protected_window=16, allocation=args.allocation))
    t0 = time.perf_counter()
    res = generate(lm.model, [ids], comp, max_new_tokens=24, eos_token_ids=[lm.tokenizer.eos_token_id])[0]
    m = res.memory
    print(f"prompt: {len(ids)} tokens, question: {sample.question.strip()!r}, expected: {sample.answers}")
    print(f"answer ({args.policy}/{args.allocation} at {args.ratio:g}x): {lm.tokenizer.decode(res.tokens)!r}")
    print(
        f"KV memory: {m.allocated_bytes / 2**20:.2f} MiB allocated vs {m.dense_bytes / 2**20:.2f} MiB dense "
        f"(physical {m.physical_compression:.2f}x, logical {m.logical_compression:.2f}x), "
        f"generation {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
