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

``queries`` (the compressor's, with ``budget.summary_fit``) fits each slot to queries that read the context instead
of leaving the Jensen gap: for a query ``q`` a group's exact contribution is its mass ``Σ_i exp(s q.k_i + b_i)``
(``s`` = ``head_dim ** -0.5``, ``b_i`` a member's own bias) times its softmax-weighted value. The fitted slot keeps
the mean key and takes the bias ``mean_q [logsumexp_i(s q.k_i + b_i) - s q.k_mean]`` (at least ``log(n)``: the gap
is closed on average, in log space) and the value ``mean_q Σ_i softmax_i(s q.k_i + b_i) v_i``, the group's output
averaged over the queries. With one query the slot gives that query exactly the full group's share and output.

``spread`` (``budget.summary_spread``) closes part of the Jensen gap for every query instead of on average: a group
becomes two slots at ``k_mean ± sqrt(var) u``, ``u`` its members' principal key direction (approximately: a
few power iterations) and ``var`` their key
variance along it, each with half the group's count, and values ``v_mean ± sqrt(var) slope`` (the values' linear
fit on that projection). A query then weighs the group ``n exp(s q.k_mean) cosh(s sqrt(var) q.u)``: more for a query
whose direction spreads the members' logits, as the members themselves would, and exactly the members' weight and
output when their keys lie at two points symmetric about the mean.

``shared_value`` (``budget.summary_shared_value``) gives every slot of a head the mean value of everything the
head evicts (mass-weighted), and leaves the slots' keys and biases as they are. The slots then sketch only the
evicted tokens' share of each query's attention, and every query reads the same average out of it. With groups by
key (``kmeans``) that approximates keeping every evicted key with the head's mean value
(``scripts/inspect_allocation.py --mass mean``): each query's share follows which clusters its direction favours,
and no slot carries one region's content.

``offsets`` (``budget.summary_offset``, a file ``scripts/slot_share.py --save-gap`` writes) add a measured
per-(layer, kv head) offset to each slot's ``log(n)`` bias: the mean gap, on calibration prompts, between what the
evicted tokens weighed for a question's queries and what their mean key weighs. A slot's bias then no longer
counts its members, so a sequence folds with offsets once (the compressor drops what a later compression of it
evicts).

