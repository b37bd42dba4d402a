"""CUDA graphs of the decode forward: one graph per batch-size bucket, replayed every decode step.

A decode step of a small model is launch-bound: each layer is a few dozen small kernels (norms, projections, RoPE,
the cache write, the paged attention, the MLP), so a 30-layer model launches over a thousand kernels per token (the
issue measured ~1,400 per decode step on an H100 at 79bb037), and the host spends longer issuing them than the
device spends running them. A CUDA graph records the whole forward once (embedding, every layer, the LM head) and
replays it as one launch, as vLLM and nano-vllm do.

What makes the decode forward replayable is that nothing in it depends on host values that change between steps:

* **Shapes are the bucket's.** A batch of ``n`` sequences runs in the smallest bucket ``>= n``. Padding rows hold
  no tokens (length 0, so their attention output is 0) and write their keys into the pool's scratch slot, which no
  head ever reads. Block tables are as wide as a head may grow (``max_blocks_per_head``), and the decode kernel is
  launched for the pool's capacity: its grid depends only on its number of splits, since each head cuts its own
  length into the splits (``kvcompress_kernels.paged_decode``).
* **Values live in static buffers.** The step's plan (write slots, block tables, lengths, positions) and its token
  ids are device tensors; :meth:`DecodeGraphs.run` copies them into the buffers the graph reads, then replays.

Score accumulation (``decode_power`` 1 or 2, fused into the decode kernel) is recorded in the graph: there is one
graph per (bucket, decode_power). Prefill, KVzip's reconstruction, compression and admission stay outside, as do
decode steps whose policy wants raw probabilities (``wants_decode_probs``, TOVA): those run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvcompress.cache.step import ForwardStep, StepPlan

if TYPE_CHECKING:
    from kvcompress.model_runner import ModelRunner


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a graph is captured for: 1, 2, 4, 8, then every 16 up to ``max_batch`` (and ``max_batch``)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return [*sizes, max_batch]


@dataclass
class _Recorded:
    """One bucket's graph and the logits tensor ``[bucket, vocab]`` each replay overwrites (None: run eagerly)."""

    graph: torch.cuda.CUDAGraph | None
    logits: torch.Tensor | None


