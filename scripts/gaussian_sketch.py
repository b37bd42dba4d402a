"""A Gaussian sketch of the keys a head evicts, and an attention that weighs a summary slot by it (an oracle).

Were a head's n evicted keys drawn from N(mu, Sigma), their summed weight for a query q would be
``n E[exp(s q.k)] = n exp(s q.mu + s^2/2 q^T Sigma q)`` (``s = head_dim^-1/2``). One summary slot
(``budget.summary_slots=1``: key mu, logit bias log n) gives the first two terms, the same to every query; the third
gives each query a share of its own, larger where the query's direction spreads the evicted keys' logits. The
rank-r sketch keeps Sigma's top r principal directions as ``W`` ``[r, D]`` (row i: ``sqrt(lambda_i) u_i``), r D
numbers per head (the size of r/2 cached tokens' keys and values), and adds ``s^2/2 |W q|^2`` to the slot's logit.
Real keys are lighter-tailed than a Gaussian in most directions (RoPE bounds the positional ones), so that term
overshoots for the queries most aligned with them; ``tails="uniform"`` models each direction as uniform with the
same variance instead, whose term grows linearly in the query's spread rather than quadratically.

No kernel has that term. ``scripts/slot_share.py --sketch`` measures how close it comes to the evicted keys' exact
share; ``scripts/inspect_allocation.py --sketch R`` generates with it: :class:`SketchedAttention` records each
head's sketch as the compressor folds, and once a sequence holds summary slots it computes that sequence's
attention densely in torch, the term added, in place of the paged kernels (one sequence at a time; a check against
the kernels with a zero sketch is in the tests).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kvcompress.cache.paged import HeadView, PagedKVCache


def sketch(keys: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-``rank`` Gaussian sketch ``W`` ``[rank, D]`` of ``keys`` ``[n, D]`` (module docstring), rows by
    descending eigenvalue, so ``W[:r]`` is the rank-r sketch; zeros for fewer than two keys."""
    if keys.shape[0] < 2:
        return keys.new_zeros(rank, keys.shape[-1])
    lam, u = torch.linalg.eigh(torch.cov(keys.T, correction=0))  # ascending
    top = lam.flip(0)[:rank].clamp_min(0)
    return (u.flip(1)[:, :rank] * top.sqrt()).T


TAILS = ("gaussian", "uniform")


def sketch_term(q: torch.Tensor, w: torch.Tensor, scale: float, tails: str = "gaussian") -> torch.Tensor:
    """The sketch's log-weight term for queries ``q`` ``[..., D]`` and a sketch ``w`` ``[r, D]``: ``[...]``. With
    ``t_i = s q.w_i`` (the query's logit spread along direction i), ``gaussian`` is ``sum_i t_i^2 / 2``; ``uniform``
    takes each direction as independent and uniform with that spread, ``sum_i log(sinh(x_i) / x_i)`` with
    ``x_i = sqrt(3) |t_i|``: the same for small t, but growing linearly, not quadratically, in a direction the keys
    span only so far (module docstring)."""
    t = scale * (q @ w.T)
    if tails == "gaussian":
        return 0.5 * (t**2).sum(-1)
    if tails != "uniform":
        raise ValueError(f"tails must be one of {', '.join(TAILS)}, got {tails!r}")
    x = (math.sqrt(3) * t.abs()).double().clamp_min(1e-6)  # float64: 1 - exp(-2x) cancels for small x
    return (x + torch.log1p(-torch.exp(-2 * x)) - math.log(2) - torch.log(x)).sum(-1).to(t.dtype)


class SketchedAttention:
    """The oracle's attention (module docstring). :meth:`record` is the compressor's fold, wrapped: it keeps
    ``sketches[layer]`` ``[H, rank, D]`` of what each kv head of the (single) sequence evicts, then folds. Called as
    a transformers attention function, it hands every forward to ``paged`` (the registered paged attention) until
    its sequence holds a summary slot (a slot with a positive bias), then attends densely with the sketch's term
    on those slots."""

    def __init__(self, rank: int, fold, paged, tails: str = "gaussian") -> None:
        self.rank, self.fold, self.paged, self.tails = rank, fold, paged, tails
        self.sketches: dict[int, torch.Tensor] = {}
        self.dense_calls = 0  # forwards attended densely, the sketch's term in force

    def record(self, cache: PagedKVCache, views: list[HeadView], keep: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        for layer, view in enumerate(views):
            if view.valid.shape[0] != 1:
                raise ValueError("the Gaussian-sketch oracle follows one sequence: run requests one at a time")
            gone = view.valid[0] & ~keep[layer, 0, :, : view.valid.shape[-1]]  # [H, n]
            keys = view.keys[0].float()
            self.sketches[layer] = torch.stack([sketch(keys[h][gone[h]], self.rank) for h in range(len(gone))])
        return self.fold(cache, views, keep, *args, **kwargs)

    def __call__(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask, **kwargs
    ) -> tuple[torch.Tensor, None]:
        """``query`` ``[1, H_q, T, D]``, ``key``/``value`` ``[1, H_kv, T, D]`` -> ``[1, T, H_q, D]``, as the paged
        attention (``mask`` unused: causality comes from the slots' positions); the new keys and values are
        written to the cache first, as it does."""
        step, layer = kwargs["kvc_step"], module.layer_idx
        cache, plan = step.cache, step.plan
        if layer not in self.sketches or len(plan.seq_ids) != 1:
            return self.paged(module, query, key, value, mask, **kwargs)
        head = cache.view(layer, plan.seq_ids, with_kv=False)
        if not bool((cache.slot_bias.view(-1)[head.slots[0]].masked_fill(~head.valid[0], 0) > 0).any()):
            return self.paged(module, query, key, value, mask, **kwargs)
        if step.observer is not None and step.obs_window:
            raise ValueError("the Gaussian-sketch oracle does not hand observations to a policy after compression")
        self.dense_calls += 1
        _, Hq, T, D = query.shape
        H = key.shape[1]
        s = kwargs.get("scaling") or D**-0.5
        cache.write(layer, plan, key[0].transpose(0, 1), value[0].transpose(0, 1))
        view = cache.view(layer, plan.seq_ids, with_kv=True)
        valid = view.valid[0]  # [H, L]
        bias = cache.slot_bias.view(-1)[view.slots[0]].masked_fill(~valid, 0)  # [H, L]
        q = query[0].transpose(0, 1).reshape(T, H, Hq // H, D).float()  # [T, H, G, D]
        logits = s * torch.einsum("thgd,hld->thgl", q, view.keys[0].float()) + bias[None, :, None, :]
        term = torch.stack([sketch_term(q[:, h], self.sketches[layer][h], s, self.tails) for h in range(H)], 1)
        logits = logits + term[..., None] * (bias > 0)[None, :, None, :]
        seen = valid[None, :, None, :] & (view.positions[0][None, :, None, :] <= plan.positions[:, None, None, None])
        probs = logits.masked_fill(~seen, -math.inf).softmax(-1)
        out = torch.einsum("thgl,hld->thgd", probs, view.values[0].float())
        return out.reshape(1, T, Hq, D).to(query.dtype), None
