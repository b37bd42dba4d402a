"""Prefill of fresh sequences (nothing cached before this forward) straight from the new q/k/v.

A prompt chunk with no cached prefix needs nothing from the pool: its keys are the ones just computed, in
position order. It attends with torch's fused ``scaled_dot_product_attention`` (flash or memory-efficient on a
GPU, the fused CPU kernel on CPU), which is faster than any paged kernel can be; only the observation window gets
explicit probabilities, in a small second pass. The keys and values are written into the pool by the caller, as
for any other forward. Chunks that attend to a cached (possibly compacted) prefix go through
:func:`~kvcompress_kernels.paged_prefill` instead.

The reference for this path is :func:`~kvcompress_kernels.paged_prefill_torch` on the same tokens after they were
written to the pool (``tests/kernels/test_dense_prefill.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dense_prefill"]


def dense_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    counts: list[int],
    scale: float,
    *,
    obs_window: int = 0,
    obs_power: int = 1,
    obs_reduce: str = "sum",
    obs_exclude: tuple[int, int] = (0, 0),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of packed fresh sequences over their own tokens.

    Args:
        q: ``[T_total, H_q, D]``; k, v: ``[T_total, H_kv, D]``: every sequence's tokens, packed in order (RoPE
            applied). ``counts``: tokens per sequence (host ints, summing to ``T_total``).
        obs_window, obs_power, obs_reduce, obs_exclude: as for :func:`~kvcompress_kernels.paged_prefill`
            (``obs_window >= counts[b]`` observes every query of sequence b).

    Returns:
        ``(out, obs)``: ``out`` ``[T_total, H_q, D]`` in ``q.dtype``; ``obs`` ``[B, H_q, max(counts)]`` float32
        (slot j = token j of the sequence, 0 past its length) or None when ``obs_window`` is 0.
    """
    total, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    longest = max(counts, default=0)
    obs = q.new_zeros((len(counts), num_q_heads, longest), dtype=torch.float32) if obs_window > 0 else None
    start = 0
    for b, n in enumerate(counts):
        end = start + n
        if n == 0:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # [1, H, n, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        out[start:end] = o[0].transpose(0, 1)
        if obs is not None:
            w = min(obs_window, n)
            qw = qs[0, :, n - w :].float().view(num_kv_heads, group, w, head_dim)
            logits = torch.matmul(qw, ks[0].float().transpose(-1, -2)[:, None]) * scale  # [H_kv, G, w, n]
            keys = torch.arange(n, device=q.device)
            hidden = keys[None, :] > torch.arange(n - w, n, device=q.device)[:, None]  # [w, n]: the future
            hidden |= (keys >= obs_exclude[0]) & (keys < obs_exclude[1])  # out of the observation, as in paged_prefill
            probs = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1).nan_to_num_(0.0).pow(obs_power)
            reduced = probs.amax(dim=2) if obs_reduce == "max" else probs.sum(dim=2)
            obs[b, :, :n] = reduced.reshape(num_q_heads, n)
        start = end
    return out, obs
