"""A continuous-batching engine over one shared, compressed paged KV pool.

This is the mechanism behind KV-Compress's throughput claim: compression frees blocks, freed blocks admit more
requests, and more requests decode together in one batched step. Each engine :meth:`Engine.step`

1. **admits** waiting requests (in arrival order) while a sequence slot is free and the pool has the blocks the
   whole prompt needs *uncompressed* (prefill holds every prompt token until the compressor runs), plus a
   watermark of headroom for the running sequences' growth;
2. runs **one packed varlen prefill** forward of up to ``max_prefill_tokens`` prompt tokens (each long prompt in
   chunks of ``prefill_chunk``; the final chunk of a prompt carries the policy's observation window, and a
   sequence is **compressed** as soon as its prompt is in);
3. runs **one batched decode** forward for every sequence past its prompt, and re-compresses a sequence every
   ``budget.compress_every`` of its decode steps (continual compression).

When a forward would need more blocks than are free, the engine first compresses the running sequences down to
their budgets (compression on pool pressure), and only then **preempts** the most recently admitted sequence:
its blocks return to the pool, and the request goes back to the front of the queue with the tokens it already
generated, to be recomputed (prefilled as prompt + generated tokens) when memory allows. No request is dropped.

Greedy outputs equal :func:`kvcompress.generate.generate` on one sequence with the same compressor, as long as
no pool pressure forces extra compressions or preemptions (``tests/engine``); without a compressor they are
equal under preemption too, because recomputing an uncompressed cache reproduces it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from kvcompress.cache.paged import MemoryStats, PagedKVCache, PoolExhaustedError
from kvcompress.compressor import Compressor
from kvcompress.generate import PagedGenerator, _chunks, paged_attention


@dataclass
class Request:
    """One generation request: greedy decoding of up to ``max_new_tokens`` after ``prompt_ids``.

    ``arrival_step`` is the engine step from which the request may be admitted (simulated arrivals over time).
    """

    request_id: int | str
    prompt_ids: Sequence[int]
    max_new_tokens: int
    eos_token_ids: Sequence[int] = ()
    arrival_step: int = 0


@dataclass
class RequestOutput:
    """A finished request. ``memory`` is its cache accounting right after its (last) prompt compression."""

    request_id: int | str
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str  # "eos" | "length"
    preemptions: int
    admitted_step: int
    finished_step: int
    memory: MemoryStats | None


@dataclass
class EngineStats:
    """Counters over an engine's life (all steps)."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    generated_tokens: int = 0
    peak_running: int = 0  # most sequences holding cache at once
    peak_decode_batch: int = 0
    preemptions: int = 0
    recomputed_tokens: int = 0  # generated tokens prefilled again after a preemption
    compressions: int = 0
    pressure_compressions: int = 0
    blocks_freed: int = 0
    peak_blocks: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compress_s: float = 0.0


@dataclass
class _Running:
    """A request that holds a cache sequence: still prefilling (``chunks`` left) or decoding."""

    request: Request
    seq_id: int
    admitted_step: int
    prefix: list[int]  # what is prefilled: the prompt, plus the tokens generated before a preemption
    chunks: deque[tuple[int, int]]
    generated: list[int]
    preemptions: int
    pending: int | None = None  # next token (argmax of the last logits), not yet emitted
    decode_steps: int = 0  # decode forwards since the last (re)admission: drives compress_every
    memory: MemoryStats | None = None

    @property
    def prefilling(self) -> bool:
        return bool(self.chunks)


