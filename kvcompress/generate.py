"""Greedy generation through the paged per-head cache, with optional compression.

:class:`PagedGenerator` owns a :class:`PagedKVCache` sized for a model and drives the model's forward with our
registered attention (``kvcompress_paged``). Prefill runs one sequence at a time (chunked when long); decode runs
every active sequence in one batched forward, with no padding because each head reads its own block table.

Two evaluation modes (design.md section 4):

* ``query_aware``: the whole prompt (context + question) is prefilled, then compressed, then decoded.
* ``query_agnostic``: the context is prefilled and compressed before the question is seen; the question is
  then prefilled on top of the compressed cache. :meth:`PagedGenerator.fork` lets several questions share one
  compressed context.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from kvcompress.attention import ATTN_IMPLEMENTATION
from kvcompress.cache.paged import MemoryStats, PagedKVCache
from kvcompress.cache.step import ForwardStep
from kvcompress.compressor import Compressor

MODES = ("query_aware", "query_agnostic")


@contextlib.contextmanager
def paged_attention(model: PreTrainedModel) -> Iterator[None]:
    """Route the model's attention through the paged cache for the duration of the block (re-entrant: an inner
    block inside an outer one changes nothing, so a decode loop switches once, not once per step)."""
    previous = model.config._attn_implementation
    if previous == ATTN_IMPLEMENTATION:
        yield
        return
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def model_kv_geometry(model: PreTrainedModel) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a Llama/Mistral/Qwen-family config."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim


@dataclass
class SequenceResult:
    """One prompt's generation: new token ids, the logits of the last step, and the cache accounting."""

    tokens: list[int]
    last_logits: torch.Tensor | None
    memory: MemoryStats
    prompt_tokens: int


