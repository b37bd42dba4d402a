"""The scorer interface: a policy says which tokens matter by keeping a score per cached slot.

A policy is a dataclass with one job. It may

* ask for the attention of the last ``window`` prompt queries (``-1``: every prompt query) against all keys,
  raised to ``window_power`` and summed over those queries (``window_reduce="max"``: their maximum), and turn it
  into slot scores in :meth:`Policy.observe_prefill`;
* have the engine teacher-force extra tokens after the prompt, in one or several passes
  (:meth:`Policy.reconstruction`, KVzip's context reconstruction): observed with every query, then released from
  the cache before compression;
* ask the decode attention to add ``Σ_group p**decode_power`` into the slot scores every step (fused into the
  attention kernel), or receive raw decode probabilities (``wants_decode_probs``);
* compute ranking scores at compression time from keys/values/positions in :meth:`Policy.rank`;
* keep state per cache sequence, told of forks and releases through :meth:`Policy.fork` / :meth:`Policy.release`.

The compressor protects the recent window and sinks, asks the allocator how many tokens each head keeps and keeps
each head's top-ranked slots. Higher rank = more important.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvcompress.cache.paged import HeadView, PagedKVCache
from kvcompress.cache.step import DecodeObservation, PrefillObservation


@dataclass(frozen=True)
class ReconstructionPass:
    """``tokens`` teacher-forced after the prompt's first ``visible`` tokens, every query observed, then released.
    The prompt's later tokens stay cached but out of these queries' reach, and the pass starts at position
    ``visible``, as if the prompt ended there (``visible`` = the prompt's length: the whole prompt is seen).
    ``scored = (a, b)``: the pass's observations count only for prompt positions in ``[a, b)`` (the other slots
    keep the scores they had before it); None: for every slot it sees."""

    visible: int
    tokens: list[int]
    scored: tuple[int, int] | None = None


def pass_peak(passes: Sequence[ReconstructionPass]) -> int:
    """The most tokens one of ``passes`` adds on top of the prompt (passes run one after another)."""
    return max((len(p.tokens) for p in passes), default=0)


@dataclass
class Policy:
    """Base scorer; subclasses override the hooks they need. See the module docstring."""

    window: ClassVar[int] = 0
    window_power: ClassVar[int] = 1
    window_reduce: ClassVar[str] = "sum"  # "sum" | "max": how the observed queries' p**power combine per slot
    decode_power: ClassVar[int] = 0
    wants_decode_probs: ClassVar[bool] = False
    needs_kv: ClassVar[bool] = False
    sinks: ClassVar[int] = 0  # tokens at the start always kept by this policy, on top of budget.n_sinks
    evicts: ClassVar[bool] = True
    # allocations this policy composes with; None = every allocation
    allocations: ClassVar[tuple[str, ...] | None] = None

    @property
    def window_exclude(self) -> tuple[int, int]:
        """Key positions ``[lo, hi)`` the observation leaves out: they score 0 and each observed query's
        probabilities are renormalised over its other keys (the attention itself still sees them); (0, 0): none."""
        return (0, 0)

    def observe_prefill(self, cache: PagedKVCache, obs: PrefillObservation) -> None:
        """Update slot scores from the prefill observation window of one layer of one sequence."""

    def reconstruction(self, prompt: Sequence[int]) -> list[ReconstructionPass]:
        """Passes of tokens the engine prefills after ``prompt`` (observed with every query) and then releases,
        before the prompt is compressed; empty (the default): none. See
        :class:`~kvcompress.policies.kvzip.KVzipPolicy`."""
        return []

    def observe_decode(self, cache: PagedKVCache, obs: DecodeObservation) -> None:
        """Update slot scores from one decode step's raw probabilities (only if ``wants_decode_probs``)."""

    def rank(self, view: HeadView, seen: torch.Tensor) -> torch.Tensor:
        """Ranking scores ``[S, H, L]`` for the slots of ``view`` (``seen``: ``[S]`` tokens seen per sequence)."""
        return view.scores

    def rank_layers(self, views: list[HeadView], seen: torch.Tensor) -> list[torch.Tensor]:
        """Ranking scores of every layer at once, one ``[S, H, L_l]`` per view of ``views`` (one per layer, in
        order): :meth:`rank` of each. A policy whose ranking in one layer draws on the others overrides this."""
        return [self.rank(v, seen) for v in views]

    def fork(self, parent: int, child: int) -> None:
        """Cache sequence ``child`` was forked from ``parent``: copy any state kept per sequence."""

    def release(self, seq_id: int) -> None:
        """Cache sequence ``seq_id`` was released (its id may be reused): drop any state kept for it."""


