"""Requests, their outputs, and the :class:`Sequence` that owns a running request's state.

A request is greedy decoding of up to ``max_new_tokens`` after a prompt. The prompt is what the policy observes
and what is compressed; ``question_ids`` are prefilled *after* that compression, unobserved: the question and
the chat template's tail in query-agnostic evaluation, only the template's tail (end of turn, assistant header)
in query-aware evaluation (:func:`kvcompress.generate.as_request`). Requests with the same ``share_prefix`` key
and the same prompt prefill it once: the engine keeps the prefilled prompt in a parent sequence and forks it per
request (several questions on one context, or one context under several budgets).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Hashable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from kvcompress.budget import Budget
from kvcompress.cache.paged import MemoryStats
from kvcompress.policies.base import ReconstructionPass


@dataclass
class Request:
    """One generation request. ``arrival_step`` is the engine step from which it may be admitted; ``budget``
    overrides the compressor's default budget for this request.

    ``forced_ids`` teacher-forces decoding: the request emits these tokens instead of its greedy ones (as many as
    ``max_new_tokens``, which may not exceed their number), and its output records each one's log-probability and
    the token greedy decoding would have emitted there. Everything else (compression, continual compression, the
    policy's observation of decode steps) runs as it would for a generated answer, so forcing the full cache's
    answer through a compressed cache measures, token by token, how much of that answer the compression keeps."""

    request_id: int | str
    prompt_ids: Seq[int]
    max_new_tokens: int
    eos_token_ids: Seq[int] = ()
    arrival_step: int = 0
    question_ids: Seq[int] = ()
    budget: Budget | None = None
    share_prefix: Hashable | None = None
    forced_ids: Seq[int] = ()


@dataclass
class RequestOutput:
    """A finished request.

    ``memory`` is its cache accounting when decoding began (prompt compressed, question prefilled), ``memory_end``
    at the end. The ``*_s`` timings are this request's share of the batched work: a packed prefill forward is
    split by tokens, a decode step and a compression call evenly over their sequences, a shared prompt over the
    requests that share it. ``reconstruct_s`` is the policy's reconstruction of the prompt before compression
    (KVzip: about one more prefill of it; 0 for other policies), counted in neither ``prefill_s`` nor
    ``compress_s``. ``last_logits`` ``[vocab]`` is kept only when the engine was asked to. A request with
    ``forced_ids`` has ``forced_logprobs`` (natural log, one per emitted token) and ``greedy_tokens`` (the argmax
    at each of those steps); others have None.
    """

    request_id: int | str
    prompt_tokens: int
    tokens: list[int]
    finish_reason: str  # "eos" | "length"
    preemptions: int
    admitted_step: int
    finished_step: int
    memory: MemoryStats | None
    memory_end: MemoryStats | None
    prefill_s: float
    decode_s: float
    compress_s: float
    reconstruct_s: float = 0.0
    last_logits: torch.Tensor | None = None
    forced_logprobs: list[float] | None = None
    greedy_tokens: list[int] | None = None


@dataclass
class Forcing:
    """A teacher-forced request's record (:attr:`Request.forced_ids`), aligned with its emitted tokens: each one's
    log-probability (0-dim device tensors, read back once, when the request finishes) and the greedy token at its
    step. The pending token's entries wait in ``pending_*`` until it is emitted, so that a preemption, which
    recomputes the pending token, records it once."""

    logprobs: list[torch.Tensor] = field(default_factory=list)
    greedy: list[int] = field(default_factory=list)
    pending_logprob: torch.Tensor | None = None
    pending_greedy: int | None = None

    def emit(self) -> None:
        """The pending token was emitted: its entries join the record."""
        assert self.pending_logprob is not None and self.pending_greedy is not None
        self.logprobs.append(self.pending_logprob)
        self.greedy.append(self.pending_greedy)
        self.pending_logprob = self.pending_greedy = None

    def requeued(self) -> Forcing:
        """What a preempted request takes back to the queue: the emitted tokens' entries."""
        return Forcing(list(self.logprobs), list(self.greedy))

    def read(self) -> tuple[list[float], list[int]]:
        """(log-probabilities, greedy tokens) of the emitted tokens; the one read-back of the log-probabilities."""
        return (torch.stack(self.logprobs).tolist() if self.logprobs else []), list(self.greedy)


def plan_chunks(start: int, end: int, size: int, window: int) -> deque[tuple[int, int, int]]:
    """Prefill spans ``(a, b, observe)`` over tokens ``[start, end)``, ``size`` tokens each. ``window`` > 0: the
    last span observes that many trailing queries and is widened to hold them; -1: every span observes all its
    queries; 0: nothing is observed."""
    bounds = [*range(start, end, size), end]
    spans = list(itertools.pairwise(bounds))
    while len(spans) > 1 and window > 0 and spans[-1][1] - spans[-1][0] < window:
        spans[-2:] = [(spans[-2][0], spans[-1][1])]
    last = len(spans) - 1
    return deque((a, b, window if window < 0 or i == last else 0) for i, (a, b) in enumerate(spans))


@dataclass
class Sequence:
    """The one owner of a request's state while it holds a cache sequence (or of a shared prompt's, for a parent).

    ``tokens`` = prompt, then the question and any tokens generated before a preemption. ``chunks`` are the
    prefill spans left; ``compress_at`` is the token count after which the sequence is compressed (None: it is not,
    or already was). ``reconstruct`` are the passes of tokens the policy wants teacher-forced after the prompt before
    it is compressed (KVzip; emptied once done). ``pending`` is the next token (argmax of the last logits, or the
    request's next forced token), not yet emitted; ``forcing`` is a teacher-forced request's record (else None).
    """

    request: Request | None  # None for a parent that holds a shared prompt
    seq_id: int
    budget: Budget | None
    tokens: list[int]
    chunks: deque[tuple[int, int, int]]
    compress_at: int | None
    admitted_step: int
    generated: list[int] = field(default_factory=list)
    preemptions: int = 0
    pending: int | None = None
    decode_steps: int = 0  # decode forwards since the last (re)admission: drives compress_every
    memory: MemoryStats | None = None
    last_logits: torch.Tensor | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compress_s: float = 0.0
    reconstruct: list[ReconstructionPass] = field(default_factory=list)
    reconstruct_s: float = 0.0
    # a parent: the key it serves, how many requests shared it when it was made, the budget it was compressed to
    share_key: Hashable | None = None
    share_count: int = 1
    compressed_for: Budget | None = None
    forcing: Forcing | None = None

    @property
    def prefilling(self) -> bool:
        return bool(self.chunks)

    @property
    def decoding(self) -> bool:
        return self.request is not None and not self.chunks and self.compress_at is None

    @property
    def prefilled(self) -> int:
        """Tokens already in the cache."""
        return self.chunks[0][0] if self.chunks else len(self.tokens)

    def output(self, reason: str, finished_step: int, memory_end: MemoryStats) -> RequestOutput:
        assert self.request is not None
        forced, greedy = self.forcing.read() if self.forcing is not None else (None, None)
        return RequestOutput(
            request_id=self.request.request_id,
            prompt_tokens=len(self.request.prompt_ids) + len(self.request.question_ids),
            tokens=self.generated,
            finish_reason=reason,
            preemptions=self.preemptions,
            admitted_step=self.admitted_step,
            finished_step=finished_step,
            memory=self.memory,
            memory_end=memory_end,
            prefill_s=self.prefill_s,
            decode_s=self.decode_s,
            compress_s=self.compress_s,
            reconstruct_s=self.reconstruct_s,
            last_logits=self.last_logits,
            forced_logprobs=forced,
            greedy_tokens=greedy,
        )
