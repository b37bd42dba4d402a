"""The engine: the one driver of generation, evaluation and benchmarks, over one shared compressed paged pool.

Continuous batching is the mechanism behind KV-Compress's throughput claim: compression frees blocks, freed blocks
admit more requests, and more requests decode together in one batched step. Each :meth:`Engine.step`

1. **admits** waiting requests (in arrival order) while a sequence slot is free and the pool has the blocks the
   whole prompt needs *uncompressed* (prefill holds every prompt token until the compressor runs), plus a
   watermark of headroom for the running sequences' growth. Requests sharing a prompt (``share_prefix``) get one
   parent sequence that prefills it once; each request then forks it. A new parent is admitted only when the
   slots its forks need are free beyond those owed to earlier parents' waiting forks, so prefilled prompts are
   forked and decoded before more prompts are prefilled;
2. runs **packed varlen prefill** forwards of up to ``max_prefill_tokens`` prompt tokens (each long prompt in
   chunks of ``prefill_chunk``; the final chunk of a prompt carries the policy's observation window), and
   **compresses** a sequence as soon as its prompt is in, before its question (query-agnostic) is prefilled.
   A policy that scores by reconstruction (KVzip, :meth:`~kvcompress.policies.base.Policy.reconstruction`) first
   gets its tokens teacher-forced after the prompt (in one pass or several, each seeing the prompt up to where
   the policy says), every query observed, and then truncated off the cache;
3. runs **one batched decode** forward for every sequence past its prefill, and re-compresses a sequence every
   ``budget.compress_every`` of its decode steps (continual compression).

When a forward would need more blocks than are free, the engine first compresses the running sequences down to
their budgets (compression on pool pressure), and only then **preempts** the most recently admitted sequence:
its blocks return to the pool, and the request goes back to the front of the queue with the tokens it already
generated, to be recomputed when memory allows. No request is dropped.

This module is the one place that decides when compression runs (:meth:`Engine._compress`) and times it. A
request's state lives in its :class:`~kvcompress.sequence.Sequence`; the model forward in the
:class:`~kvcompress.model_runner.ModelRunner`. A decode step reads back only the sampled tokens.

Greedy outputs do not depend on what else runs, as long as no pool pressure forces extra compressions or
preemptions (``tests/engine``); without a compressor they are equal under preemption too, because recomputing an
uncompressed cache reproduces it. The default pool (room for ``max_seqs`` uncompressed sequences of
``max_tokens_per_head``) never comes under pressure.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from kvcompress.budget import Budget
from kvcompress.cache.paged import PagedKVCache, PoolExhaustedError
from kvcompress.compressor import Compressor
from kvcompress.model_runner import ModelRunner, make_cache, paged_attention
from kvcompress.policies.base import ReconstructionPass, pass_peak
from kvcompress.sequence import Forcing, Request, RequestOutput, Sequence, plan_chunks


def peak_tokens(request: Request, compressor: Compressor | None) -> int:
    """The most tokens ``request``'s sequence holds per head, uncompressed: its prompt, question and new tokens,
    or its prompt plus the longest pass of the policy's reconstruction of it (KVzip), released before the question."""
    n = len(request.prompt_ids) + len(request.question_ids) + request.max_new_tokens
    if compressor is None or not compressor.policy.evicts:
        return n
    return max(n, len(request.prompt_ids) + pass_peak(compressor.policy.reconstruction(request.prompt_ids)))


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
    shared_prefills: int = 0  # parent sequences that prefilled a shared prompt once
    forks: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compress_s: float = 0.0
    reconstruct_s: float = 0.0  # KVzip's reconstruction forwards (not in prefill_s or compress_s)
    reconstruct_tokens: int = 0


@dataclass
class _Queued:
    request: Request
    generated: list[int] = field(default_factory=list)
    preemptions: int = 0
    forcing: Forcing | None = None