@dataclass
class Engine:
    """Continuous batching for one model over one paged pool; see the module docstring for the schedule.

    ``num_blocks`` fixes the pool (default: room for ``max_seqs`` uncompressed sequences of
    ``max_tokens_per_head``). ``watermark_blocks`` is the headroom admission leaves for running sequences to grow
    (default: one block per (layer, kv head), i.e. one sequence's next block on every head).
    """

    model: PreTrainedModel
    compressor: Compressor | None = None
    num_blocks: int | None = None
    block_size: int = 16
    max_seqs: int = 16
    max_tokens_per_head: int | None = None
    prefill_chunk: int = 512
    max_prefill_tokens: int = 2048
    watermark_blocks: int | None = None
    stats: EngineStats = field(init=False, default_factory=EngineStats)

    def __post_init__(self) -> None:
        if self.max_prefill_tokens < 1 or self.prefill_chunk < 1:
            raise ValueError("prefill_chunk and max_prefill_tokens must be >= 1 tokens")
        self.gen = PagedGenerator(
            self.model,
            self.compressor,
            block_size=self.block_size,
            max_seqs=self.max_seqs,
            max_tokens_per_head=self.max_tokens_per_head,
            num_blocks=self.num_blocks,
            prefill_chunk=self.prefill_chunk,
        )
        self.cache: PagedKVCache = self.gen.cache
        heads = self.cache.num_layers * self.cache.num_kv_heads
        self.watermark = heads if self.watermark_blocks is None else self.watermark_blocks
        self.step_no = 0
        self.waiting: deque[tuple[Request, list[int], int]] = deque()  # (request, generated so far, preemptions)
        self.running: list[_Running] = []  # in admission order
        self.finished: dict[int | str, RequestOutput] = {}

    # ------------------------------------------------------------------ requests
    def add_request(self, request: Request) -> None:
        """Queue a request; raises ``ValueError`` when it could never run on this pool, whatever else runs."""
        n = len(request.prompt_ids)
        if n == 0 or request.max_new_tokens < 0:
            raise ValueError(
                f"request {request.request_id!r}: needs a non-empty prompt and max_new_tokens >= 0 "
                f"(got {n} prompt tokens, max_new_tokens={request.max_new_tokens})"
            )
        longest = self.cache.max_blocks_per_head * self.block_size
        if n + request.max_new_tokens > longest:
            raise ValueError(
                f"request {request.request_id!r}: {n} prompt + {request.max_new_tokens} new tokens exceed the "
                f"engine's max_tokens_per_head={longest}; build the Engine with a larger max_tokens_per_head"
            )
        alone = self._blocks_for(n + request.max_new_tokens)
        if alone > self.cache.num_blocks:
            raise ValueError(
                f"request {request.request_id!r}: {n} prompt + {request.max_new_tokens} new tokens need {alone} "
                f"blocks uncompressed, but the pool has {self.cache.num_blocks}; raise num_blocks"
            )
        if request.request_id in self.finished or any(r.request_id == request.request_id for r in self._all_requests()):
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        self.waiting.append((request, [], 0))

    def _all_requests(self) -> Iterable[Request]:
        yield from (w[0] for w in self.waiting)
        yield from (r.request for r in self.running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_for(self, tokens: int) -> int:
        return PagedKVCache.blocks_for(self.cache.num_layers, self.cache.num_kv_heads, tokens, 1, self.block_size)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Admit, prefill one packed batch, decode every running sequence once; returns requests finished now."""
        done_before = len(self.finished)
        self._admit()
        with paged_attention(self.model):
            self._prefill_step()
            self._decode_step()
        self.stats.steps += 1
        self.stats.peak_blocks = self.cache.peak_blocks  # the cache keeps the running maximum
        self.step_no += 1
        return list(self.finished.values())[done_before:]

    def run(self, requests: Iterable[Request] = (), progress: bool = False) -> list[RequestOutput]:
        """Add ``requests``, step until every request has finished; outputs in the order requests were added."""
        order = [r.request_id for r in self.finished.values()]
        for r in requests:
            self.add_request(r)
        order += [r.request_id for r in self._all_requests() if r.request_id not in order]
        with tqdm(total=len(order), desc="requests", disable=not progress) as bar:
            bar.update(len(self.finished))
            while self.has_unfinished:
                bar.update(len(self.step()))
        return [self.finished[i] for i in order]

    # ------------------------------------------------------------------ admission
    def _admit(self) -> None:
        promised = sum(self._prefill_blocks_left(r) for r in self.running if r.prefilling)
        while self.waiting and self.waiting[0][0].arrival_step <= self.step_no:
            request, generated, preemptions = self.waiting[0]
            if len(self.running) >= self.max_seqs:
                break
            prefix = [*request.prompt_ids, *generated]
            need = self._blocks_for(len(prefix))
            # an idle engine admits the head request whatever the watermark: it fits alone (checked on add)
            headroom = self.watermark if self.running else 0
            if self.cache.num_free_blocks - promised < need + headroom:
                break
            self.waiting.popleft()
            self.stats.recomputed_tokens += len(generated)
            seq_id = self.cache.add_sequence()
            window = self.compressor.observe_window(len(prefix)) if self.compressor else 0
            chunks = deque(_chunks(len(prefix), self.prefill_chunk, window))
            self.running.append(_Running(request, seq_id, self.step_no, prefix, chunks, generated, preemptions))
            promised += need
        self.stats.peak_running = max(self.stats.peak_running, len(self.running))

    def _prefill_blocks_left(self, r: _Running) -> int:
        return self._blocks_for(len(r.prefix)) - int(self.cache.num_blocks_held[:, r.seq_id].sum())

    # ------------------------------------------------------------------ prefill
    def _prefill_step(self) -> None:
        """One packed forward of prompt chunks (several sequences), oldest admissions first."""
        picked: list[_Running] = []
        tokens = 0
        for r in self.running:
            if not r.prefilling:
                continue
            a, b = r.chunks[0]
            if picked and tokens + (b - a) > self.max_prefill_tokens:
                break
            picked.append(r)
            tokens += b - a
        if not picked:
            return
        picked = self._fit(picked)
        if not picked:
            return
        t0 = time.perf_counter()
        window = self.compressor.observe_window(0) if self.compressor else 0
        # a forward observes one window size for all its sequences: final chunks observe, others only if the
        # policy wants every prompt query (window < 0)
        finals = [r for r in picked if len(r.chunks) == 1]
        middles = [r for r in picked if len(r.chunks) > 1]
        if middles:
            self._forward_chunks(middles, window if window < 0 else 0)
        logits = self._forward_chunks(finals, window) if finals else None
        self.stats.prefill_s += time.perf_counter() - t0
        if finals:
            self._compress(finals)
            for row, r in enumerate(finals):
                r.pending = int(logits[row].argmax())
                r.memory = self.cache.memory([r.seq_id])

    def _forward_chunks(self, group: list[_Running], observe: int) -> torch.Tensor:
        """One packed forward of each sequence's next chunk; returns the last logits ``[len(group), vocab]``."""
        spans = [r.chunks.popleft() for r in group]
        self.stats.prefill_tokens += sum(b - a for a, b in spans)
        tokens = [r.prefix[a:b] for r, (a, b) in zip(group, spans, strict=True)]
        return self.gen.forward([r.seq_id for r in group], tokens, observe)

    def _fit(self, picked: list[_Running]) -> list[_Running]:
        """Drop the newest picked chunks until the rest fit the pool. If not even the oldest fits, compress the
        decoding sequences and preempt sequences admitted after it; failing that, skip prefill this step and let
        decoding sequences finish (they free their blocks)."""
        while len(picked) > 1 and self._chunk_blocks(picked) > self.cache.num_free_blocks:
            picked = picked[:-1]
        need = self._chunk_blocks(picked)
        if need <= self.cache.num_free_blocks or self._make_room(need, keep=picked[0]):
            return picked
        if any(not r.prefilling for r in self.running):
            return []
        raise PoolExhaustedError(need, self.cache.num_free_blocks, self.cache.num_blocks)  # add_request prevents it

    def _chunk_blocks(self, picked: list[_Running]) -> int:
        return self.cache.blocks_needed([r.seq_id for r in picked], [r.chunks[0][1] - r.chunks[0][0] for r in picked])

    # ------------------------------------------------------------------ decode
    def _decode_step(self) -> None:
        t0 = time.perf_counter()
        for r in [r for r in self.running if not r.prefilling and r.pending is not None]:
            tok, r.pending = r.pending, None
            if r.request.max_new_tokens == 0:
                self._finish(r, "length")
                continue
            if tok in r.request.eos_token_ids:
                self._finish(r, "eos")
                continue
            r.generated.append(tok)
            self.stats.generated_tokens += 1
            if len(r.generated) >= r.request.max_new_tokens:
                self._finish(r, "length")
        batch = [r for r in self.running if not r.prefilling]
        if not batch:
            return
        need = self.cache.blocks_needed([r.seq_id for r in batch], [1] * len(batch))
        if need > self.cache.num_free_blocks:
            self._make_room(need, keep=None)
            batch = [r for r in self.running if not r.prefilling]
            if not batch:
                return
        self.stats.peak_decode_batch = max(self.stats.peak_decode_batch, len(batch))
        logits = self.gen.forward([r.seq_id for r in batch], [[r.generated[-1]] for r in batch])
        self.stats.decode_tokens += len(batch)
        due = []
        for row, r in enumerate(batch):
            r.pending = int(logits[row].argmax())
            r.decode_steps += 1
            if self.compressor is not None and self.compressor.due(r.decode_steps):
                due.append(r)
        self.stats.decode_s += time.perf_counter() - t0
        self._compress(due)

    # ------------------------------------------------------------------ memory pressure
    def _compress(self, rs: list[_Running]) -> int:
        if self.compressor is None or not rs:
            return 0
        t0 = time.perf_counter()
        freed = self.compressor.compress(self.cache, [r.seq_id for r in rs])
        self.stats.compress_s += time.perf_counter() - t0
        self.stats.compressions += 1
        self.stats.blocks_freed += freed
        return freed

    def _make_room(self, need: int, keep: _Running | None) -> bool:
        """Free blocks until ``need`` are free: compress the decoding sequences, then preempt the newest ones.

        With ``keep`` (a prefill that needs room) only sequences admitted after it may be preempted; with None (a
        decode step) any may, newest first, and ``need`` shrinks as victims leave the batch. Returns whether
        ``need`` blocks are now free.
        """
        decoding = [r for r in self.running if not r.prefilling]
        if decoding and self.compressor is not None and self.compressor.active:
            self._compress(decoding)
            self.stats.pressure_compressions += 1
        while self.cache.num_free_blocks < need:
            victims = self.running[self.running.index(keep) + 1 :] if keep is not None else self.running
            if not victims:
                return False
            self._preempt(victims[-1])
            if keep is None:  # a decode step: the victim no longer needs its next block either
                ids = [r.seq_id for r in self.running if not r.prefilling]
                need = self.cache.blocks_needed(ids, [1] * len(ids))
        return True

    def _preempt(self, r: _Running) -> None:
        """Release a sequence's blocks and requeue it first in line, keeping what it has generated."""
        self.cache.release(r.seq_id)
        self.running.remove(r)
        self.waiting.appendleft((r.request, r.generated, r.preemptions + 1))
        self.stats.preemptions += 1

    def _finish(self, r: _Running, reason: str) -> None:
        self.cache.release(r.seq_id)
        self.running.remove(r)
        self.finished[r.request.request_id] = RequestOutput(
            request_id=r.request.request_id,
            prompt_tokens=len(r.request.prompt_ids),
            tokens=r.generated,
            finish_reason=reason,
            preemptions=r.preemptions,
            admitted_step=r.admitted_step,
            finished_step=self.step_no,
            memory=r.memory,
        )
