"""What a policy's bookkeeping and continual compression cost, as a share of decode time.

For each policy a real prompt is prefilled into a :class:`~kvcompress.generate.PagedGenerator` whose compressor is
``Compressor(policy, Budget(ratio, allocation="uniform", compress_every))`` and compressed once. The compressed
sequence is then forked, and each fork decodes exactly ``steps`` tokens through :meth:`PagedGenerator.decode`:

* **policy**: with the policy's compressor (decode-time score accumulation or probability hooks, plus a
  compression every ``compress_every`` steps);
* **baseline**: with ``gen.compressor = None`` (no statistics asked of the attention, no compression).

Both start from the same compressed cache; baseline and policy runs alternate within each repeat.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvcompress.bench.latency import summarize
from kvcompress.budget import Budget
from kvcompress.cache.paged import PagedKVCache
from kvcompress.compressor import Compressor
from kvcompress.experiment.prompts import build_prompt
from kvcompress.generate import PagedGenerator, model_kv_geometry
from kvcompress.policies.base import Policy
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
    """One timed decode of ``steps`` tokens from forks of the compressed sequence."""

    ms_per_step: float
    compress_ms: float
    n_compressions: int


@dataclass
class OverheadBench:
    """A generator holding one prefilled, compressed sequence (``base``) and its first decode logits ``[vocab]``."""

    gen: PagedGenerator
    compressor: Compressor
    base: int
    first_logits: torch.Tensor
    prompt_tokens: int

    @classmethod
    def prepare(
        cls, model: PreTrainedModel, ids: list[int], compressor: Compressor, steps: int, batch: int
    ) -> OverheadBench:
        """Prefill ``ids`` and compress; the pool fits the uncompressed prompt plus ``batch`` growing forks."""
        layers, heads, _ = model_kv_geometry(model)
        longest = len(ids) + steps + 1
        gen = PagedGenerator(
            model,
            compressor,
            max_seqs=1 + batch,
            max_tokens_per_head=longest,
            num_blocks=PagedKVCache.blocks_for(layers, heads, longest, 1 + batch),
        )
        base = gen.cache.add_sequence()
        first = gen.prefill(base, ids)
        gen.compress([base])
        return cls(gen, compressor, base, first, len(ids))

    @property
    def kept_tokens_per_head(self) -> float:
        """Mean tokens per (layer, kv head) of the compressed base sequence."""
        return float(self.gen.cache.memory([self.base]).kept_per_head.float().mean())

    def run(self, steps: int, batch: int, with_policy: bool) -> DecodeRun:
        """Fork ``batch`` copies of the base, decode exactly ``steps`` tokens (no EOS), release the copies."""
        comp = self.compressor
        forks = [self.gen.fork(self.base) for _ in range(batch)]
        self.gen.compressor = comp if with_policy else None
        s0, n0 = comp.compress_s, comp.n_compressions
        t0 = time.perf_counter()
        # decode() takes its first token from first_logits, so steps + 1 new tokens cost exactly `steps` forwards
        self.gen.decode(forks, self.first_logits.expand(batch, -1), steps + 1, eos_token_ids=())
        elapsed = time.perf_counter() - t0
        self.gen.compressor = comp
        for s in forks:
            self.gen.cache.release(s)
        return DecodeRun(elapsed * 1e3 / steps, (comp.compress_s - s0) * 1e3, comp.n_compressions - n0)


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
) -> list[dict]:
    """Per policy: decode ms/step with the policy vs without, and the overhead in % (median/min/max over repeats).

    Each repeat decodes ``steps`` tokens for ``batch`` forks twice (baseline and policy, alternating which goes
    first). ``compress_ms_total`` and ``n_compressions`` are the compressions during one policy run (from
    :attr:`Compressor.compress_s` / :attr:`Compressor.n_compressions`), ``overhead_pct`` is
    ``100 * (t_policy - t_base) / t_base`` of the paired runs. Set ``torch.set_num_threads`` before calling.
    """
    ids = benchmark_prompt(tokenizer, context, model.config.vocab_size)
    rows = []
    for label, policy in policies.items():
        compressor = Compressor(policy, Budget(ratio=ratio, allocation="uniform", compress_every=compress_every))
        bench = OverheadBench.prepare(model, ids, compressor, steps, batch)
        policy_runs, base_runs = [], []
        for r in range(repeats):
            for with_policy in (r % 2 == 0, r % 2 == 1):
                (policy_runs if with_policy else base_runs).append(bench.run(steps, batch, with_policy))
        t_pol = [run.ms_per_step for run in policy_runs]
        t_base = [run.ms_per_step for run in base_runs]
        overhead = [100 * (p - b) / b for p, b in zip(t_pol, t_base, strict=True)]
        rows.append(
            {
                "policy": label,
                "prompt_tokens": bench.prompt_tokens,
                "ratio": ratio,
                "kept_tokens_per_head": bench.kept_tokens_per_head,
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
