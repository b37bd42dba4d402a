"""Summary slots: what a kv head evicts is folded into a few slots instead of dropped.

Dropping ``n`` tokens from a head takes their share of its attention with them: every query's softmax then
renormalises over what is left, so the kept tokens' outputs grow, and the evicted tokens' content is gone. A
summary slot gives both back approximately. Each head's evicted tokens, in position order, form ``groups``
consecutive groups of near-equal size (optionally regrouped by key, below); a group becomes one slot holding its
members' mean key and mean value and a logit bias of ``log(n)`` (``PagedKVCache.slot_bias``). A query then weighs
the slot exactly as it would weigh ``n`` copies of the mean token: with the mean key, ``exp(q.k_mean)`` is the
geometric mean of the members' ``exp(q.k_i)``, a lower bound on their mean (Jensen), so the slot's mass is at most
the group's.

Means and counts are mass-weighted: a slot already carrying bias ``b`` counts as ``exp(b)`` tokens, so a summary
evicted by a later compression folds into the next one without losing its count. The slot is stored in its
group's last member (by position), so it keeps that member's position and causality, and its score is the
highest of its members' (policies rank a summary like its best member). Keys are post-RoPE, so a mean over many
positions keeps mostly the low-frequency dimensions, the ones that vary slowly with position.

The Jensen gap is what a slot loses: it grows with the spread of ``q.k_i`` over the slot's members, and groups by
position mix keys as different as the tokens are. ``kmeans`` > 0 runs that many Lloyd iterations on the evicted
keys (mass-weighted centroids, starting from the groups by position), so a slot's members are the tokens with the
nearest keys. A slot then stands in its members' last position, which keeps it causal for every later query.
"""

from __future__ import annotations

import torch

from kvcompress.cache.paged import HeadView, PagedKVCache


@torch.no_grad()
def fold_evicted(
    cache: PagedKVCache, views: list[HeadView], keep: torch.Tensor, groups: int, kmeans: int = 0
) -> torch.Tensor:
    """Fold what ``keep`` (``[L, S, H, N]`` over each layer's logical slots, :meth:`PagedKVCache.evict`'s mask)
    evicts from every head of ``views`` (one per layer, gathered with keys and values) into ``groups`` summary
    slots per head, written into the cache in place; returns ``keep`` with the summary slots kept. ``kmeans``:
    Lloyd iterations that regroup each head's evicted tokens by key first (0: groups by position).

    Everything stays on the device: an empty group (a head that evicts fewer than ``groups`` tokens) writes into
    the cache's scratch slot and keeps nothing.
    """
    if cache.slot_bias is None:
        raise ValueError("summary slots need a cache made with summaries=True (its slot_bias holds their counts)")
    keep = keep.clone()
    D = cache.head_dim
    k_flat, v_flat = cache.k_cache.view(-1, D), cache.v_cache.view(-1, D)
    bias, score = cache.slot_bias.view(-1), cache.slot_score.view(-1)
    for layer, view in enumerate(views):
        n = view.valid.shape[-1]
        if n == 0:
            continue
        gone = view.valid & ~keep[layer, :, :, :n]  # [S, H, n]
        order = view.positions.masked_fill(~gone, torch.iinfo(torch.long).max).argsort(-1)  # gone first, by position
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=order.device).expand_as(order))
        count = gone.sum(-1, keepdim=True)
        group = torch.where(gone, rank * groups // count.clamp_min(1), groups)  # [S, H, n]; `groups`: not evicted
        mass = bias[view.slots].exp() * gone  # tokens each evicted slot stands for
        S, H = group.shape[:2]
        buckets = (S, H, groups + 1)  # the last bucket collects the kept slots and is dropped
        if kmeans and groups > 1:
            group = _regroup_by_key(view.keys.float(), mass, gone, group, groups, kmeans)
        total = torch.zeros(buckets, device=group.device).scatter_add(-1, group, mass)[..., :groups]
        denom = total.clamp_min(1e-30)[..., None]
        idx = group[..., None].expand(-1, -1, -1, D)
        keys = torch.zeros(*buckets, D, device=group.device).scatter_add(-2, idx, view.keys.float() * mass[..., None])
        values = torch.zeros(*buckets, D, device=group.device).scatter_add(
            -2, idx, view.values.float() * mass[..., None]
        )
        best = torch.full(buckets, -torch.inf, device=group.device)
        best = best.scatter_reduce(-1, group, view.scores.masked_fill(~gone, -torch.inf), "amax")
        last = torch.full(buckets, -1, dtype=torch.long, device=group.device)
        last = last.scatter_reduce(-1, group, rank.masked_fill(~gone, -1), "amax")
        rep = order.gather(-1, last[..., :groups].clamp_min(0))  # [S, H, groups]: logical index of the last member
        real = total > 0
        slots = torch.where(real, view.slots.gather(-1, rep), cache.scratch_slot).reshape(-1)
        k_flat[slots] = (keys[..., :groups, :] / denom).reshape(-1, D).to(k_flat.dtype)
        v_flat[slots] = (values[..., :groups, :] / denom).reshape(-1, D).to(v_flat.dtype)
        bias[slots] = torch.where(real, total.clamp_min(1).log(), 0.0).reshape(-1)
        score[slots] = best[..., :groups].reshape(-1)
        kept = torch.zeros_like(rank).scatter_add(-1, rep, real.long()) > 0
        keep[layer, :, :, :n] |= kept
    return keep


def _regroup_by_key(
    keys: torch.Tensor, mass: torch.Tensor, gone: torch.Tensor, group: torch.Tensor, groups: int, iters: int
) -> torch.Tensor:
    """``iters`` Lloyd iterations of k-means over each head's evicted keys (``keys`` ``[S, H, n, D]``, ``mass`` and
    ``gone`` ``[S, H, n]``), from the assignment ``group`` (``[S, H, n]``, ``groups`` for tokens kept); returns the
    new assignment in the same form. Centroids are mass-weighted means; a group left empty keeps its last centroid
    (and stays empty unless a token is nearest to it)."""
    S, H, n, D = keys.shape
    centroids = keys.new_zeros(S, H, groups, D)
    for _ in range(iters):
        idx = group[..., None].expand(-1, -1, -1, D)
        sums = keys.new_zeros(S, H, groups + 1, D).scatter_add(-2, idx, keys * mass[..., None])[..., :groups, :]
        total = keys.new_zeros(S, H, groups + 1).scatter_add(-1, group, mass)[..., :groups, None]
        centroids = torch.where(total > 0, sums / total.clamp_min(1e-30), centroids)
        # nearest centroid by squared distance; |k|^2 is the same for every centroid of a token
        dist = (centroids * centroids).sum(-1)[:, :, None, :] - 2 * keys @ centroids.transpose(-1, -2)  # [S,H,n,G]
        group = torch.where(gone, dist.argmin(-1), groups)
    return group
