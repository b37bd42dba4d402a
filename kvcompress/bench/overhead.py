"""What a policy's bookkeeping and continual compression cost, as a share of decode time.

For each policy, ``batch`` requests on one real prompt run through a fresh :class:`~kvcompress.engine.Engine`
whose compressor is ``Compressor(policy, Budget(ratio, allocation="uniform", compress_every))``. The prompt is
prefilled once, compressed once, and each request decodes exactly ``steps`` tokens:

* **policy**: decode steps feed the policy (score accumulation fused into the attention, or probability hooks),
  plus a compression every ``compress_every`` steps;
* **baseline**: ``observe_decode=False`` and no continual compression.

Both decode over the same compressed cache; baseline and policy runs alternate within each repeat.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvcompress.bench.latency import summarize
from kvcompress.budget import Budget
from kvcompress.compressor import Compressor
from kvcompress.engine import Engine
from kvcompress.experiment.prompts import build_prompt
from kvcompress.model_runner import paged_attention
from kvcompress.policies.base import Policy
from kvcompress.sequence import Request
from kvcompress.tasks.registry import build_task


def benchmark_prompt(tokenizer: PreTrainedTokenizerBase, context: int, vocab_size: int) -> list[int]:
    """Token ids of one deterministic ``niah_single`` prompt of about ``context`` tokens (chat template applied)."""
    sample = build_task("niah_single", tokenizer=tokenizer, n_samples=1, target_tokens=context).samples()[0]
    ids = build_prompt(tokenizer, sample).ids
    if max(ids) >= vocab_size:
        raise ValueError(f"the tokenizer produced id {max(ids)} but the model's vocabulary has {vocab_size} entries")
    return ids


def spread(name: str, values: list[float]) -> dict[str, float]:
    """``{name: median, name_min: min, name_max: max}`` of ``values``."""
    stats = summarize(values)
    return {name: stats["median"], f"{name}_min": stats["min"], f"{name}_max": stats["max"]}


@dataclass
class DecodeRun:
    """One engine run over ``batch`` requests sharing one compressed prompt, timed over its decode-only steps."""

    ms_per_step: float
    compress_ms: float
    n_compressions: int
    kept_tokens_per_head: float


def run_engine(
    model: PreTrainedModel, ids: list[int], compressor: Compressor, steps: int, batch: int, with_policy: bool
) -> DecodeRun:
    """Decode exactly ``steps`` tokens (no EOS) for ``batch`` requests on ``ids`` through a fresh engine.

    Both runs compress the prompt once after prefill, so they decode over the same cache. The policy run then lets
    decode steps feed the policy and re-compresses every ``compress_every`` steps; the baseline does neither. The
    figure is the mean wall time of the engine steps that ran no prefill (every step after the first).
    """
    budget = compressor.budget if with_policy else dataclasses.replace(compressor.budget, compress_every=0)
    engine = Engine(
        model,
        Compressor(compressor.policy, budget),
        max_seqs=batch + 1,  # + the parent holding the shared prompt
        max_tokens_per_head=len(ids) + steps + 1,
        observe_decode=with_policy,
    )
    # the prefill yields the first token, so steps + 1 new tokens cost exactly `steps` decode forwards
    for i in range(batch):
        engine.add_request(Request(i, ids, steps + 1, share_prefix="prompt" if batch > 1 else None))
    first = engine.step()  # prefill, compression, first decode forward
    assert not first, "a request finished in its first step"
    s0, n0 = engine.stats.compress_s, engine.stats.compressions
    t0, n_steps = time.perf_counter(), 0
    outputs = []
    with paged_attention(model):
        while engine.has_unfinished:
            outputs += engine.step()
            n_steps += 1
    elapsed = time.perf_counter() - t0
    kept = float(outputs[0].memory.kept_per_head.float().mean())
    compress_ms = (engine.stats.compress_s - s0) * 1e3
    return DecodeRun(elapsed * 1e3 / max(n_steps - 1, 1), compress_ms, engine.stats.compressions - n0, kept)


def compression_overhead(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    policies: dict[str, Policy],
    ratio: float = 8.0,
    context: int = 1024,
    steps: int = 128,
    compress_every: int = 64,
    repeats: int = 3,
    batch: int = 1,
    warmup: int = 0,
) -> list[dict]:
    """Per policy: decode ms/step with the policy vs without, and the overhead in % (median/min/max over repeats,
    after ``warmup`` untimed pairs of runs: on CUDA the first run JIT-compiles the Triton kernels).

    Each repeat decodes ``steps`` tokens for ``batch`` forks twice (baseline and policy, alternating which goes
    first). ``compress_ms_total`` and ``n_compressions`` are the decode-time compressions of one policy run (from
    the engine's stats), ``overhead_pct`` is
    ``100 * (t_policy - t_base) / t_base`` of the paired runs. Set ``torch.set_num_threads`` before calling.
    """
    ids = benchmark_prompt(tokenizer, context, model.config.vocab_size)
    rows = []
    for label, policy in policies.items():
        compressor = Compressor(policy, Budget(ratio=ratio, allocation="uniform", compress_every=compress_every))
        for _ in range(warmup):
            for with_policy in (True, False):
                run_engine(model, ids, compressor, steps, batch, with_policy)
        policy_runs, base_runs = [], []
        for r in range(repeats):
            for with_policy in (r % 2 == 0, r % 2 == 1):
                run = run_engine(model, ids, compressor, steps, batch, with_policy)
                (policy_runs if with_policy else base_runs).append(run)
        t_pol = [run.ms_per_step for run in policy_runs]
        t_base = [run.ms_per_step for run in base_runs]
        overhead = [100 * (p - b) / b for p, b in zip(t_pol, t_base, strict=True)]
        rows.append(
            {
                "policy": label,
                "prompt_tokens": len(ids),
                "ratio": ratio,
                "kept_tokens_per_head": policy_runs[0].kept_tokens_per_head,
                "steps": steps,
                "compress_every": compress_every,
                "batch": batch,
                **spread("decode_ms_per_step", t_pol),
                **spread("baseline_ms_per_step", t_base),
                "compress_ms_total": summarize([run.compress_ms for run in policy_runs])["median"],
                "n_compressions": policy_runs[0].n_compressions,
                **spread("overhead_pct", overhead),
            }
        )
    return rows
