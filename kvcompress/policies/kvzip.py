"""KVzip (Kim et al., 2025, arXiv 2505.23416): query-agnostic scores from reconstructing the context.

After the context is prefilled, the engine teacher-forces ``repeat prompt + context`` (the model is asked to
repeat the previous context, and "answers" with the context itself), in chunks through the paged prefill: each
chunk attends to the cached context and to the reconstruction tokens before it. A cached context KV's score is the
**maximum** softmax attention it receives from any reconstruction query of any query head of its GQA group,

``score(k) = max_{q in reconstruction, h in group(k)} p(q, h, k)``,

a probability in [0, 1], comparable across heads and layers, so it composes with ``budget.allocation=global`` as
well as ``uniform``. The reconstruction tokens are then released from the cache (it is back to the context) and
the engine compresses as usual; the question is prefilled afterwards, unobserved (query-agnostic). The pass costs
about one extra prefill of the context, reported as ``reconstruct_s`` in each request's timings.

The repeat prompt must be tokenized by the model's tokenizer, which the policy does not own: the caller sets
``repeat_ids`` (the experiment runner and ``scripts/demo.py`` call
:func:`~kvcompress.experiment.prompts.bind_tokenizer`, which renders it with ``repeat_prompt_ids``), and
``prefix_ids``, the chat template's tokens before the user's content (its system prompt and user header). With
``skip_prefix`` a prompt that starts with them is reconstructed without them, as the paper and kvpress do: the
model is asked to repeat the context, not the template. The prefix's KVs are still scored by the attention the
reconstruction gives them, unless ``prefix_keep`` is set: then the prefix's first ``prefix_keep`` tokens (its
attention sinks) outrank everything and the rest of it scores 0, so it is evicted first, as kvpress's
``KVzipPress`` does with ``n_sink=4``. That frees the prefix's share of the budget for the context, which matters
at high ratios (a 24-token prefix is over a third of a head's 62 tokens at 16x on 1000 tokens). ``prefix_renorm``
adds kvpress's other half of that rule: the rest of the prefix is also left out of each reconstruction query's
softmax, so a context KV's score is its attention renormalised over the sinks, the context and the reconstruction,

``score(k) = max_{q, h} p(q, h, k) / (1 - Σ_{j in prefix, j >= prefix_keep} p(q, h, j))``.

A query that spends most of its attention on the template then counts as much as one that does not. Both assume
every prompt starts with ``prefix_ids``, as those rendered by the experiment runner do.

``window`` > 0 lets the prompt's own last ``window`` queries vote too: their maximum attention is folded into the
same maximum as the reconstruction's, ``score(k) = max(max_{q in window} p(q, h, k), max_{q in reconstruction}
p(q, h, k))``. Query-aware (the question at the end of the prompt) that adds what the question looks at, SnapKV's
signal, to what reconstruction needs, and both are probabilities, so the score stays comparable across heads for
the global allocator. Query-agnostic the window is the end of the context, which carries no question.
``window_weight`` = λ scales the window's attention before the maximum, ``max(λ · max_{q in window} p, max_{q in
reconstruction} p)``: at high ratios the global threshold sits among the copying heads' near-1 reconstruction
scores, above what the question puts on its answer in the heads that retrieve it; λ > 1 lifts that above the
threshold (with λ = 4, a token the question gives more than a quarter of a query's attention outranks every
reconstruction score). 1 (the default): both count alike.

``local_chunk`` > 0 reconstructs the context that many tokens at a time, one pass per chunk, each pass seeing
the prompt only up to its chunk's end (the later prompt stays cached, out of the pass's reach: see
:meth:`~kvcompress.cache.paged.PagedKVCache.rewound`) and starting right after it, with the repeat prompt again.
A context token is then scored by queries at most ``local_chunk`` plus the repeat prompt's length away, instead
of the whole prompt's length: at ~4000 tokens SmolLM2's copying heads, which find a passkey a thousand tokens
back, barely attend to it four thousand tokens back, and the end of the context outranks it in most heads.
Queries of later passes still see (and score) the earlier context, and each pass's end, the text its repeat
prompt follows, scores high too. 0 (the default): one pass over the whole context; no preset sets it (on ~4k
tokens it gained half a sample at query-agnostic 4x and lost 2.5 at 8x, docs/RESULTS.md).

``local_lookahead`` = m > 0 moves that target off the scored text: each pass also sees the m prompt tokens after
its chunk (its repeat prompt follows them), and what it observes counts only for positions before its chunk's
end; those m tokens are scored by the passes after it (by the next one, whose chunk they open, when m is at most
``local_chunk``). Only the context's end, which the last pass sees with nothing after it, stays a target. No
preset sets it: ahead on the held-out 4k suite, it lost five of twenty samples in each of two cells of the 4k
tuning suite (query-agnostic 4x and 8x; docs/RESULTS.md, "A 4k tuning suite").

``token_prior`` = λ > 0 lets the other layers vote on each token: a head's score for a token is at least λ times
that token's mean score over every layer and kv head that holds it, ``max(score(l, h, k), λ · mean_{l', h'}
score(l', h', k))``, as a layer-shared selection (GemFilter, arXiv 2409.17422) keeps one token set for all layers,
while a head that singles out tokens of its own still keeps them. Reconstruction attention in the first layers is
mostly local, so there the context's own scores say little of what deeper layers read: at ~4000 tokens
query-agnostic, KVzip keeps a person's city in no head of the first seven layers. With λ = 1 the mean lifts most
heads' scores, so the global split comes close to uniform (at 4x on 4005 tokens the thinnest head keeps 725
tokens instead of 53). Template-prefix positions keep their own rank under ``prefix_keep``. 0 (the default):
each head by its own scores; no preset sets it (docs/RESULTS.md, "The other layers' vote").

kvpress's ``chunk_size`` differs: each of its passes sees the whole context and leaves the other chunks out of
the softmax.

``pool_kernel`` > 1 max-pools each head's scores along positions before ranking (SnapKV's clustering), so a
token inherits the highest score of the ``pool_kernel // 2`` tokens on either side of it (in position order, among
the tokens the head holds: all of the prompt at KVzip's one compression). A fact is a span: the question or
the reconstruction may single out the name in "Yusuf had been born in Bergen" while the city, four tokens on,
scores low in most heads; pooled, the span is kept or evicted together. The stored scores stay the unpooled
maxima (pooling happens at ranking), so later observations fold in as before.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcompress.cache.paged import HeadView, PagedKVCache
from kvcompress.cache.step import PrefillObservation
from kvcompress.policies.base import (
    Policy,
    ReconstructionPass,
    check_pool_kernel,
    group_max,
    is_count,
    pool_by_position,
)

DEFAULT_INSTRUCTION = "Repeat the previous context exactly."


@dataclass
class KVzipPolicy(Policy):
    """``instruction``: the repeat request, rendered after the context (as the end of its user turn, then the
    assistant header, when the tokenizer has a chat template); ``repeat_ids``: its token ids, set by the caller
    that owns the tokenizer (None until then: reconstruction raises); ``prefix_ids``: the chat template's tokens
    before the user's content, also set by that caller (None or empty: no template); ``skip_prefix``: leave them
    out of the reconstruction; ``prefix_keep``: None (the default) ranks the prefix by its scores like the
    context; k >= 0 keeps its first k tokens above everything and ranks the rest of it last (score 0);
    ``prefix_renorm`` (needs ``prefix_keep``): also leave that rest out of the reconstruction queries' softmax;
    ``window``: the last prompt queries whose attention also votes (0, the default: only the reconstruction's);
    ``window_weight``: the factor on their attention before it meets the reconstruction's in the maximum (1);
    ``pool_kernel``: max-pool the scores over this odd number of positions at ranking (1, the default: none);
    ``local_chunk``: reconstruct the context this many tokens per pass, each pass seeing the prompt up to its
    chunk's end (0, the default: one pass over the whole context); ``local_lookahead`` (needs ``local_chunk``):
    each pass also sees this many tokens past its chunk, and its scores count only up to the chunk's end."""

    instruction: str = DEFAULT_INSTRUCTION
    repeat_ids: list[int] | None = None
    prefix_ids: list[int] | None = None
    skip_prefix: bool = False
    prefix_keep: int | None = None
    prefix_renorm: bool = False
    window: int = 0
    window_weight: float = 1.0
    pool_kernel: int = 1
    local_chunk: int = 0
    local_lookahead: int = 0
    token_prior: float = 0.0
    window_reduce: ClassVar[str] = "max"

    def __post_init__(self) -> None:
        k = self.prefix_keep
        if k is not None and not is_count(k):
            raise ValueError(
                f"kvzip policy.prefix_keep must be null or a token count >= 0 (kvpress keeps 4), "
                f"got {self.prefix_keep!r}"
            )
        if not is_count(self.window):
            raise ValueError(
                f"kvzip policy.window must be a count of prompt queries >= 0 (0: only the reconstruction votes), "
                f"got {self.window!r}"
            )
        w = self.window_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not w > 0:
            raise ValueError(
                f"kvzip policy.window_weight must be a number > 0 (1: the window counts as the reconstruction), "
                f"got {w!r}"
            )
        if self.window_weight != 1 and not self.window:
            raise ValueError("kvzip policy.window_weight needs policy.window > 0 (the prompt queries it weighs)")
        check_pool_kernel(self.pool_kernel, "kvzip policy.pool_kernel")
        if not is_count(self.local_chunk):
            raise ValueError(
                f"kvzip policy.local_chunk must be a count of context tokens per reconstruction pass >= 0 "
                f"(0: one pass over the whole context), got {self.local_chunk!r}"
            )
        if not is_count(self.local_lookahead):
            raise ValueError(
                f"kvzip policy.local_lookahead must be a count of tokens >= 0 that each pass sees past its chunk, "
                f"got {self.local_lookahead!r}"
            )
        if self.local_lookahead and not self.local_chunk:
            raise ValueError("kvzip policy.local_lookahead needs policy.local_chunk > 0 (passes to look ahead of)")
        t = self.token_prior
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < math.inf:
            raise ValueError(
                f"kvzip policy.token_prior must be a finite number >= 0 (0: each head ranks by its own scores), "
                f"got {t!r}"
            )
        if self.prefix_renorm and k is None:
            raise ValueError(
                "kvzip policy.prefix_renorm=true needs policy.prefix_keep (the sinks kept in the softmax), e.g. 4"
            )

    @property
    def window_exclude(self) -> tuple[int, int]:
        """With ``prefix_renorm``: the template prefix after its sinks, ``[prefix_keep, len(prefix_ids))``."""
        if not self.prefix_renorm or not self.prefix_ids:
            return (0, 0)
        return (min(self.prefix_keep, len(self.prefix_ids)), len(self.prefix_ids))

    def reconstruction(self, prompt: Sequence[int]) -> list[ReconstructionPass]:
        """One pass ``[*repeat_ids, *prompt]`` that sees the whole prompt: the repeat prompt, then the context
        teacher-forced as its answer (without the template's ``prefix_ids`` when ``skip_prefix`` and the prompt
        starts with them). With ``local_chunk`` = c: one pass ``[*repeat_ids, *chunk]`` per c tokens of that
        context, each seeing the prompt up to the chunk's end; a last chunk under c / 2 tokens joins the one
        before it, so a prompt a few tokens over c is still one pass. With ``local_lookahead`` = m a pass sees
        m more tokens of the prompt and scores positions up to its chunk's end only (``scored=(0, end)``)."""
        if self.repeat_ids is None:
            raise ValueError(
                "KVzipPolicy.repeat_ids is not set: tokenize the repeat prompt with the model's tokenizer, e.g. "
                "policy.repeat_ids = kvcompress.experiment.prompts.repeat_prompt_ids(tokenizer, policy.instruction)"
            )
        prefix = self.prefix_ids or []
        start = len(prefix) if self.skip_prefix and prefix and list(prompt[: len(prefix)]) == prefix else 0
        bounds = [*range(start, len(prompt), self.local_chunk or max(len(prompt) - start, 1)), len(prompt)]
        if len(bounds) > 2 and 2 * (bounds[-1] - bounds[-2]) < self.local_chunk:
            del bounds[-2]  # a last chunk under half the size joins the one before (a pass costs a repeat prompt)
        m = self.local_lookahead
        return [
            ReconstructionPass(min(b + m, len(prompt)), [*self.repeat_ids, *prompt[a:b]], (0, b) if m else None)
            for a, b in itertools.pairwise(bounds)
        ]

    def observe_prefill(self, cache: PagedKVCache, obs: PrefillObservation) -> None:
        """Fold one observed chunk in (the prompt's last ``window`` queries, weighed by ``window_weight``, or a
        reconstruction chunk): slot score = max(score so far, max over the group's query heads of the chunk's max
        attention). Slots start at 0."""
        view = cache.view(obs.layer, [obs.seq_id], with_kv=False)
        assert obs.window_probs is not None, "KVzip observes its window and every reconstruction query"
        probs = obs.window_probs[..., : view.valid.shape[-1]].float()  # [1, H_q, L], max over the chunk's queries
        if not obs.every_query:
            probs = probs * self.window_weight
        cache.set_scores(view, view.scores.maximum(group_max(probs, view.valid.shape[1])))

    def rank(self, view: HeadView, seen: torch.Tensor) -> torch.Tensor:
        """The slot scores ``[S, H, L]``, max-pooled along positions with ``pool_kernel``; with ``prefix_keep``
        set, template-prefix positions ``< prefix_keep`` get the top rank and the prefix's other positions 0 (they
        are out of the pooling too: a context token next to the prefix does not inherit a sink's score)."""
        if self.prefix_keep is None or not self.prefix_ids:
            return pool_by_position(view.scores, view.positions, view.valid, self.pool_kernel)
        in_prefix = view.positions < len(self.prefix_ids)
        sink = view.positions < self.prefix_keep
        scores = pool_by_position(view.scores.masked_fill(in_prefix, 0.0), view.positions, view.valid, self.pool_kernel)
        return torch.where(in_prefix, torch.where(sink, torch.inf, 0.0), scores)  # the compressor clamps inf

    def rank_layers(self, views: list[HeadView], seen: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`rank` per layer; with ``token_prior`` = λ each valid slot's rank is raised to at least λ times
        its token's :func:`token_means` (template-prefix positions keep theirs under ``prefix_keep``). Sizing the
        means reads ``seen``'s maximum back to the host, once per compression: KVzip compresses a sequence once,
        after its reconstruction pass, not in decode steps."""
        ranks = super().rank_layers(views, seen)
        if not self.token_prior:
            return ranks
        means = token_means(views, int(seen.max()))  # [S, P]
        prefix = len(self.prefix_ids or []) if self.prefix_keep is not None else 0
        out = []
        for v, r in zip(views, ranks, strict=True):
            prior = means.gather(1, held_positions(v, means.shape[1])).view_as(r)
            lift = v.valid & (v.positions >= prefix)
            out.append(torch.where(lift, torch.maximum(r, self.token_prior * prior), r))
        return out


def token_means(views: list[HeadView], n_positions: int) -> torch.Tensor:
    """``[S, n_positions]``: each position's mean stored score over every (layer, kv head) slot that holds it (0
    where none does), over the layers' ``views`` (each ``[S, H, L_l]``, slots in any order). A summary slot left by
    an earlier compression sits at a position of its own and votes there like a token."""
    S = views[0].scores.shape[0]
    sums = torch.zeros(S, n_positions, dtype=torch.float32, device=views[0].scores.device)
    counts = torch.zeros_like(sums)
    for v in views:
        at = held_positions(v, n_positions)
        sums.scatter_add_(1, at, v.scores.float().masked_fill(~v.valid, 0.0).flatten(1))
        counts.scatter_add_(1, at, v.valid.float().flatten(1))
    return sums / counts.clamp(min=1.0)


def held_positions(view: HeadView, n_positions: int) -> torch.Tensor:
    """``[S, H * L]``: each slot's position as an index into ``n_positions`` columns (padding points at 0; callers
    mask it with ``view.valid``)."""
    return view.positions.clamp(0, n_positions - 1).masked_fill(~view.valid, 0).flatten(1)