@dataclass
class Engine:
    """Continuous batching for one model over one paged pool; see the module docstring for the schedule.

    ``num_blocks`` fixes the pool (default: room for ``max_seqs`` uncompressed sequences of
    ``max_tokens_per_head``, itself defaulting to the model's context). ``watermark_blocks`` is the headroom
    admission leaves for running sequences to grow (default: one block per (layer, kv head)). ``keep_logits``
    keeps each request's last logits in its output. ``observe_decode=False`` keeps decode steps from feeding the
    policy (the bookkeeping-free baseline of the overhead benchmark). ``cuda_graphs`` replays decode steps from
    CUDA graphs (:mod:`kvcompress.decode_graphs`); None (default) turns them on wherever the model is on CUDA.
    """

    model: PreTrainedModel
    compressor: Compressor | None = None
    num_blocks: int | None = None
    block_size: int = 16
    max_seqs: int = 16
    max_tokens_per_head: int | None = None
    prefill_chunk: int = 2048
    max_prefill_tokens: int = 4096
    watermark_blocks: int | None = None
    keep_logits: bool = False
    observe_decode: bool = True
    cuda_graphs: bool | None = None
    stats: EngineStats = field(init=False, default_factory=EngineStats)

    def __post_init__(self) -> None:
        if self.max_prefill_tokens < 1 or self.prefill_chunk < 1 or self.max_seqs < 1:
            raise ValueError("max_seqs, prefill_chunk and max_prefill_tokens must be >= 1")
        max_tokens = self.max_tokens_per_head or int(self.model.config.max_position_embeddings)
        budget = self.compressor.budget if self.compressor is not None else None
        summaries = budget is not None and budget.ever_folds
        self.cache: PagedKVCache = make_cache(
            self.model,
            self.max_seqs,
            max_tokens,
            self.num_blocks,
            self.block_size,
            summaries,
            budget.summary_sketch if summaries else 0,
            budget.summary_sketch_tails if summaries else "uniform",
        )
        on_cuda = self.cache.device.type == "cuda"
        if self.cuda_graphs and not on_cuda:
            raise ValueError(
                f"cuda_graphs=True needs the model on a CUDA device, but it is on {self.cache.device}; leave "
                "cuda_graphs unset (null) to use them wherever CUDA is, or set it to false"
            )
        graphs = on_cuda if self.cuda_graphs is None else self.cuda_graphs
        self.runner = ModelRunner(self.model, self.cache, graph_batch=self.max_seqs if graphs else 0)
        if self.runner.graphs is not None:
            with paged_attention(self.model):
                self.runner.graphs.record_all(self._decode_powers())
        heads = self.cache.num_layers * self.cache.num_kv_heads
        self.watermark = heads if self.watermark_blocks is None else self.watermark_blocks
        self.step_no = 0
        self.waiting: deque[_Queued] = deque()
        self.running: list[Sequence] = []  # in admission order; parents of shared prompts included
        self.parents: dict[Hashable, Sequence] = {}
        self.finished: dict[int | str, RequestOutput] = {}

    def _decode_powers(self) -> set[int]:
        """The ``decode_power`` values this engine's decode steps replay graphs with: 0 (no sequence of the batch
        observed), and the policy's when it accumulates scores in the kernel (a policy that reads the probabilities
        in Python decodes eagerly while observed)."""
        policy = self.compressor.policy if self.compressor is not None else None
        if policy is None or not self.observe_decode or policy.wants_decode_probs or not policy.evicts:
            return {0}
        return {0, policy.decode_power}

    # ------------------------------------------------------------------ requests
    def add_request(self, request: Request) -> None:
        """Queue a request; raises ``ValueError`` when it could never run on this engine, whatever else runs."""
        rid = request.request_id
        n = len(request.prompt_ids) + len(request.question_ids)
        if not request.prompt_ids or request.max_new_tokens < 0:
            raise ValueError(
                f"request {rid!r}: needs a non-empty prompt and max_new_tokens >= 0 "
                f"(got {len(request.prompt_ids)} prompt tokens, max_new_tokens={request.max_new_tokens})"
            )
        longest = self.cache.max_blocks_per_head * self.block_size
        peak = peak_tokens(request, self.compressor)
        if peak > longest:
            raise ValueError(
                f"request {rid!r}: {n} prompt + {request.max_new_tokens} new tokens (or the prompt and the policy's "
                f"reconstruction of it: {peak} tokens at the peak) exceed the engine's max_tokens_per_head={longest}; "
                "build the Engine with a larger max_tokens_per_head"
            )
        alone = self._blocks_for(peak)
        if alone > self.cache.num_blocks:
            raise ValueError(
                f"request {rid!r}: {n} prompt + {request.max_new_tokens} new tokens need {alone} blocks "
                f"uncompressed, but the pool has {self.cache.num_blocks}; raise num_blocks"
            )
        if request.budget is not None:
            if self.compressor is None:
                raise ValueError(f"request {rid!r} brings a budget, but the engine has no compressor to apply it")
            self.compressor.check_budget(request.budget)
            if request.budget.ever_folds and self.cache.slot_bias is None:
                raise ValueError(
                    f"request {rid!r} asks for budget.summary_slots={request.budget.summary_slots}, but the engine's "
                    "cache has no summary slots: give the engine's compressor a budget with summary_slots > 0 (and "
                    "a ratio at most its summary_max_ratio)"
                )
            sketch = self.cache.slot_sketch
            rank = 0 if sketch is None else sketch.shape[-2]
            asked = (request.budget.summary_sketch, request.budget.summary_sketch_tails)
            if request.budget.summary_sketch and asked != (rank, self.cache.sketch_tails):
                raise ValueError(
                    f"request {rid!r} asks for budget.summary_sketch={asked[0]} with {asked[1]} tails, but the "
                    f"engine's cache keeps sketches of rank {rank} with {self.cache.sketch_tails} tails: give the "
                    "engine's compressor the same summary_sketch and summary_sketch_tails"
                )
        budget = self._budget(request)
        if budget is not None and budget.summary_offset:  # a file measured for another model fails here, not later
            self.compressor.summary_offsets(budget, self.cache)
        forced = len(request.forced_ids)
        if forced and request.max_new_tokens > forced:
            raise ValueError(
                f"request {rid!r}: max_new_tokens={request.max_new_tokens} but only {forced} forced_ids to emit; "
                f"a teacher-forced request emits at most its forced tokens (set max_new_tokens <= {forced})"
            )
        vocab = int(self.model.config.vocab_size) if forced else 0
        bad = next((t for t in request.forced_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"request {rid!r}: forced token id {bad} is outside the model's vocabulary [0, {vocab})")
        known = [*self._all_requests()]
        if rid in self.finished or any(r.request_id == rid for r in known):
            raise ValueError(f"request id {rid!r} is already in the engine")
        if request.share_prefix is not None:
            other = next((r for r in known if r.share_prefix == request.share_prefix), None)
            if other is not None and list(other.prompt_ids) != list(request.prompt_ids):
                raise ValueError(
                    f"request {rid!r}: share_prefix {request.share_prefix!r} is already used by request "
                    f"{other.request_id!r} with a different prompt; requests sharing a prefix need identical prompts"
                )
        self.waiting.append(_Queued(request, forcing=Forcing() if forced else None))

    def _all_requests(self) -> Iterable[Request]:
        yield from (q.request for q in self.waiting)
        yield from (s.request for s in self.running if s.request is not None)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or any(s.request is not None for s in self.running))

    def _blocks_for(self, tokens: int) -> int:
        return PagedKVCache.blocks_for(self.cache.num_layers, self.cache.num_kv_heads, tokens, 1, self.block_size)

    def _budget(self, request: Request) -> Budget | None:
        """The budget a request is held to (None without a compressor)."""
        if self.compressor is None:
            return None
        return request.budget or self.compressor.budget

    def _compresses(self, budget: Budget | None) -> bool:
        return self.compressor is not None and self.compressor.compresses(budget)

    def _reconstruction(self, request: Request, observes: bool) -> list[ReconstructionPass]:
        """Passes of tokens teacher-forced after an observed prompt and released before it is compressed (KVzip's
        reconstruction of the context), else none."""
        if not observes or self.compressor is None:
            return []
        return self.compressor.policy.reconstruction(request.prompt_ids)

    def _parent_observes(self) -> bool:
        return self.compressor is not None and self.compressor.policy.evicts

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Admit, prefill packed chunks, decode every running sequence once; returns the requests finished now.

        The model's attention is switched to the paged cache for the step; a caller stepping in a loop can hold the
        switch across steps with :func:`~kvcompress.model_runner.paged_attention` (as :meth:`run` does), which
        saves walking the model's modules twice per step."""
        done_before = len(self.finished)
        blocked = self._admit()
        # admission failed while only prefilled parents hold the pool: their forks do not fit, and nothing would
        # ever free it (judged now: slots that decoding frees later in the step are not a reason to release)
        stuck = blocked and all(s.request is None and not s.prefilling for s in self.running)
        with paged_attention(self.model):
            self._prefill_step()
            self._decode_step()
        self._release_idle_parents(stuck)
        self.stats.steps += 1
        self.stats.peak_blocks = self.cache.peak_blocks  # the cache keeps the running maximum
        self.step_no += 1
        return list(self.finished.values())[done_before:]

    def run(self, requests: Iterable[Request] = (), progress: bool = False) -> list[RequestOutput]:
        """Add ``requests``, step until every request has finished; outputs in the order requests were added."""
        order = list(self.finished)
        for r in requests:
            self.add_request(r)
        order += [r.request_id for r in self._all_requests() if r.request_id not in order]
        with tqdm(total=len(order), desc="requests", disable=not progress) as bar, paged_attention(self.model):
            bar.update(len(self.finished))
            while self.has_unfinished:
                bar.update(len(self.step()))
        return [self.finished[i] for i in order]

    # ------------------------------------------------------------------ admission
    def _admit(self) -> bool:
        """Admit what fits; returns whether an arrived request was left waiting for lack of room or slots."""
        blocked = False
        promised = sum(self._prefill_blocks_left(s) for s in self.running if s.prefilling)
        owed = sum(self._sharers(k) for k in self.parents)  # slots the admitted parents' waiting children will take
        skipped: list[_Queued] = []  # children waiting for their parent's prefill keep their place
        while self.waiting and self.waiting[0].request.arrival_step <= self.step_no:
            queued = self.waiting[0]
            blocked = True  # cleared below when the loop runs dry rather than breaking
            if len(self.running) >= self.max_seqs:
                break
            key = queued.request.share_prefix
            parent = self.parents.get(key) if key is not None else None
            if parent is not None and parent.prefilling:
                skipped.append(self.waiting.popleft())
                blocked = False
                continue
            if parent is not None:
                need = int(self.cache.num_blocks_held[:, parent.seq_id].sum())
                need += self.cache.blocks_needed([parent.seq_id], [len(self._suffix(queued))])
            elif key is not None and self.max_seqs > 1 and (sharers := self._sharers(key)) > 1:
                # a new parent waits until the slots it and (up to the engine's width) its forks take are free
                # beyond those owed to earlier parents' children, so parents never crowd out the forks they exist for
                if self.max_seqs - len(self.running) - owed < 1 + min(sharers, self.max_seqs - 1):
                    break
                recon = self._reconstruction(queued.request, self._parent_observes())
                need = self._blocks_for(len(queued.request.prompt_ids) + pass_peak(recon))
                if not self._fits(need, promised):
                    break
                self._start_parent(queued.request)
                promised += need
                owed += sharers
                blocked = False
                continue
            else:
                recon = self._reconstruction(queued.request, self._compresses(self._budget(queued.request)))
                after = max(len(self._suffix(queued)), pass_peak(recon))  # released before the suffix
                need = self._blocks_for(len(queued.request.prompt_ids) + after)
            if not self._fits(need, promised):
                break
            self.waiting.popleft()
            self.stats.recomputed_tokens += len(queued.generated)
            if parent is not None:
                self._fork_child(parent, queued)
                owed -= 1
            else:
                self._start(queued)
                promised += need
            blocked = False
        self.waiting.extendleft(reversed(skipped))
        self.stats.peak_running = max(self.stats.peak_running, len(self.running))
        return blocked

    def _fits(self, need: int, promised: int) -> bool:
        # an idle engine admits the head request whatever the watermark: it fits alone (checked on add)
        headroom = self.watermark if self.running else 0
        return self.cache.num_free_blocks - promised >= need + headroom

    def _sharers(self, key: Hashable) -> int:
        return sum(q.request.share_prefix == key for q in self.waiting)

    @staticmethod
    def _suffix(queued: _Queued) -> list[int]:
        """What is prefilled after the prompt's compression: the question, then tokens generated before a
        preemption."""
        return [*queued.request.question_ids, *queued.generated]

    def _prefill_blocks_left(self, s: Sequence) -> int:
        end = max(len(s.tokens), (s.compress_at or 0) + pass_peak(s.reconstruct))
        return self.cache.blocks_needed([s.seq_id], [end - s.prefilled])

    def _window(self, observes: bool) -> int:
        return self.compressor.window if observes and self.compressor is not None else 0

    def _start(self, queued: _Queued) -> None:
        r = queued.request
        budget = self._budget(r)
        observes = self._compresses(budget)
        prompt, tokens = len(r.prompt_ids), [*r.prompt_ids, *self._suffix(queued)]
        chunks = plan_chunks(0, prompt, self.prefill_chunk, self._window(observes))
        chunks += plan_chunks(prompt, len(tokens), self.prefill_chunk, 0)
        seq_id = self.cache.add_sequence(peak_tokens(r, self.compressor))
        seq = Sequence(
            r, seq_id, budget, tokens, chunks, prompt if observes else None, self.step_no,
            generated=queued.generated, preemptions=queued.preemptions, reconstruct=self._reconstruction(r, observes),
            forcing=queued.forcing,
        )  # fmt: skip
        self.running.append(seq)

    def _start_parent(self, request: Request) -> None:
        """A parent sequence that prefills a shared prompt once (observed whenever the policy evicts: its
        children's budgets decide later whether it is compressed once for all of them or each fork on its own)."""
        key, tokens = request.share_prefix, list(request.prompt_ids)
        observes = self._parent_observes()
        chunks = plan_chunks(0, len(tokens), self.prefill_chunk, self._window(observes))
        recon = self._reconstruction(request, observes)
        seq_id = self.cache.add_sequence(len(tokens) + pass_peak(recon))
        parent = Sequence(None, seq_id, None, tokens, chunks, len(tokens), self.step_no)
        parent.reconstruct = recon
        parent.share_key, parent.share_count = key, self._sharers(key)
        self.parents[key] = parent
        self.running.append(parent)
        self.stats.shared_prefills += 1

    def _fork_child(self, parent: Sequence, queued: _Queued) -> None:
        """A request of a shared prompt: fork the parent, compress the fork unless the parent already was to this
        request's budget, then prefill the suffix (or decode straight away)."""
        r = queued.request
        child_id = self.cache.fork(parent.seq_id, peak_tokens(r, self.compressor))
        if self.compressor is not None:
            self.compressor.fork(parent.seq_id, child_id)
        budget = self._budget(r)
        prompt, tokens = len(r.prompt_ids), [*r.prompt_ids, *self._suffix(queued)]
        chunks = plan_chunks(prompt, len(tokens), self.prefill_chunk, 0)
        seq = Sequence(
            r, child_id, budget, tokens, chunks, None, self.step_no,
            generated=queued.generated, preemptions=queued.preemptions, forcing=queued.forcing,
        )  # fmt: skip
        seq.prefill_s = parent.prefill_s / parent.share_count
        seq.compress_s = parent.compress_s / parent.share_count
        seq.reconstruct_s = parent.reconstruct_s / parent.share_count
        self.running.append(seq)
        self.stats.forks += 1
        if self._compresses(budget) and parent.compressed_for != budget:
            self._compress([seq])
        if not chunks:
            assert parent.pending is not None and parent.last_logits is not None
            self._pend([seq], parent.last_logits[None], [parent.pending])
            seq.last_logits = parent.last_logits if self.keep_logits else None
            seq.memory = self.cache.memory([child_id])

    def _release_idle_parents(self, stuck: bool) -> None:
        """Release prefilled parents no waiting request needs, and every prefilled parent when admission was
        ``stuck`` (only they held the pool and the head request did not fit), so the head request runs on its own."""
        for parent in [p for p in self.parents.values() if not p.prefilling]:
            if stuck or not self._sharers(parent.share_key):
                self._drop(parent)

    # ------------------------------------------------------------------ prefill
    def _prefill_step(self) -> None:
        """Packed forwards of prompt chunks (several sequences), oldest admissions first; one forward per distinct
        observation window among the picked chunks."""
        picked: list[Sequence] = []
        tokens = 0
        for s in self.running:
            if not s.prefilling:
                continue
            a, b, _ = s.chunks[0]
            if picked and tokens + (b - a) > self.max_prefill_tokens:
                break
            picked.append(s)
            tokens += b - a
        picked = self._fit(picked) if picked else []
        groups: dict[int, list[Sequence]] = defaultdict(list)  # grouped before any forward pops a chunk
        for s in picked:
            groups[s.chunks[0][2]].append(s)
        for window in sorted(groups):
            self._prefill_forward(groups[window], window)

    def _prefill_forward(self, group: list[Sequence], window: int) -> None:
        t0 = time.perf_counter()
        spans = [s.chunks.popleft() for s in group]
        counts = [b - a for a, b, _ in spans]
        tokens = [s.tokens[a:b] for s, (a, b, _) in zip(group, spans, strict=True)]
        logits = self.runner.forward([s.seq_id for s in group], tokens, self.compressor, window)
        done = [i for i, s in enumerate(group) if not s.chunks]
        sampled = ModelRunner.sample(logits[done]) if done else []
        dt = time.perf_counter() - t0
        self.stats.prefill_s += dt
        self.stats.prefill_tokens += sum(counts)
        for s, n in zip(group, counts, strict=True):
            s.prefill_s += dt * n / sum(counts)
        self._pend([group[i] for i in done], logits[done], sampled)
        for i in done:  # a parent's logits give the first token of its forks that have no suffix to prefill
            if self.keep_logits or group[i].request is None:
                group[i].last_logits = logits[i].clone()
        due = [s for s, (_, b, _) in zip(group, spans, strict=True) if s.compress_at == b]
        for parent in [s for s in due if s.request is None]:
            self._compress_parent(parent)
        self._compress([s for s in due if s.request is not None])
        for i in done:
            if group[i].request is not None:
                group[i].memory = self.cache.memory([group[i].seq_id])

    def _compress_parent(self, parent: Sequence) -> None:
        """Compress a shared prompt once when every request waiting on it is held to the same budget (its
        reconstruction, if the policy has one, runs either way: the forks inherit its scores)."""
        parent.compress_at = None
        self._reconstruct([parent])
        budgets = [self._budget(q.request) for q in self.waiting if q.request.share_prefix == parent.share_key]
        if budgets and all(b == budgets[0] for b in budgets) and self._compresses(budgets[0]):
            parent.budget = budgets[0]
            self._compress([parent])
            parent.compressed_for = budgets[0]

    def _fit(self, picked: list[Sequence]) -> list[Sequence]:
        """Drop the newest picked chunks until the rest fit the pool. If not even the oldest fits, compress the
        decoding sequences and preempt sequences admitted after it; failing that, skip prefill this step and let
        decoding sequences finish (they free their blocks)."""
        while len(picked) > 1 and self._chunk_blocks(picked) > self.cache.num_free_blocks:
            picked = picked[:-1]
        need = self._chunk_blocks(picked)
        if need <= self.cache.num_free_blocks or self._make_room(need, keep=picked[0]):
            return picked
        if any(s.decoding for s in self.running):
            return []
        raise PoolExhaustedError(need, self.cache.num_free_blocks, self.cache.num_blocks)  # add_request prevents it

    def _chunk_blocks(self, picked: list[Sequence]) -> int:
        return self.cache.blocks_needed([s.seq_id for s in picked], [s.chunks[0][1] - s.chunks[0][0] for s in picked])

    def _pend(self, seqs: list[Sequence], logits: torch.Tensor, greedy: list[int]) -> None:
        """Each of ``seqs`` takes its next token from its row of ``logits`` (``[len(seqs), vocab]``): the greedy one,
        or for a teacher-forced request its next forced token, whose log-probability is gathered on the device (one
        gather for every forced row; read back when the request finishes) beside the greedy token."""
        rows = [i for i, s in enumerate(seqs) if s.forcing is not None]
        for s, tok in zip(seqs, greedy, strict=True):
            s.pending = tok
        if not rows:
            return
        forced = [seqs[i].request.forced_ids[len(seqs[i].generated)] for i in rows]  # type: ignore[union-attr]
        index = self.cache.upload(np.asarray([rows, forced], dtype=np.int64), torch.long)
        picked = logits[index[0]].float().log_softmax(-1)  # only the forced rows: [len(rows), vocab]
        logprobs = picked.gather(-1, index[1][:, None])[:, 0]
        for j, (i, tok) in enumerate(zip(rows, forced, strict=True)):
            forcing = seqs[i].forcing
            assert forcing is not None
            seqs[i].pending = tok
            forcing.pending_logprob, forcing.pending_greedy = logprobs[j], greedy[i]

    # ------------------------------------------------------------------ decode
    def _decode_step(self) -> None:
        t0 = time.perf_counter()
        for s in [s for s in self.running if s.decoding and s.pending is not None]:
            assert s.request is not None
            tok, s.pending = s.pending, None
            if s.request.max_new_tokens == 0:
                self._finish(s, "length")
            elif tok in s.request.eos_token_ids:
                self._finish(s, "eos")
            else:
                s.generated.append(tok)
                if s.forcing is not None:
                    s.forcing.emit()
                self.stats.generated_tokens += 1
                if len(s.generated) >= s.request.max_new_tokens:
                    self._finish(s, "length")
        batch = [s for s in self.running if s.decoding]
        if not batch:
            return
        need = self.cache.blocks_needed([s.seq_id for s in batch], [1] * len(batch))
        if need > self.cache.num_free_blocks:
            self._make_room(need, keep=None)
            batch = [s for s in self.running if s.decoding]
            if not batch:
                return
        self.stats.peak_decode_batch = max(self.stats.peak_decode_batch, len(batch))
        observes = self.observe_decode and any(self._compresses(s.budget) for s in batch)
        observer = self.compressor if observes else None
        logits = self.runner.forward([s.seq_id for s in batch], [[s.generated[-1]] for s in batch], observer)
        sampled = ModelRunner.sample(logits)
        self._pend(batch, logits, sampled)
        dt = time.perf_counter() - t0
        self.stats.decode_tokens += len(batch)
        self.stats.decode_s += dt
        due = []
        for row, s in enumerate(batch):
            s.decode_s += dt / len(batch)
            s.decode_steps += 1
            if self.keep_logits:
                s.last_logits = logits[row].clone()
            every = s.budget.compress_every if s.budget is not None else 0
            if every and s.decode_steps % every == 0 and self._compresses(s.budget):
                due.append(s)
        self._compress(due)

    # ------------------------------------------------------------------ compression and memory pressure
    def _compress(self, seqs: list[Sequence]) -> int:
        """The one place compression runs: each sequence down to its own budget, timed once and shared out. A
        sequence that still owes its policy a reconstruction (KVzip) gets it first, timed apart (``reconstruct_s``)."""
        seqs = [s for s in seqs if self._compresses(s.budget)]
        for s in seqs:
            s.compress_at = None
        self._reconstruct(seqs)
        seqs = [s for s in seqs if s in self.running]  # making room for a reconstruction may preempt
        if not seqs or self.compressor is None:
            return 0
        t0 = time.perf_counter()
        freed = 0
        groups: list[tuple[Budget | None, list[int]]] = []
        for s in seqs:
            group = next((g for b, g in groups if b == s.budget), None)
            if group is None:
                groups.append((s.budget, group := []))
            group.append(s.seq_id)
        for budget, ids in groups:
            freed += self.compressor.compress(self.cache, ids, budget)
        dt = time.perf_counter() - t0
        for s in seqs:
            s.compress_s += dt / len(seqs)
        self.stats.compress_s += dt
        self.stats.compressions += 1
        self.stats.blocks_freed += freed
        return freed

    def _reconstruct(self, seqs: list[Sequence]) -> None:
        """Score by reconstruction each of ``seqs`` that owes it: each pass teacher-forces its tokens after the
        prompt's first ``visible`` tokens (the rest hidden, :meth:`~kvcompress.cache.paged.PagedKVCache.rewound`)
        in chunks of ``prefill_chunk`` (each attends to the visible prompt and the pass's tokens before it), every
        query observed (kept only for the positions the pass ``scored``, when it says), then truncates them off,
        so the cache is back to the prompt (``seen`` included). Costs
        about one more prefill of the prompt; timed into ``reconstruct_s``."""
        for s in [s for s in seqs if s.reconstruct]:
            t0 = time.perf_counter()
            passes, s.reconstruct = s.reconstruct, []
            need = self.cache.blocks_needed([s.seq_id], [pass_peak(passes)])
            if need > self.cache.num_free_blocks and not self._make_room(need, keep=s):
                raise PoolExhaustedError(need, self.cache.num_free_blocks, self.cache.num_blocks)
            for p in passes:
                with self.cache.rewound(s.seq_id, p.visible, p.scored):
                    for a in range(0, len(p.tokens), self.prefill_chunk):
                        self.runner.forward([s.seq_id], [p.tokens[a : a + self.prefill_chunk]], self.compressor, -1)
            dt = time.perf_counter() - t0
            s.reconstruct_s += dt
            self.stats.reconstruct_s += dt
            self.stats.reconstruct_tokens += sum(len(p.tokens) for p in passes)

    def _make_room(self, need: int, keep: Sequence | None) -> bool:
        """Free blocks until ``need`` are free: compress the decoding sequences, then preempt the newest ones.

        With ``keep`` (a prefill that needs room) only sequences admitted after it may be preempted; with None (a
        decode step) any may, newest first, and ``need`` shrinks as victims leave the batch. Returns whether
        ``need`` blocks are now free.
        """
        decoding = [s for s in self.running if s.decoding]
        if decoding and any(self._compresses(s.budget) for s in decoding):
            self._compress(decoding)
            self.stats.pressure_compressions += 1
        while self.cache.num_free_blocks < need:
            victims = self.running[self.running.index(keep) + 1 :] if keep is not None else self.running
            if not victims:
                return False
            self._preempt(victims[-1])
            if keep is None:  # a decode step: the victim no longer needs its next block either
                ids = [s.seq_id for s in self.running if s.decoding]
                need = self.cache.blocks_needed(ids, [1] * len(ids))
        return True

    def _drop(self, s: Sequence) -> None:
        """Release a sequence's cache (and the policy's state for it)."""
        self.cache.release(s.seq_id)
        if self.compressor is not None:
            self.compressor.release(s.seq_id)
        self.running.remove(s)
        if s.request is None:
            del self.parents[s.share_key]

    def _preempt(self, s: Sequence) -> None:
        """Release a sequence's blocks and requeue its request first in line, keeping what it has generated."""
        self._drop(s)
        if s.request is not None:
            forcing = s.forcing.requeued() if s.forcing is not None else None
            self.waiting.appendleft(_Queued(s.request, s.generated, s.preemptions + 1, forcing))
            self.stats.preemptions += 1

    def _finish(self, s: Sequence, reason: str) -> None:
        assert s.request is not None
        memory_end = self.cache.memory([s.seq_id])
        self._drop(s)
        self.finished[s.request.request_id] = s.output(reason, self.step_no, memory_end)
