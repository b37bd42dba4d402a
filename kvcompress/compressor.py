"""Glue between a policy (scorer), an allocator and a budget, acting on a :class:`PagedKVCache`.

The compressor is the policy's :class:`~kvcompress.cache.step.Observer`: it tells each forward which attention
statistics the policy needs and routes them to it. On :meth:`Compressor.compress` it ranks every slot, protects the
recent window and sinks, asks the allocator for per-head counts and evicts everything else, freeing whole blocks
back to the pool. *When* compression runs is decided in one place, the :class:`~kvcompress.engine.Engine`, which
also times it; the compressor only knows *how*.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvcompress.allocators import Allocator, build_allocator
from kvcompress.allocators.base import keep_top
from kvcompress.budget import Budget
from kvcompress.cache.paged import PagedKVCache
from kvcompress.cache.step import DecodeObservation, ForwardStep, PrefillObservation
from kvcompress.cache.summary import fold_evicted
from kvcompress.policies.base import Policy, finite_ranks


@dataclass
class Compressor:
    """``budget`` is the default budget; a request may bring its own (a ratio sweep over one shared context)."""

    policy: Policy
    budget: Budget = field(default_factory=Budget)
    allocator: Allocator | None = None
    # budget.summary_fit's queries: seq id -> per layer [H_q, <= m, D], the first observation's that ask about the
    # prompt (kept with the sequence, as the policy's scores are)
    fit_queries: dict[int, list[torch.Tensor]] = field(default_factory=dict, init=False, repr=False)
    offsets: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)  # budget.summary_offset
    # sequences whose summary slot carries budget.summary_offset (its bias no longer counts its tokens) or
    # budget.summary_sketch (the sketch describes that one fold): they do not fold again (a later compression, under
    # pool pressure or of a fork, drops what it evicts)
    folded_once: set[int] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self.check_budget(self.budget)
        if self.allocator is None:
            self.allocator = build_allocator(self.budget.allocation, self.budget.allocator_args)

    def check_budget(self, budget: Budget) -> None:
        """Raise ``ValueError`` when ``budget``'s allocation is unknown or does not compose with the policy."""
        allowed = self.policy.allocations  # an instance may narrow its class's (a hybrid: its children's)
        if allowed is not None and budget.allocation not in allowed:
            raise ValueError(
                f"policy {type(self.policy).__name__} does not compose with budget.allocation="
                f"{budget.allocation!r}: it supports {', '.join(allowed)}"
            )
        build_allocator(budget.allocation, budget.allocator_args)
        observes = self.policy.window != 0 or type(self.policy).reconstruction is not Policy.reconstruction
        if budget.summary_fit and not observes:
            raise ValueError(
                f"budget.summary_fit={budget.summary_fit} fits summary slots to the queries the policy observes, "
                f"but {type(self.policy).__name__} observes none: use a policy with an observation window or a "
                "reconstruction (kvzip, snapkv, tova, ...), or set budget.summary_fit=0"
            )

    @property
    def active(self) -> bool:
        """Whether the default budget compresses at all."""
        return self.compresses(None)

    def compresses(self, budget: Budget | None) -> bool:
        """Whether a sequence held to ``budget`` (None: the default) is ever compressed."""
        return self.policy.evicts and (budget or self.budget).compresses

    @property
    def window(self) -> int:
        """Trailing prompt queries whose attention the policy wants (-1 = all, 0 = none)."""
        return self.policy.window

    # ------------------------------------------------------------------ observation (the Observer protocol)
    def configure_step(self, step: ForwardStep, observe_window: int) -> None:
        """Ask the attention of this forward for the statistics the policy needs, addressed to this compressor."""
        step.observer = self
        if observe_window:
            step.obs_window, step.obs_power = observe_window, self.policy.window_power
            step.obs_reduce, step.obs_exclude = self.policy.window_reduce, self.policy.window_exclude
        if step.plan.is_decode:
            step.decode_power = self.policy.decode_power
            step.decode_probs = self.policy.wants_decode_probs

    def observe_prefill(self, cache: PagedKVCache, obs: PrefillObservation) -> None:
        self.policy.observe_prefill(cache, obs)
        m = self.budget.summary_fit
        layers = self.fit_queries.setdefault(obs.seq_id, []) if m else None
        if layers is not None and len(layers) == obs.layer:  # this layer's first observation of the sequence
            q = obs.queries[0]  # [H_q, w, D]: a reconstruction pass opens with its repeat request, a window ends
            layers.append((q[:, :m] if obs.every_query else q[:, -m:]).clone())  # with the prompt's question

    def observe_decode(self, cache: PagedKVCache, obs: DecodeObservation) -> None:
        self.policy.observe_decode(cache, obs)

    # ------------------------------------------------------------------ per-sequence state
    def fork(self, parent: int, child: int) -> None:
        """A cache sequence was forked: the policy copies whatever it keeps per sequence."""
        self.policy.fork(parent, child)
        if parent in self.fit_queries:
            self.fit_queries[child] = list(self.fit_queries[parent])
        if parent in self.folded_once:
            self.folded_once.add(child)

    def release(self, seq_id: int) -> None:
        """A cache sequence was released: the policy drops what it kept for it."""
        self.policy.release(seq_id)
        self.fit_queries.pop(seq_id, None)
        self.folded_once.discard(seq_id)

    # ------------------------------------------------------------------ compression
    @torch.no_grad()
    def compress(self, cache: PagedKVCache, seq_ids: list[int], budget: Budget | None = None) -> int:
        """Evict ``seq_ids`` down to ``budget`` (default: :attr:`budget`); returns the number of blocks freed."""
        budget = budget or self.budget
        if not self.compresses(budget) or not seq_ids:
            return 0
        seen_h = cache.seen[seq_ids]  # host copy: [S]
        seen_list = seen_h.tolist()
        folds = [budget.folds(s) for s in seen_list]
        if budget.folds_once:  # a sequence whose slot carries an offset or a sketch folded once already
            folds = [f and q not in self.folded_once for q, f in zip(seq_ids, folds, strict=True)]
        if budget.summary_slots and not all(folds):  # some are past summary_max_ratio: they drop what they evict
            folding = [q for q, f in zip(seq_ids, folds, strict=True) if f]
            dropping = [q for q, f in zip(seq_ids, folds, strict=True) if not f]
            return self.compress(cache, folding, budget) + self.compress(cache, dropping, budget.without_summaries())
        for s in seen_list:
            budget.check(s, self.policy.sinks)
        seen = torch.as_tensor(seen_h, device=cache.device)
        recent = seen - torch.tensor([budget.protected(s) for s in seen_list], device=cache.device)  # [S]
        with_kv = self.policy.needs_kv or budget.summary_slots > 0
        views = [cache.view(layer, seq_ids, with_kv=with_kv) for layer in range(cache.num_layers)]
        N = max(v.valid.shape[-1] for v in views)
        if N == 0:
            return 0
        n_sinks = budget.n_sinks + self.policy.sinks
        ranks = []
        for v, r in zip(views, self.policy.rank_layers(views, seen), strict=True):
            r = finite_ranks(r)
            protected = (v.positions >= recent[:, None, None]) | (v.positions < n_sinks)
            r = torch.where(protected, torch.inf, r).masked_fill(~v.valid, -torch.inf)
            ranks.append(torch.nn.functional.pad(r, (0, N - r.shape[-1]), value=-torch.inf))
        ranks_t = torch.stack(ranks)  # [L, S, H, N]
        lengths = torch.stack([v.lengths for v in views])  # [L, S, H]
        floor = torch.isposinf(ranks_t).sum(-1)
        per_seq = cache.num_layers * cache.num_kv_heads
        target = torch.tensor(
            [budget.per_head_target(s) * per_seq for s in seen_list], dtype=torch.float64, device=cache.device
        )
        same = (budget.allocation, budget.allocator_args) == (self.budget.allocation, self.budget.allocator_args)
        allocator = self.allocator if same else build_allocator(budget.allocation, budget.allocator_args)
        depth = torch.tensor([budget.depth(s) for s in seen_list], dtype=torch.float64, device=cache.device)  # [S]
        counts = allocator.allocate(ranks_t, lengths, floor, target, cache.block_size, depth=depth)
        fold_views = views[: budget.summary_layers] if budget.summary_slots else []  # the layers that fold
        if fold_views:  # the summaries take the places of each head's lowest-ranked kept tokens, so a head holds
            # what its allocator gave it (the global allocator's whole freed blocks stay whole)
            k = len(fold_views)
            counts = torch.cat([torch.maximum(counts[:k] - budget.summary_places, floor[:k]), counts[k:]])
        keep = keep_top(ranks_t, counts)
        if fold_views:
            queries = self._queries_to_fit(seq_ids, cache.num_layers, budget) if budget.summary_fit else None
            keep = fold_evicted(
                cache,
                fold_views,
                keep,
                budget.summary_slots,
                budget.summary_kmeans,
                queries,
                budget.summary_fit_value,
                budget.summary_spread,
                budget.summary_shared_value,
                self.summary_offsets(budget, cache) if budget.summary_offset else None,
                bool(budget.summary_sketch),
            )
            if budget.folds_once:
                self.folded_once.update(seq_ids)
        return cache.evict(seq_ids, keep)

    def summary_offsets(self, budget: Budget, cache: PagedKVCache) -> torch.Tensor:
        """``budget.summary_offset``'s offsets ``[L, H]`` on the cache's device, read and checked against the cache's
        geometry once per file (:class:`BudgetError` for a file measured for another model)."""
        path = str(budget.summary_offset)
        if path not in self.offsets:
            gap = budget.offsets(cache.num_layers, cache.num_kv_heads)
            self.offsets[path] = torch.tensor(gap, dtype=torch.float32, device=cache.device)
        return self.offsets[path]

    def _queries_to_fit(
        self, seq_ids: list[int], num_layers: int, budget: Budget
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the kept queries of ``seq_ids`` padded to one length: ``(q [S, H_q, M, D], valid [S, M])``.
        How many were kept per sequence is the default budget's ``summary_fit``, which observes before any
        request's budget is known."""
        missing = [s for s in seq_ids if len(self.fit_queries.get(s, [])) < num_layers]
        if missing:
            raise ValueError(
                f"budget.summary_fit={budget.summary_fit} fits summary slots to observed queries, but policy "
                f"{type(self.policy).__name__} observed none for sequence(s) {missing}: use a policy with an "
                "observation window or a reconstruction (kvzip, snapkv, tova, ...), or set budget.summary_fit=0"
            )
        out = []
        for layer in range(num_layers):
            qs = [self.fit_queries[s][layer] for s in seq_ids]
            M = max(q.shape[1] for q in qs)
            valid = torch.stack([torch.arange(M, device=qs[0].device) < q.shape[1] for q in qs])
            padded = torch.stack([torch.nn.functional.pad(q, (0, 0, 0, M - q.shape[1])) for q in qs])
            out.append((padded, valid))
        return out
