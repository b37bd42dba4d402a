"""The model runner: one packed forward of a Hugging Face causal LM over the paged cache.

The model is called with ``use_cache=False``, explicit ``position_ids`` and ``kvc_step=<ForwardStep>``, with its
attention switched to ``kvcompress_paged`` (:func:`paged_attention`). A forward's cache metadata is built once,
for every layer, by :meth:`PagedKVCache.plan_step`; the only value a decode step reads back to the host is the
sampled tokens (:meth:`ModelRunner.sample`). On CUDA, decode steps replay CUDA graphs
(:class:`~kvcompress.decode_graphs.DecodeGraphs`) when the runner is built with ``graph_batch``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from kvcompress.attention import ATTN_IMPLEMENTATION
from kvcompress.cache.paged import PagedKVCache
from kvcompress.cache.step import ForwardStep
from kvcompress.compressor import Compressor
from kvcompress.decode_graphs import DecodeGraphs


@contextlib.contextmanager
def paged_attention(model: PreTrainedModel) -> Iterator[None]:
    """Route the model's attention through the paged cache for the duration of the block (re-entrant: an inner
    block inside an outer one changes nothing, so an engine switches once per step, not once per forward)."""
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


def make_cache(
    model: PreTrainedModel,
    max_seqs: int,
    max_tokens_per_head: int,
    num_blocks: int | None = None,
    block_size: int = 16,
    summaries: bool = False,
    sketch_rank: int = 0,
    sketch_tails: str = "uniform",
) -> PagedKVCache:
    """A cache with the model's geometry, dtype and device; ``num_blocks`` defaults to a pool that holds ``max_seqs``
    uncompressed sequences of ``max_tokens_per_head``; ``summaries`` gives it summary slots' biases, and
    ``sketch_rank`` > 0 their sketches (read with ``sketch_tails``)."""
    layers, heads, head_dim = model_kv_geometry(model)
    if num_blocks is None:
        num_blocks = PagedKVCache.blocks_for(layers, heads, max_tokens_per_head, max_seqs, block_size)
    param = next(model.parameters())
    return PagedKVCache(
        layers,
        heads,
        head_dim,
        num_blocks,
        block_size,
        max_seqs,
        max_tokens_per_head,
        param.dtype,
        param.device,
        summaries,
        sketch_rank,
        sketch_tails,
    )


class ModelRunner:
    """Runs packed forwards of ``model`` over ``cache``; with ``graph_batch`` > 0 (CUDA only), decode steps of up to
    that many sequences replay CUDA graphs (:attr:`graphs`) instead of launching every kernel."""

    def __init__(self, model: PreTrainedModel, cache: PagedKVCache, graph_batch: int = 0) -> None:
        self.model, self.cache = model, cache
        self.graphs: DecodeGraphs | None = DecodeGraphs(self, graph_batch) if graph_batch else None

    @torch.no_grad()
    def forward(
        self,
        seq_ids: list[int],
        tokens: Sequence[Sequence[int]],
        compressor: Compressor | None = None,
        observe_window: int = 0,
    ) -> torch.Tensor:
        """One forward of new tokens for several sequences; returns each sequence's last logits ``[B, vocab]``.

        Every token of a forward with more than one token per sequence goes in one packed row (varlen prefill);
        one token per sequence is a decode step (a ``[B, 1]`` batch). Blocks for every layer are reserved first,
        so a full pool raises before the cache changes. ``compressor`` (when given) observes the last
        ``observe_window`` queries of each sequence in a prefill (-1: all) and the decode attention.
        """
        counts = [len(t) for t in tokens]
        plan = self.cache.plan_step(seq_ids, counts)
        step = ForwardStep(self.cache, plan)
        if compressor is not None:
            compressor.configure_step(step, observe_window)
        flat = self.cache.upload(np.fromiter((t for ts in tokens for t in ts), np.int64), torch.long)
        with paged_attention(self.model):
            if self.graphs is not None and self.graphs.supports(step):
                return self.graphs.run(step, flat)
            decode = plan.is_decode
            shape = (len(seq_ids), 1) if decode else (1, -1)
            last = 0 if decode else self.cache.upload(np.cumsum(counts) - 1, torch.long)
            return self.run_model(step, flat.view(shape), plan.positions.view(shape), last)

    def run_model(
        self, step: ForwardStep, input_ids: torch.Tensor, position_ids: torch.Tensor, last: int | torch.Tensor
    ) -> torch.Tensor:
        """The model's forward over ``step``: ``input_ids``/``position_ids`` ``[B, 1]`` (decode) or ``[1, T]`` (packed
        prefill); ``last`` is ``logits_to_keep`` (0 for decode: every row; prefill: each sequence's last token).
        Returns float32 logits ``[sequences, vocab]``. Shared by eager forwards and graph capture."""
        out = self.model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, kvc_step=step, logits_to_keep=last
        )
        return out.logits.reshape(len(step.plan.seq_ids), -1).float()

    @staticmethod
    def sample(logits: torch.Tensor) -> list[int]:
        """Greedy tokens of ``logits`` ``[B, vocab]``: the one host read of a decode step."""
        return logits.argmax(-1).tolist()