@dataclass
class PagedGenerator:
    """Greedy generation for one model over one paged cache.

    ``num_blocks`` defaults to a pool that holds ``max_seqs`` uncompressed sequences of ``max_tokens_per_head``.
    """

    model: PreTrainedModel
    compressor: Compressor | None = None
    block_size: int = 16
    max_seqs: int = 1
    max_tokens_per_head: int | None = None
    num_blocks: int | None = None
    prefill_chunk: int = 2048
    cache: PagedKVCache = field(init=False)
    timings: dict[str, float] = field(init=False, default_factory=lambda: {"prefill_s": 0.0, "decode_s": 0.0})

    def __post_init__(self) -> None:
        layers, heads, head_dim = model_kv_geometry(self.model)
        max_tokens = self.max_tokens_per_head or self.model.config.max_position_embeddings
        num_blocks = self.num_blocks or PagedKVCache.blocks_for(
            layers, heads, max_tokens, self.max_seqs, self.block_size
        )
        param = next(self.model.parameters())
        self.cache = PagedKVCache(
            layers, heads, head_dim, num_blocks, self.block_size, self.max_seqs, max_tokens, param.dtype, param.device
        )
        self.device = param.device

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, seq_ids: list[int], tokens: list[Sequence[int]], observe_window: int = 0) -> torch.Tensor:
        """One forward of new tokens for several sequences; returns the last token's logits ``[B, vocab]``.

        Blocks for every layer are reserved first, so a full pool raises before the cache changes.
        ``observe_window`` is the number of trailing queries whose attention the compressor records (prefill).
        """
        counts = [len(t) for t in tokens]
        self.cache.reserve(seq_ids, counts)
        decode = all(c == 1 for c in counts)
        flat = torch.tensor([t for ts in tokens for t in ts], device=self.device)
        starts = [int(self.cache.seen[s]) for s in seq_ids]
        positions = torch.cat([torch.arange(a, a + c) for a, c in zip(starts, counts, strict=True)]).to(self.device)
        cu = torch.tensor([0, *counts], device=self.device).cumsum(0)
        step = ForwardStep(self.cache, seq_ids, cu, positions)
        if self.compressor is not None:
            self.compressor.configure_step(step, observe_window if not decode else 0)
        shape = (len(seq_ids), 1) if decode else (1, -1)
        with paged_attention(self.model):
            out = self.model(
                input_ids=flat.view(shape),
                position_ids=positions.view(shape),
                use_cache=False,
                kvc_step=step,
                logits_to_keep=0 if decode else cu[1:] - 1,
            )
        self.cache.advance(seq_ids, counts)
        return out.logits.reshape(len(seq_ids), -1).float()

    def prefill(self, seq_id: int, token_ids: Sequence[int], observe: bool = True) -> torch.Tensor:
        """Prefill ``token_ids`` into ``seq_id`` in chunks; the compressor observes the trailing window."""
        t0 = time.perf_counter()
        window = self.compressor.observe_window(len(token_ids)) if (self.compressor and observe) else 0
        chunks = _chunks(len(token_ids), self.prefill_chunk, window)
        logits = None
        for a, b in chunks:
            all_queries = window < 0
            w = window if (all_queries or b == len(token_ids)) else 0
            logits = self.forward([seq_id], [token_ids[a:b]], observe_window=w)
        self.timings["prefill_s"] += time.perf_counter() - t0
        assert logits is not None, "prefill of an empty token list"
        return logits[0]

    def compress(self, seq_ids: list[int]) -> None:
        if self.compressor is not None:
            self.compressor.compress(self.cache, seq_ids)

    def fork(self, seq_id: int) -> int:
        """Copy a sequence (its compressed cache included) into a new sequence slot; returns the new id."""
        return self.cache.fork(seq_id)

    @torch.no_grad()
    def decode(
        self,
        seq_ids: list[int],
        first_logits: torch.Tensor,
        max_new_tokens: int | Sequence[int],
        eos_token_ids: Sequence[int] = (),
    ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Greedy batched decode from each sequence's last prefill logits (``[B, vocab]``).

        Returns the generated ids per sequence (EOS excluded) and each one's final-step logits.
        """
        t0 = time.perf_counter()
        limits = [max_new_tokens] * len(seq_ids) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        eos = set(eos_token_ids)
        out: list[list[int]] = [[] for _ in seq_ids]
        last = list(first_logits)
        active = [i for i in range(len(seq_ids)) if limits[i] > 0]
        pending = {i: int(first_logits[i].argmax()) for i in active}
        steps = 0
        with paged_attention(self.model):  # switched once for the whole loop, not per step
            while active:
                for i in list(active):
                    tok = pending[i]
                    if tok in eos:
                        active.remove(i)
                        continue
                    out[i].append(tok)
                    if len(out[i]) >= limits[i]:
                        active.remove(i)
                if not active:
                    break
                logits = self.forward([seq_ids[i] for i in active], [[pending[i]] for i in active])
                steps += 1
                for row, i in enumerate(active):
                    last[i] = logits[row]
                    pending[i] = int(logits[row].argmax())
                if self.compressor is not None and self.compressor.due(steps):
                    self.compress([seq_ids[i] for i in active])
        self.timings["decode_s"] += time.perf_counter() - t0
        return out, last


def _chunks(n: int, size: int, window: int) -> list[tuple[int, int]]:
    """Split ``n`` prompt tokens into chunks of ``size``; the last chunk holds at least the observation window."""
    bounds = list(range(0, n, size)) + [n]
    spans = list(itertools.pairwise(bounds))
    while len(spans) > 1 and window > 0 and spans[-1][1] - spans[-1][0] < window:
        spans[-2:] = [(spans[-2][0], spans[-1][1])]
    return spans


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int] | tuple[Sequence[int], Sequence[int]]],
    compressor: Compressor | None = None,
    max_new_tokens: int = 32,
    eos_token_ids: Sequence[int] = (),
    mode: str = "query_aware",
    block_size: int = 16,
    num_blocks: int | None = None,
) -> list[SequenceResult]:
    """Greedy-generate for a batch of prompts through one shared paged cache.

    A prompt is a token list, or a ``(context_ids, question_ids)`` pair; in ``query_agnostic`` mode the context
    is compressed before the question is prefilled, in ``query_aware`` mode the whole prompt is compressed.
    The cache accounting of each sequence is taken after its prompt has been prefilled and compressed.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    pairs = [(list(p[0]), list(p[1])) if isinstance(p, tuple) else (list(p), []) for p in prompts]
    longest = max(len(c) + len(q) for c, q in pairs) + max_new_tokens
    gen = PagedGenerator(
        model,
        compressor,
        block_size=block_size,
        max_seqs=len(pairs),
        max_tokens_per_head=longest,
        num_blocks=num_blocks,
    )
    seq_ids, first, memory = [], [], []
    for context, question in pairs:
        s = gen.cache.add_sequence()
        seq_ids.append(s)
        if mode == "query_agnostic" and question:
            gen.prefill(s, context)
            gen.compress([s])
            logits = gen.prefill(s, question, observe=False)
        else:
            logits = gen.prefill(s, context + question)
            gen.compress([s])
        first.append(logits)
        memory.append(gen.cache.memory([s]))
    tokens, last = gen.decode(seq_ids, torch.stack(first), max_new_tokens, eos_token_ids)
    return [
        SequenceResult(t, lg, m, len(c) + len(q)) for t, lg, m, (c, q) in zip(tokens, last, memory, pairs, strict=True)
    ]
