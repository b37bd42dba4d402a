"""A sketch of the keys a summary slot folded, so that each query weighs the slot by a share of its own.

One summary slot per kv head (``budget.summary_slots=1``) holds the mean key ``mu`` of the ``n`` tokens the head
evicted, with the logit bias ``log n``: every query weighs it as ``n exp(s q.mu)`` (``s = head_dim^-1/2``). Their true
summed weight is ``n exp(s q.mu) E[exp(s q.(k - mu))]``, and the last factor is each query's own: larger for a query
whose direction spreads the evicted keys' logits. ``budget.summary_sketch = r`` keeps the top ``r`` principal
directions of the evicted keys' covariance, ``W`` ``[r, D]`` per (sequence, layer, kv head), row i
``sqrt(lambda_i) u_i``, in the cache (:attr:`PagedKVCache.slot_sketch`, ``r D`` floats per head, the size of
``r / 2`` cached tokens). A query's spread along direction i is ``t_i = s q.w_i``, and the slot's logit gains

* ``uniform`` tails (the default): ``sum_i log(sinh(x_i) / x_i)``, ``x_i = sqrt(3) |t_i|``, the log-mean of
  ``exp`` over a uniform spread of that variance: it grows linearly, not quadratically, in a direction the keys span
  only so far (RoPE bounds the positional ones);
* ``gaussian`` tails: ``sum_i t_i^2 / 2``, exact for Gaussian keys; it over-weighs the slot for the queries most
  aligned with real keys' directions (docs/RESULTS.md, "A Gaussian sketch of what a head evicts").

The attention computes that term once per layer for every query (:func:`slot_term`) and the paged kernels add it to
the logit of each slot with a positive bias (``kvcompress_kernels.paged_decode``'s ``slot_term``), so one summary
slot stands for a spread of keys instead of their mean alone.
"""

from __future__ import annotations

import math

import torch

TAILS = ("uniform", "gaussian")


def key_sketch(keys: torch.Tensor, members: torch.Tensor, rank: int, mass: torch.Tensor | None = None) -> torch.Tensor:
    """The rank-``rank`` sketch ``[..., rank, D]`` of the keys ``keys`` ``[..., n, D]`` marked by ``members``
    ``[..., n]`` (weighted by ``mass`` ``[..., n]``, the tokens each stands for; None: 1 each): rows are
    ``sqrt(lambda_i) u_i`` by descending eigenvalue of the members' (mass-weighted) covariance; zero where fewer
    than two keys are members."""
    weight = members.to(keys.dtype) if mass is None else mass.to(keys.dtype) * members
    total = weight.sum(-1, keepdim=True)  # [..., 1]
    mean = (weight[..., None] * keys).sum(-2, keepdim=True) / total.clamp_min(1e-30)[..., None]
    centred = (keys - mean) * weight[..., None].sqrt()
    cov = centred.transpose(-1, -2) @ centred / total.clamp_min(1e-30)[..., None]  # [..., D, D]
    lam, u = torch.linalg.eigh(cov)  # ascending
    top = lam.flip(-1)[..., :rank].clamp_min(0)  # [..., rank]
    w = (u.flip(-1)[..., :rank] * top.sqrt()[..., None, :]).transpose(-1, -2)  # [..., rank, D]
    return torch.where((members.sum(-1) >= 2)[..., None, None], w, 0.0)


def sketch_term(spread: torch.Tensor, tails: str = "uniform") -> torch.Tensor:
    """The log-weight term ``[...]`` of a query whose logit spreads along the sketch's directions are ``spread``
    ``[..., r]`` (``t_i = s q.w_i``; module docstring), computed in the spreads' dtype (float32 is exact to ~1e-6:
    the uniform term takes its series where ``1 - exp(-2x)`` would cancel)."""
    if tails == "gaussian":
        return 0.5 * spread.square().sum(-1)
    if tails != "uniform":
        raise ValueError(f"tails must be one of {', '.join(TAILS)}, got {tails!r}")
    x = math.sqrt(3) * spread.abs()
    x2 = x.square()
    small = x2 * (1 / 6 - x2 * (1 / 180 - x2 * (1 / 2835 - x2 / 37800)))  # log(sinh x / x) to x^8, for x < 1/2
    big = x.clamp_min(0.5)
    large = big + torch.log1p(-torch.exp(-2 * big)) - math.log(2) - torch.log(big)
    return torch.where(x < 0.5, small, large).sum(-1)


def slot_term(
    q: torch.Tensor, sketches: torch.Tensor, token_seqs: torch.Tensor, scale: float, tails: str = "uniform"
) -> torch.Tensor:
    """Each query's summary-slot term ``[T, H_q]`` float32, the kernels' ``slot_term``: ``q`` ``[T, H_q, D]`` (packed
    tokens, post-RoPE), ``sketches`` ``[max_seqs, H_kv, r, D]`` (one layer of the cache's ``slot_sketch``) and
    ``token_seqs`` ``[T]`` (each token's sequence id), so that a query reads its own sequence's sketch of its kv
    head."""
    T, Hq, D = q.shape
    w = sketches[token_seqs]  # [T, H_kv, r, D]
    qg = q.float().view(T, w.shape[1], Hq // w.shape[1], D)
    spread = scale * torch.einsum("tkgd,tkrd->tkgr", qg, w)
    return sketch_term(spread, tails).reshape(T, Hq).contiguous()