class DecodeGraphs:
    """Decode forwards of ``runner``'s model over its cache, replayed from CUDA graphs (see the module docstring).

    ``capture=False`` runs the same padded, static-buffer step eagerly instead of recording it: that is exactly what
    a graph replays, so tests check it against the plain eager step on any device (on CPU too).

    Static buffers, for ``B`` = the largest bucket, ``L`` layers, ``H`` kv heads and ``MB`` blocks per head:
    ``input_ids`` and ``positions`` ``[B]`` int64, ``slot_positions`` ``[B * H]`` int32 (token-major, as the cache
    writes them), ``slots`` ``[L, B, H]`` int64, ``block_tables`` ``[L, B, H, MB]`` int32 and ``lengths``
    ``[L, B, H]`` int32, and with summary sketches ``token_seqs`` ``[B]`` int64 (padding rows read sequence 0's
    sketch, which their empty heads never use). A bucket reads the first rows of each, so ``tensor[layer, :bucket]``
    stays contiguous.
    """

    def __init__(self, runner: ModelRunner, max_batch: int, capture: bool = True) -> None:
        cache = runner.cache
        if capture and cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; the cache is on {cache.device}")
        self.runner, self.cache, self.capture = runner, cache, capture
        self.buckets = batch_buckets(max_batch)
        B, L, H, MB = self.buckets[-1], cache.num_layers, cache.num_kv_heads, cache.max_blocks_per_head
        self.capacity = MB * cache.block_size
        long, i32 = dict(dtype=torch.long, device=cache.device), dict(dtype=torch.int32, device=cache.device)
        self.input_ids = torch.zeros(B, **long)
        self.positions = torch.zeros(B, **long)
        self.slot_positions = torch.zeros(B * H, **i32)
        self.slots = torch.full((L, B, H), cache.scratch_slot, **long)
        self.block_tables = torch.zeros((L, B, H, MB), **i32)
        self.lengths = torch.zeros((L, B, H), **i32)
        self.token_seqs = torch.zeros(B, **long) if cache.slot_sketch is not None else None
        self._recorded: dict[tuple[int, int], _Recorded] = {}
        self._pool: tuple[int, int] | None = None  # one memory pool for every graph: they never replay at once
        self.replays = 0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def supports(self, step: ForwardStep) -> bool:
        """Whether ``step`` can replay a graph: a decode step of at most ``max_batch`` sequences whose policy does
        not read the probabilities in Python."""
        return step.plan.is_decode and not step.decode_probs and len(step.plan.seq_ids) <= self.max_batch

    def record_all(self, decode_powers: set[int]) -> None:
        """Record every bucket for each of ``decode_powers`` now, largest bucket first (the shared memory pool is
        sized by the first capture), so that no decode step pauses to capture (:meth:`run` records a missing one)."""
        for bucket in reversed(self.buckets):
            for power in sorted(decode_powers):
                self._graph(bucket, power)

    def run(self, step: ForwardStep, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, vocab]`` of the decode ``step`` (``n`` sequences, ``input_ids`` ``[n]`` on the device).

        The returned tensor is the graph's output buffer: the next replay overwrites it."""
        n = len(step.plan.seq_ids)
        bucket = next(b for b in self.buckets if b >= n)
        recorded = self._graph(bucket, step.decode_power)
        self._load(step.plan, input_ids, n, bucket)
        if recorded.graph is None:
            logits = self._forward(bucket, step.decode_power)
        else:
            recorded.graph.replay()
            logits = recorded.logits
        self.replays += 1
        return logits[:n]

    # ------------------------------------------------------------------ internals
    def _step(self, bucket: int, decode_power: int) -> ForwardStep:
        """The padded decode step of ``bucket`` rows over the static buffers (kernels sized for the capacity)."""
        L, H = self.cache.num_layers, self.cache.num_kv_heads
        plan = StepPlan(
            seq_ids=list(range(bucket)),
            counts=[1] * bucket,
            starts=[0] * bucket,
            cu_seqlens=torch.arange(bucket + 1, dtype=torch.int32, device=self.cache.device),
            positions=self.positions[:bucket],
            slot_positions=self.slot_positions[: bucket * H],
            slots=self.slots[:, :bucket],
            block_tables=self.block_tables[:, :bucket],
            lengths=self.lengths[:, :bucket],
            max_len=[self.capacity] * L,
            min_len=[0] * L,
            layout=[None] * L,
            token_seqs=None if self.token_seqs is None else self.token_seqs[:bucket],
            sketched=self.token_seqs is not None,  # recorded with the term: a zero sketch adds nothing
        )
        return ForwardStep(self.cache, plan, decode_power=decode_power)

    def _forward(self, bucket: int, decode_power: int) -> torch.Tensor:
        ids = self.input_ids[:bucket].view(bucket, 1)
        return self.runner.run_model(self._step(bucket, decode_power), ids, self.positions[:bucket].view(bucket, 1), 0)

    def _graph(self, bucket: int, decode_power: int) -> _Recorded:
        """``bucket``'s graph for ``decode_power``, recorded on first use."""
        key = (bucket, decode_power)
        if key not in self._recorded:
            self._recorded[key] = self._record(bucket, decode_power)
        return self._recorded[key]

    def _record(self, bucket: int, decode_power: int) -> _Recorded:
        """Capture ``bucket``'s forward. Every row is a padding row meanwhile, so the warm-up run (which compiles the
        Triton kernels and lets cuBLAS choose its algorithms) writes only the scratch slot and adds no score."""
        self._pad(0, self.max_batch)
        if not self.capture:
            return _Recorded(None, None)
        stream = torch.cuda.Stream(self.cache.device)
        stream.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(stream):
            self._forward(bucket, decode_power)
        torch.cuda.current_stream(self.cache.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(bucket, decode_power)
        self._pool = graph.pool()
        return _Recorded(graph, logits)

    def _load(self, plan: StepPlan, input_ids: torch.Tensor, n: int, bucket: int) -> None:
        """Copy the step's device metadata into the first ``n`` rows; rows ``n..bucket`` become padding."""
        H, cols = self.cache.num_kv_heads, plan.block_tables.shape[-1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(plan.positions)
        self.slot_positions[: n * H].copy_(plan.slot_positions)
        self.slots[:, :n].copy_(plan.slots)
        self.block_tables[:, :n, :, :cols].copy_(plan.block_tables)  # columns past a head's length are never read
        self.lengths[:, :n].copy_(plan.lengths)
        if self.token_seqs is not None:
            self.token_seqs[:n].copy_(plan.token_seqs)
        self._pad(n, bucket)

    def _pad(self, start: int, stop: int) -> None:
        """Rows ``start..stop`` hold no tokens and write into the scratch slot."""
        if stop > start:
            self.slots[:, start:stop].fill_(self.cache.scratch_slot)
            self.lengths[:, start:stop].zero_()