_BIG = 1e30


def finite_ranks(ranks: torch.Tensor) -> torch.Tensor:
    """A policy's ranks as float32 in ``[-1e30, 1e30]`` (nan lowest), so ``±inf`` stays free for the compressor's
    protected / invalid marks."""
    return ranks.float().nan_to_num(nan=-_BIG, posinf=_BIG, neginf=-_BIG).clamp(-_BIG, _BIG)


def group_sum(per_query_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[S, H_q, L]`` -> ``[S, H_kv, L]``: sum over the query heads of each GQA group."""
    return _by_group(per_query_head, num_kv_heads).sum(2)


def group_max(per_query_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[S, H_q, L]`` -> ``[S, H_kv, L]``: maximum over the query heads of each GQA group."""
    return _by_group(per_query_head, num_kv_heads).amax(2)


def _by_group(per_query_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[S, H_q, L]`` -> ``[S, H_kv, G, L]`` (a view)."""
    S, Hq, L = per_query_head.shape
    return per_query_head.view(S, num_kv_heads, Hq // num_kv_heads, L)


def is_count(value: object) -> bool:
    """An int >= 0 (not a bool): a token, query or position count in a policy's config."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_pool_kernel(kernel: object, field: str) -> None:
    """Raise ``ValueError`` unless ``kernel`` is an odd int >= 1 (1: no pooling): :func:`pool_by_position` pads
    ``kernel // 2`` on each side, so an even window would yield one score too many."""
    if not is_count(kernel) or kernel % 2 != 1:
        raise ValueError(f"{field} must be an odd window of positions >= 1 (1: no pooling), got {kernel!r}")


def pool_by_position(
    scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, kernel: int, mode: str = "max"
) -> torch.Tensor:
    """1-D pooling of per-slot ``scores`` ``[..., L]`` along the *position* axis (slots may be out of order).

    SnapKV and KV-Compress pool along keys so a token's neighbours share its importance; after compaction the slot
    order is no longer the position order, so slots are sorted by position, pooled and scattered back.
    """
    if kernel <= 1:
        return scores
    order = positions.masked_fill(~valid, torch.iinfo(torch.int64).max).argsort(-1)
    s = scores.gather(-1, order).masked_fill(~valid.gather(-1, order), 0.0)
    flat = s.reshape(-1, 1, s.shape[-1])
    if mode == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    elif mode == "avg":
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    else:
        raise ValueError(f"pooling must be 'max' or 'avg', got {mode!r}")
    out = torch.empty_like(scores)
    out.scatter_(-1, order, pooled.reshape(s.shape))
    return out


def window_scores(cache: PagedKVCache, obs: PrefillObservation, kernel: int, pooling: str) -> tuple:
    """(view, ``[1, H_kv, L]`` scores): the observation window pooled along positions per query head, summed over
    each GQA group. Shared by the attention-window policies (LFU, SnapKV, PyramidKV)."""
    view = cache.view(obs.layer, [obs.seq_id], with_kv=False)
    assert obs.window_probs is not None, "policy asked for a window but the observation has none"
    probs = obs.window_probs[..., : view.valid.shape[-1]].float()
    H = view.valid.shape[1]
    g = probs.shape[1] // H
    pos = view.positions.repeat_interleave(g, 1)
    valid = view.valid.repeat_interleave(g, 1)
    pooled = pool_by_position(probs, pos, valid, kernel, pooling)
    return view, group_sum(pooled, H)
