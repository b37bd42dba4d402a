"""Attention over the paged cache, registered with transformers' ``AttentionInterface`` as ``kvcompress_paged``.

Any Llama/Mistral/Qwen2/Qwen3 model computes q, k, v and applies RoPE as usual, then calls this function, which
writes the new keys and values into the paged cache and attends over what each kv head keeps. Causality uses the
positions stored with every slot, so a compacted (reordered) cache attends correctly and new tokens keep their
true positions without any re-rotation of kept keys.

The maths runs through :mod:`kvcompress_kernels`, which dispatches to Triton on CUDA tensors and to the torch
reference on CPU tensors.
"""

from __future__ import annotations

import torch
from kvcompress_kernels import decode_probs_torch, dense_prefill, paged_decode, paged_prefill
from torch import nn
from transformers import AttentionInterface

from kvcompress.cache.sketch import slot_term
from kvcompress.cache.step import DecodeObservation, ForwardStep, PrefillObservation

ATTN_IMPLEMENTATION = "kvcompress_paged"


def paged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``query`` ``[B, H_q, T, D]``, ``key``/``value`` ``[B, H_kv, T, D]`` -> output ``[B, T, H_q, D]``.

    The B×T tokens are the packed tokens of ``kwargs["kvc_step"]`` (decode: B sequences × 1 token; prefill:
    one row holding one or several packed sequences). Everything this layer needs to know about the cache comes
    from the step's plan, built once per forward: nothing here reads a device value back to the host.
    """
    step: ForwardStep | None = kwargs.get("kvc_step")
    if step is None:
        raise ValueError(
            f"attn_implementation '{ATTN_IMPLEMENTATION}' needs the paged cache step passed as `kvc_step=` "
            "to the model's forward; drive the model through kvcompress.engine.Engine (or its ModelRunner)"
        )
    layer = module.layer_idx
    B, Hq, T, D = query.shape
    cache, plan = step.cache, step.plan
    Hkv = key.shape[1]
    scale = scaling if scaling is not None else D**-0.5
    k, v = key.transpose(1, 2).reshape(B * T, Hkv, D), value.transpose(1, 2).reshape(B * T, Hkv, D)
    cache.write(layer, plan, k, v)
    tables, lengths, max_len = plan.block_tables[layer], plan.lengths[layer], plan.max_len[layer]
    q = query.transpose(1, 2).reshape(B * T, Hq, D)
    term = None  # each query's weight on the summary slots, from its sequence's sketch of what they fold
    if plan.sketched:
        term = slot_term(q, cache.slot_sketch[layer], plan.token_seqs, scale, cache.sketch_tails)

    if plan.is_decode:
        out = paged_decode(
            q,
            cache.k_cache,
            cache.v_cache,
            tables,
            lengths,
            scale,
            score_out=cache.slot_score if step.decode_power else None,
            score_power=step.decode_power or 1,
            max_len=max_len,
            min_len=plan.min_len[layer],
            layout=plan.layout[layer],
            slot_bias=cache.slot_bias,
            slot_term=term,
        )
        if step.decode_probs and step.observer is not None:
            layout = plan.layout[layer]  # set only when every head holds max_len tokens: no padding to mask
            probs, _ = decode_probs_torch(
                q, cache.k_cache, tables, lengths, scale, max_len, layout, cache.slot_bias, term
            )
            # probs: [B, H_kv, G, L]
            step.observer.observe_decode(cache, DecodeObservation(layer, plan.seq_ids, probs.reshape(B, Hq, -1)))
    else:
        window = step.obs_window if step.obs_window >= 0 else 1 << 30
        observe = dict(
            obs_window=window, obs_power=step.obs_power, obs_reduce=step.obs_reduce, obs_exclude=step.obs_exclude
        )
        if plan.fresh:  # no cached prefix: fused dense attention over the new tokens themselves
            out, obs = dense_prefill(q, k, v, plan.counts, scale, **observe)
        else:
            out, obs = paged_prefill(
                q,
                cache.k_cache,
                cache.v_cache,
                cache.slot_pos,
                tables,
                lengths,
                plan.positions.to(torch.int32),
                plan.cu_seqlens,
                scale,
                **observe,
                max_len=max_len,
                slot_bias=cache.slot_bias,
                slot_term=term,
            )
        if step.obs_window and step.observer is not None:
            end = 0
            for i, (s, n, start) in enumerate(zip(plan.seq_ids, plan.counts, plan.starts, strict=True)):
                end += n
                w = n if step.obs_window < 0 else min(step.obs_window, n)
                queries = q[end - w : end].transpose(0, 1)[None]
                window_probs = obs[i : i + 1] if obs is not None else None
                obs_i = PrefillObservation(
                    layer, s, w, start + n - w, window_probs, queries, _rope_theta(module), step.obs_window < 0
                )
                step.observer.observe_prefill(cache, obs_i)
    return out.view(B, T, Hq, D), None


def _rope_theta(module: nn.Module) -> float:
    params = getattr(module.config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(module.config, "rope_theta", 10000.0)))


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