``sketch`` (``budget.summary_sketch``) keeps, beside one ``log(n)`` slot per head, the top principal directions of
the keys it folds in the cache's ``slot_sketch``; every later query then adds to the slot's logit what that spread
is worth to it (:mod:`kvcompress.cache.sketch`), so the slot weighs for each query about what its members would.
A sequence folds with it once, as with offsets.
"""

from __future__ import annotations

import math

import torch

from kvcompress.cache.paged import HeadView, PagedKVCache
from kvcompress.cache.sketch import key_sketch


@torch.no_grad()
def fold_evicted(
    cache: PagedKVCache,
    views: list[HeadView],
    keep: torch.Tensor,
    groups: int,
    kmeans: int = 0,
    queries: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    fit_value: bool = True,
    spread: bool = False,
    shared_value: bool = False,
    offsets: torch.Tensor | None = None,
    sketch: bool = False,
) -> torch.Tensor:
    """Fold what ``keep`` (``[L, S, H, N]`` over each layer's logical slots, :meth:`PagedKVCache.evict`'s mask)
    evicts from every head of ``views`` (one per layer, gathered with keys and values) into ``groups`` summary
    slots per head, written into the cache in place; returns ``keep`` with the summary slots kept. ``kmeans``:
    Lloyd iterations that regroup each head's evicted tokens by key first (0: groups by position). ``queries``:
    per layer, ``(q [S, H_q, M, D] post-RoPE, valid [S, M])`` to fit each slot's bias and value to (None: the
    ``log(n)`` bias and the mean value). ``fit_value`` False fits the bias only and keeps the mean value.
    ``spread``: each group becomes two slots, its spread along its keys' principal direction (module docstring),
    stored in its last two members; a group of one member keeps one slot. ``shared_value``: every slot of a head
    takes the mean value of all it evicts (module docstring). ``offsets`` ``[L, H]`` (at least ``len(views)`` rows):
    row l is added to the bias of every slot of layer l that stands for more than one token (module docstring).
    ``sketch``: also write each head's sketch of the keys it evicts into the cache's ``slot_sketch`` (one slot per
    head; :mod:`kvcompress.cache.sketch`).

    Everything stays on the device: an empty group (a head that evicts fewer than ``groups`` tokens) writes into
    the cache's scratch slot and keeps nothing.
    """
    if cache.slot_bias is None:
        raise ValueError("summary slots need a cache made with summaries=True (its slot_bias holds their counts)")
    if spread and queries is not None:
        raise ValueError("spread summary slots take the log(n) bias; they cannot also be fitted to queries")
    if offsets is not None and queries is not None:
        raise ValueError("offsets shift the log(n) bias; slots fitted to queries take a fitted bias instead")
    if shared_value and (spread or queries is not None):
        raise ValueError("shared-value summary slots keep the head's mean value; they cannot also be spread or fitted")
    if not fit_value and queries is None:
        raise ValueError("fit_value=False keeps the mean value of slots fitted to queries, but no queries were given")
    if sketch and (cache.slot_sketch is None or groups != 1 or spread or queries is not None or offsets is not None):
        raise ValueError(
            "a summary sketch reads one log(n) slot per head: it needs a cache made with sketch_rank > 0, groups=1, "
            "and no spread, fitted queries or offsets"
        )
    keep = keep.clone()
    D = cache.head_dim
    bias = cache.slot_bias.view(-1)
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
        if sketch:
            sid = torch.as_tensor(view.seq_ids, device=group.device)
            cache.slot_sketch[view.layer, sid] = key_sketch(view.keys.float(), gone, cache.slot_sketch.shape[-2], mass)
            cache.sketched[view.seq_ids] = True
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
        mean_keys, mean_values = keys[..., :groups, :] / denom, values[..., :groups, :] / denom
        slot_bias = total.clamp_min(1).log()
        if offsets is not None:
            slot_bias = torch.where(total > 1, slot_bias + offsets[layer][None, :, None], slot_bias)
        if shared_value:  # the head's mean evicted value in every slot: [S, H, 1, D] over [S, H, groups, D]
            head_mean = values[..., :groups, :].sum(-2, keepdim=True) / total.sum(-1).clamp_min(1e-30)[..., None, None]
            mean_values = head_mean.expand_as(mean_values)
        if queries is not None:
            q, q_valid = queries[layer]
            own = bias[view.slots].masked_fill(~view.valid, 0.0)
            slot_bias, fitted_values = _fit_to_queries(
                q.float(), q_valid, view.keys.float(), view.values.float(), own, group, mean_keys, groups
            )
            mean_values = fitted_values if fit_value else mean_values
        if spread:
            # the group's second-last member (by position) holds its second slot; a group of one has none
            last_of = last.gather(-1, group)  # [S, H, n]: each token's group's last rank
            second = torch.full(buckets, -1, dtype=torch.long, device=group.device)
            second = second.scatter_reduce(-1, group, rank.masked_fill(~gone | (rank == last_of), -1), "amax")
            pair = second[..., :groups] >= 0  # [S, H, groups]
            rep2 = order.gather(-1, second[..., :groups].clamp_min(0))
            offset_k, offset_v = _principal_spread(
                view.keys.float(), view.values.float(), mass, group, mean_keys, mean_values, groups
            )
            slot_bias = torch.where(pair, slot_bias - math.log(2), slot_bias)
            keep[layer, :, :, :n] |= _write_slots(
                cache, view, rep2, pair, mean_keys - offset_k, mean_values - offset_v, slot_bias, best[..., :groups]
            )
            mean_keys, mean_values = mean_keys + offset_k, mean_values + offset_v
        keep[layer, :, :, :n] |= _write_slots(
            cache, view, rep, real, mean_keys, mean_values, slot_bias, best[..., :groups]
        )
    return keep


def _write_slots(
    cache: PagedKVCache,
    view: HeadView,
    rep: torch.Tensor,
    present: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_bias: torch.Tensor,
    best: torch.Tensor,
) -> torch.Tensor:
    """Write one summary per (sequence, kv head, group) into the cache slot of ``view``'s logical index ``rep``
    (``[S, H, groups]``), where ``present`` (same shape) says a group has one; the others go to the scratch slot.
    ``keys``, ``values`` ``[S, H, groups, D]``; ``slot_bias`` and ``best`` (the score a summary ranks by)
    ``[S, H, groups]``. Returns the ``[S, H, n]`` mask of the logical slots that now hold a summary."""
    D = cache.head_dim
    slots = torch.where(present, view.slots.gather(-1, rep), cache.scratch_slot).reshape(-1)
    cache.k_cache.view(-1, D)[slots] = keys.reshape(-1, D).to(cache.k_cache.dtype)
    cache.v_cache.view(-1, D)[slots] = values.reshape(-1, D).to(cache.v_cache.dtype)
    cache.slot_bias.view(-1)[slots] = torch.where(present, slot_bias, 0.0).reshape(-1)
    cache.slot_score.view(-1)[slots] = best.reshape(-1)
    return torch.zeros_like(view.slots).scatter_add(-1, rep, present.long()) > 0


def _principal_spread(
    keys: torch.Tensor,
    values: torch.Tensor,
    mass: torch.Tensor,
    group: torch.Tensor,
    mean_keys: torch.Tensor,
    mean_values: torch.Tensor,
    groups: int,
    iters: int = 12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's key and value offsets ``[S, H, groups, D]`` for its two slots, ``mean ± offset``. The key
    offset is ``sqrt(var) u``: ``u`` the members' principal key direction (mass-weighted; approximated by ``iters``
    power iterations from a fixed start, which on near-isotropic keys may stop at another high-variance direction)
    and ``var`` their key variance along it. The value offset is ``sqrt(var)`` times the least-squares slope of the
    values on the keys' projection onto ``u``. ``keys``, ``values`` ``[S, H, n, D]``, ``mass`` ``[S, H, n]`` (0 for
    the kept), ``group`` as :func:`fold_evicted` assigns it, the means ``[S, H, groups, D]``. Two slots at these
    points, each half the group's mass, match its mean key and the key variance along ``u``, so a query ``q``
    weighs them ``n exp(s q.k_mean) cosh(s q.offset)``: its share grows with how far its direction spreads the
    members' logits, where one slot gives every query ``n exp(s q.k_mean)``.
    """
    S, H, n, D = keys.shape
    pad = keys.new_zeros(S, H, 1, D)  # the kept tokens' bucket
    idx = group[..., None].expand(-1, -1, -1, D)

    def from_mean(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:  # [S, H, n, D]; 0 for the kept
        return (x - torch.cat([means, pad], -2).gather(-2, idx)) * (mass > 0)[..., None]

    centred = from_mean(keys, mean_keys)
    u = torch.ones(S, H, groups + 1, D, device=keys.device, dtype=keys.dtype)
    u[..., 1::2] = -0.5  # a fixed start no principal direction is orthogonal to in practice
    for _ in range(iters):
        t = (centred * u.gather(-2, idx)).sum(-1)  # [S, H, n]: each member's projection
        u = keys.new_zeros(S, H, groups + 1, D).scatter_add(-2, idx, centred * (mass * t)[..., None])
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    t = (centred * u.gather(-2, idx)).sum(-1)
    total = keys.new_zeros(S, H, groups + 1).scatter_add(-1, group, mass).clamp_min(1e-30)
    moment = keys.new_zeros(S, H, groups + 1).scatter_add(-1, group, mass * t * t)  # [S, H, groups + 1]
    dv = from_mean(values, mean_values)
    cov = keys.new_zeros(S, H, groups + 1, D).scatter_add(-2, idx, dv * (mass * t)[..., None])
    sigma = (moment / total).sqrt()[..., None]
    slope = cov / moment.clamp_min(1e-30)[..., None]
    return (sigma * u)[..., :groups, :], (sigma * slope)[..., :groups, :]


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


def _fit_to_queries(
    q: torch.Tensor,
    q_valid: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    own_bias: torch.Tensor,
    group: torch.Tensor,
    mean_keys: torch.Tensor,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's bias and value fitted to the queries ``q`` ``[S, H_q, M, D]`` (``q_valid`` ``[S, M]``; query
    head h reads kv head ``h // (H_q / H)``) over the members ``group`` assigns it (``[S, H, n]``, ``groups`` for
    the kept), whose keys, values ``[S, H, n, D]`` and biases ``[S, H, n]`` are given, with the slots' mean keys
    ``[S, H, groups, D]``; returns the biases ``[S, H, groups]`` and values ``[S, H, groups, D]`` (module
    docstring). Every sequence needs at least one valid query; a group with no member gets bias 0 and a zero
    value, which the caller writes to the scratch slot."""
    S, Hq, M, D = q.shape
    H = keys.shape[1]
    scale = D**-0.5
    q = q.reshape(S, H, Hq // H * M, D)  # a kv head's queries: its GQA group's, each head's M in turn
    w = q_valid.float().repeat(1, Hq // H)[:, None, :]  # [S, 1, G*M]: which of a kv head's queries count
    n_q = w.sum(-1, keepdim=True).clamp_min(1)  # [S, 1, 1]
    logits = scale * q @ keys.transpose(-1, -2) + own_bias[:, :, None, :]  # [S, H, G*M, n]
    member = group[:, :, None, :] == torch.arange(groups, device=group.device)[:, None, None, None, None]
    masked = logits.masked_fill(~member, -torch.inf)  # [groups, S, H, G*M, n]
    lse = masked.logsumexp(-1)  # [groups, S, H, G*M]; -inf for an empty group
    probs = (masked - lse[..., None]).exp().nan_to_num(0.0)  # softmax within each group; 0 for an empty one
    base = scale * (q @ mean_keys.transpose(-1, -2)).movedim(-1, 0)  # [groups, S, H, G*M]: the slot's logit
    gap = (lse - base).nan_to_num(0.0, neginf=0.0) * w  # [groups, S, H, G*M]
    slot_bias = (gap.sum(-1) / n_q[..., 0]).movedim(0, -1)  # [S, H, groups]
    out = probs @ values[None]  # [groups, S, H, G*M, D]: each query's output from each group alone
    fitted = ((out * w[..., None]).sum(-2) / n_q[None]).movedim(0, 2)  # [S, H, groups, D]
    return slot_bias, fitted
