"""Throughput of the continuous-batching engine against compression ratio, on one fixed KV pool.

KV-Compress's headline mechanism: on a pool too small to hold every request uncompressed, compression frees
blocks, freed blocks admit more requests, and more requests decode together. The workload here is "offline"
(every request arrives at step 0, as in vLLM's throughput benchmark): ``n_requests`` real prompts of about
``prompt_tokens`` tokens, each forced to generate exactly ``new_tokens`` tokens (EOS ignored, so every ratio
generates the same number of tokens). The pool holds ``pool_seqs`` uncompressed sequences of
``prompt_tokens + new_tokens`` tokens, so the uncompressed engine is memory-bound by construction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvcompress.cache.paged import PagedKVCache
from kvcompress.compressor import Compressor
from kvcompress.engine import Engine, Request
from kvcompress.experiment.prompts import build_prompt
from kvcompress.model_runner import model_kv_geometry
from kvcompress.tasks.registry import build_task


@dataclass
class Workload:
    """The requests and the pool of one throughput measurement."""

    n_requests: int = 12
    prompt_tokens: int = 512
    new_tokens: int = 96
    pool_seqs: float = 2.0  # pool = this many uncompressed sequences of prompt + new tokens
    block_size: int = 16
    prefill_chunk: int = 512
    max_prefill_tokens: int = 1024
    max_seqs: int = 64
    task: str = "niah_single"
    cuda_graphs: bool | None = None  # the engine's switch (None: on wherever the model is on CUDA)

    def prompts(self, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        """Token ids of ``n_requests`` task prompts of about ``prompt_tokens`` tokens (deterministic)."""
        task = build_task(self.task, tokenizer=tokenizer, n_samples=self.n_requests, target_tokens=self.prompt_tokens)
        return [build_prompt(tokenizer, s).ids for s in task.samples()]

    def num_blocks(self, model: PreTrainedModel, longest_prompt: int) -> int:
        layers, heads, _ = model_kv_geometry(model)
        per_seq = PagedKVCache.blocks_for(layers, heads, longest_prompt + self.new_tokens, 1, self.block_size)
        return int(per_seq * self.pool_seqs)


def measure_throughput(
    model: PreTrainedModel,
    prompts: list[list[int]],
    compressor: Compressor | None,
    workload: Workload,
) -> dict:
    """Run every prompt through a fresh engine on the workload's pool; one row of figures for this compressor.

    ``tokens_per_s`` counts generated tokens over the whole wall time (prefill, decode and compression included).
    ``peak_pool_bytes`` is the most pool memory the engine held at once (K, V and slot metadata of the blocks).
    """
    longest = max(len(p) for p in prompts)
    engine = Engine(
        model,
        compressor,
        num_blocks=workload.num_blocks(model, longest),
        block_size=workload.block_size,
        max_seqs=workload.max_seqs,
        max_tokens_per_head=longest + workload.new_tokens,
        prefill_chunk=workload.prefill_chunk,
        max_prefill_tokens=workload.max_prefill_tokens,
        cuda_graphs=workload.cuda_graphs,
    )
    requests = [Request(i, p, workload.new_tokens) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    outputs = engine.run(requests)
    wall = time.perf_counter() - t0
    generated = sum(len(o.tokens) for o in outputs)
    if generated != workload.n_requests * workload.new_tokens:
        raise RuntimeError(f"the engine generated {generated} tokens, expected {len(prompts)} x {workload.new_tokens}")
    st, cache = engine.stats, engine.cache
    block_bytes = cache.block_bytes + 4  # + its int32 block-table entry
    logical = [o.memory.logical_compression for o in outputs if o.memory is not None]
    return {
        "wall_s": wall,
        "tokens_per_s": generated / wall,
        # the decode phase alone (decode forwards + continual compression): where batching pays, whatever the
        # prefill costs on this device
        "decode_tokens_per_s": generated / max(st.decode_s + st.compress_s, 1e-9),
        "generated_tokens": generated,
        "steps": st.steps,
        "peak_running": st.peak_running,
        "peak_decode_batch": st.peak_decode_batch,
        "mean_decode_batch": st.decode_tokens / max(st.steps, 1),
        "preemptions": st.preemptions,
        "compressions": st.compressions,
        "pressure_compressions": st.pressure_compressions,
        "pool_blocks": cache.num_blocks,
        "pool_bytes": cache.num_blocks * block_bytes,
        "peak_pool_bytes": st.peak_blocks * block_bytes,
        "prompt_logical_compression": sum(logical) / max(len(logical), 1),
        "prefill_s": st.prefill_s,
        "decode_s": st.decode_s,
        "compress_s": st.compress_s,
    }


def throughput_sweep(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ratios: list[float],
    make_compressor: Callable[[float], Compressor | None],
    workload: Workload,
    repeats: int = 3,
    done: set[tuple[float, int]] = frozenset(),
    on_row: Callable[[dict], None] | None = None,
    warmup: int = 0,
) -> list[dict]:
    """Every ratio once per repeat, interleaved (repeat-major) so machine drift hits all ratios alike.

    ``make_compressor(ratio)`` builds a fresh compressor (None for the uncompressed engine). ``(ratio, repeat)``
    pairs in ``done`` are skipped (resume); each new row goes to ``on_row`` as soon as it is measured. Each ratio
    with rows still to measure first runs ``warmup`` times unrecorded: on CUDA its first run JIT-compiles the
    Triton kernels it uses (the compressing ratios use more of them than the uncompressed one).
    """
    prompts = workload.prompts(tokenizer)
    for ratio in ratios:
        if any((ratio, repeat) not in done for repeat in range(repeats)):
            for _ in range(warmup):
                measure_throughput(model, prompts, make_compressor(ratio), workload)
    rows = []
    for repeat in range(repeats):
        for ratio in ratios:
            if (ratio, repeat) in done:
                continue
            row = {
                "ratio": ratio,
                "repeat": repeat,
                "warmup": warmup,
                **measure_throughput(model, prompts, make_compressor(ratio), workload),
            }
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows
