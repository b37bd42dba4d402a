"""How much a sequence's cache may keep, and when compression runs."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcompress.cache.sketch import TAILS

RATIO_TOLERANCE = 1e-9
"""Relative slack when a sequence's compression (tokens seen over the per-head target) meets a configured ratio
(``summary_max_ratio``, the global allocator's ``floor_from``), so float rounding at the ratio itself does not
flip the comparison."""


class BudgetError(ValueError):
    """A budget that cannot be honoured (ratio < 1, budget below the protected window, ...)."""


@dataclass
class Budget:
    """A per-sequence KV budget.

    ``ratio`` keeps 1/ratio of the tokens seen (summed over every layer and kv head); ``max_cache_tokens`` instead
    fixes the average number of tokens per kv head (KV-Compress's ``max_cache_tokens``) and wins when set.
    The last ``protected_window`` tokens and the first ``n_sinks`` tokens of every head are never evicted and
    count inside the budget. ``protected_fraction`` (None: off) caps the recent window at that share of the per-head
    target, ``min(protected_window, floor(protected_fraction × per_head_target))``, so a high ratio on a short
    input keeps most of its budget for scored tokens (see :meth:`protected`). ``allocation`` names the allocator
    (see :mod:`kvcompress.allocators`) and ``allocator_args`` its parameters (its dataclass fields).
    ``compress_every`` > 0 re-compresses every N decode steps (continual compression); 0 compresses only after
    the prompt. ``summary_slots`` > 0 folds what each kv head evicts into that many summary slots (mean key and
    value, weighted as the tokens they stand for; :mod:`kvcompress.cache.summary`) instead of dropping it; they
    count inside the budget. ``summary_kmeans`` > 0 regroups each head's evicted tokens by key before folding
    them (that many k-means iterations, starting from the groups by position), so that each slot's members have
    similar keys and its mean key weighs them closer to their true attention mass. ``summary_fit`` = m > 0 fits
    each slot's bias and value to m queries per query head that the policy observed asking about the prompt (the
    last m of its observation window, or the first m of a reconstruction pass: KVzip's repeat request), instead
    of the ``log(n)`` bias and the mean value; the policy must observe some queries. ``summary_fit_value=false``
    fits the bias only and keeps the members' mean value. ``summary_spread`` makes each slot two, at its members'
    mean key plus and minus their spread along their principal key direction (twice the places in the budget), so
    that a query's share of the group follows how far its direction spreads their logits. ``summary_shared_value``
    gives every slot of a head the mean value of all it evicts, so that the slots (several, best grouped by key)
    sketch only the evicted tokens' share of each query's attention. ``summary_offset`` (a path) adds a measured
    offset per (layer, kv head) to the one summary slot's ``log(n)`` bias (:mod:`kvcompress.cache.summary`); a
    sequence folds with it once, and a later compression of it drops what it evicts. ``summary_sketch`` = r > 0 keeps,
    beside the one summary slot per kv head, a rank-r sketch of the keys it folds (their top r principal directions),
    and each query adds to the slot's logit a term that grows with how far its direction spreads those keys' logits,
    so the slot weighs for each query about what its members would (:mod:`kvcompress.cache.sketch`;
    ``summary_sketch_tails`` ``uniform`` or ``gaussian`` says how); a sequence folds with it once, as with an offset.
    ``summary_max_ratio`` (None: every ratio) folds only for a sequence compressed at most that much (its tokens seen
    over its per-head target, :meth:`folds`); one compressed harder drops what it evicts, as without summary slots.
    ``summary_layers`` = k (None: every layer) folds in the first k layers only; the layers above drop what they
    evict. It asks where a head's evicted average matters (docs/RESULTS.md, "Which layers lose a multikey binding at
    4k" and "Summary slots in the first layers only"; no preset sets it).
    """

    ratio: float = 1.0
    max_cache_tokens: int | None = None
    protected_window: int = 32
    n_sinks: int = 0
    allocation: str = "uniform"
    allocator_args: dict[str, Any] | None = None  # None: the allocator's defaults; stored as a dict
    compress_every: int = 0
    protected_fraction: float | None = None
    summary_slots: int = 0
    summary_kmeans: int = 0
    summary_fit: int = 0
    summary_fit_value: bool = True
    summary_spread: bool = False
    summary_shared_value: bool = False
    summary_offset: str | None = None
    summary_sketch: int = 0
    summary_sketch_tails: str = "uniform"
    summary_max_ratio: float | None = None
    summary_layers: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and self.ratio >= 1):
            raise BudgetError(f"budget.ratio must be a number >= 1 (1 = no compression), got {self.ratio!r}")
        if self.max_cache_tokens is not None and self.max_cache_tokens < 1:
            raise BudgetError(f"budget.max_cache_tokens must be >= 1 tokens per kv head, got {self.max_cache_tokens}")
        names = ("protected_window", "n_sinks", "compress_every", "summary_slots", "summary_kmeans", "summary_fit")
        for name in (*names, "summary_sketch"):
            if getattr(self, name) < 0:
                raise BudgetError(f"budget.{name} must be >= 0, got {getattr(self, name)}")
        if self.summary_kmeans and self.summary_slots < 2:
            raise BudgetError(
                f"budget.summary_kmeans={self.summary_kmeans} regroups a head's summary slots by key, which needs "
                f"budget.summary_slots >= 2 (got {self.summary_slots}); set summary_kmeans=0 or more summary slots"
            )
        if self.summary_fit and not self.summary_slots:
            raise BudgetError(
                f"budget.summary_fit={self.summary_fit} fits the summary slots to observed queries, which needs "
                "budget.summary_slots >= 1 (got 0)"
            )
        if not isinstance(self.summary_fit_value, bool):
            raise BudgetError(f"budget.summary_fit_value must be true or false, got {self.summary_fit_value!r}")
        if not isinstance(self.summary_spread, bool):
            raise BudgetError(f"budget.summary_spread must be true or false, got {self.summary_spread!r}")
        if self.summary_spread and (not self.summary_slots or self.summary_fit):
            raise BudgetError(
                "budget.summary_spread=true splits each summary slot in two, which needs budget.summary_slots >= 1 "
                f"and no budget.summary_fit (got summary_slots={self.summary_slots}, summary_fit={self.summary_fit})"
            )
        if not isinstance(self.summary_shared_value, bool):
            raise BudgetError(f"budget.summary_shared_value must be true or false, got {self.summary_shared_value!r}")
        if self.summary_shared_value and (self.summary_slots < 2 or self.summary_fit or self.summary_spread):
            raise BudgetError(
                "budget.summary_shared_value=true gives every summary slot of a head its mean evicted value, which "
                "needs budget.summary_slots >= 2, no budget.summary_fit and no budget.summary_spread (got "
                f"summary_slots={self.summary_slots}, summary_fit={self.summary_fit}, "
                f"summary_spread={str(self.summary_spread).lower()})"
            )
        if self.summary_offset is not None:
            if not isinstance(self.summary_offset, str) or not Path(self.summary_offset).expanduser().is_file():
                raise BudgetError(
                    f"budget.summary_offset must be null or a file of per-(layer, kv head) offsets, as "
                    f"scripts/slot_share.py --save-gap writes; no such file: {self.summary_offset!r}"
                )
            self.offsets()  # a file of the wrong form fails here, before any model loads
            if self.summary_slots != 1 or self.summary_fit or self.summary_spread or self.compress_every:
                raise BudgetError(
                    "budget.summary_offset adds the gap scripts/slot_share.py measured for one slot per head to that "
                    "slot's bias, once, at the prompt's compression: it needs budget.summary_slots=1, no summary_fit, "
                    f"no summary_spread and compress_every=0 (got summary_slots={self.summary_slots}, "
                    f"summary_fit={self.summary_fit}, summary_spread={str(self.summary_spread).lower()}, "
                    f"compress_every={self.compress_every})"
                )
        if self.summary_sketch:
            if self.summary_slots != 1 or self.summary_fit or self.summary_spread or self.summary_offset:
                raise BudgetError(
                    f"budget.summary_sketch={self.summary_sketch} sketches the keys one log(n) summary slot per head "
                    "folds: it needs budget.summary_slots=1, no summary_fit, no summary_spread and no summary_offset "
                    f"(got summary_slots={self.summary_slots}, summary_fit={self.summary_fit}, "
                    f"summary_spread={str(self.summary_spread).lower()}, summary_offset={self.summary_offset!r})"
                )
            if self.compress_every:
                raise BudgetError(
                    f"budget.summary_sketch={self.summary_sketch} sketches what the prompt's compression folds, once; "
                    f"it needs compress_every=0 (got {self.compress_every})"
                )
        if self.summary_sketch_tails not in TAILS:
            raise BudgetError(
                f"budget.summary_sketch_tails must be one of {', '.join(TAILS)}, got {self.summary_sketch_tails!r}"
            )
        if not self.summary_fit_value and not self.summary_fit:
            raise BudgetError(
                "budget.summary_fit_value=false keeps the mean value of slots fitted to observed queries, which "
                "needs budget.summary_fit >= 1 (got 0)"
            )
        if self.summary_max_ratio is not None:
            if not (isinstance(self.summary_max_ratio, (int, float)) and self.summary_max_ratio >= 1):
                raise BudgetError(
                    f"budget.summary_max_ratio must be null (summary slots at every ratio) or a ratio >= 1, got "
                    f"{self.summary_max_ratio!r}"
                )
            if not self.summary_slots:
                raise BudgetError(
                    f"budget.summary_max_ratio={self.summary_max_ratio} limits the summary slots to light "
                    "compression, which needs budget.summary_slots >= 1 (got 0)"
                )
        if self.summary_layers is not None:
            if not (isinstance(self.summary_layers, int) and self.summary_layers >= 1):
                raise BudgetError(
                    f"budget.summary_layers must be null (summary slots in every layer) or a number of layers >= 1 "
                    f"(the first ones fold), got {self.summary_layers!r}"
                )
            if not self.summary_slots:
                raise BudgetError(
                    f"budget.summary_layers={self.summary_layers} limits the summary slots to the first layers, "
                    "which needs budget.summary_slots >= 1 (got 0)"
                )
        if self.protected_fraction is not None and not 0 <= self.protected_fraction <= 1:
            raise BudgetError(
                f"budget.protected_fraction must be null (off) or in [0, 1] (a share of the per-head budget), "
                f"got {self.protected_fraction!r}"
            )
        self.allocator_args = dict(self.allocator_args or {})

    def offsets(self, num_layers: int | None = None, num_kv_heads: int | None = None) -> list[list[float]]:
        """``summary_offset``'s offsets, one list per layer of one offset per kv head (the ``gap`` of a
        ``scripts/slot_share.py --save-gap`` JSON file); checked against the model's geometry when it is given."""
        path = str(self.summary_offset)
        try:
            gap = json.loads(Path(path).expanduser().read_text())["gap"]
            ok = isinstance(gap, list) and gap and all(isinstance(row, list) and row for row in gap)
            ok = ok and len({len(row) for row in gap}) == 1
            ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) for row in gap for x in row)
            ok = ok and all(math.isfinite(x) for row in gap for x in row)
            gap = [[float(x) for x in row] for row in gap] if ok else None
        except (OSError, ValueError, KeyError, TypeError):
            gap = None
        if gap is None:
            raise BudgetError(
                f"budget.summary_offset {path!r} is not a scripts/slot_share.py --save-gap file (JSON with 'gap': "
                "one list per layer of one finite offset per kv head)"
            )
        if num_layers is not None and (len(gap), len(gap[0])) != (num_layers, num_kv_heads):
            raise BudgetError(
                f"budget.summary_offset {path!r} holds offsets for {len(gap)} layers x {len(gap[0])} kv heads, but "
                f"the model has {num_layers} x {num_kv_heads}: measure them for this model with scripts/slot_share.py"
            )
        return gap

    @property
    def compresses(self) -> bool:
        return self.max_cache_tokens is not None or self.ratio > 1

    def per_head_target(self, seen: int) -> float:
        """Average tokens a kv head may keep for a sequence that has seen ``seen`` tokens."""
        if self.max_cache_tokens is not None:
            return float(self.max_cache_tokens)
        return seen / self.ratio

    def depth(self, seen: int) -> float:
        """How hard a sequence that has seen ``seen`` tokens is compressed: ``seen`` over :meth:`per_head_target`
        (the ratio itself, or more under ``max_cache_tokens``). ``summary_max_ratio`` and the global allocator's
        ``floor_from`` compare it with a ratio."""
        return seen / self.per_head_target(seen)

    def folds(self, seen: int) -> bool:
        """Whether a sequence that has seen ``seen`` tokens folds what it evicts into summary slots: it has some,
        and its :meth:`depth` is at most ``summary_max_ratio``."""
        return bool(self.summary_slots) and self._light(self.depth(seen))

    @property
    def ever_folds(self) -> bool:
        """Whether some sequence held to this budget may fold into summary slots, so its cache needs them: with a
        ratio, :meth:`folds` is the same for every length; with ``max_cache_tokens``, it depends on the length."""
        light = self.max_cache_tokens is not None or self._light(self.ratio)
        return bool(self.summary_slots) and light

    def _light(self, depth: float) -> bool:
        """Whether a :meth:`depth` is at most ``summary_max_ratio`` (None: always)."""
        return self.summary_max_ratio is None or depth <= self.summary_max_ratio * (1 + RATIO_TOLERANCE)

    def without_summaries(self) -> Budget:
        """This budget with no summary slots: what a sequence compressed past ``summary_max_ratio`` is held to."""
        return dataclasses.replace(
            self,
            summary_slots=0,
            summary_kmeans=0,
            summary_fit=0,
            summary_fit_value=True,
            summary_spread=False,
            summary_shared_value=False,
            summary_offset=None,
            summary_sketch=0,
            summary_max_ratio=None,
            summary_layers=None,
        )

    def protected(self, seen: int) -> int:
        """Recent tokens never evicted for a sequence that has seen ``seen`` tokens: ``protected_window``, capped at
        ``floor(protected_fraction × per_head_target(seen))`` when ``protected_fraction`` is set."""
        if self.protected_fraction is None:
            return self.protected_window
        return min(self.protected_window, math.floor(self.protected_fraction * self.per_head_target(seen)))

    @property
    def folds_once(self) -> bool:
        """Whether a sequence folds into summary slots at one compression only (an offset or a sketch describes that
        fold); a later compression of it drops what it evicts."""
        return bool(self.summary_offset) or bool(self.summary_sketch)

    @property
    def summary_places(self) -> int:
        """Places each folding head gives its summaries: ``summary_slots``, twice that with ``summary_spread``."""
        return self.summary_slots * (2 if self.summary_spread else 1)

    def check(self, seen: int, extra_protected: int = 0) -> None:
        """Raise :class:`BudgetError` when the budget is smaller than what is always kept."""
        window = self.protected(seen)
        slots = self.summary_places if self.folds(seen) else 0
        floor = window + self.n_sinks + extra_protected + slots
        target = self.per_head_target(seen)
        if seen > floor and math.floor(target) < floor:
            raise BudgetError(
                f"the budget ({target:.1f} tokens per kv head for a {seen}-token sequence"
                f"{f' at ratio {self.ratio:g}' if self.max_cache_tokens is None else ''}) is smaller than the "
                f"protected tokens ({window} recent + {self.n_sinks + extra_protected} sinks"
                f"{f' + {slots} summary slots' if slots else ''}). Lower "
                "budget.protected_window / budget.n_sinks / budget.summary_slots, use a smaller ratio, or use longer "
                "inputs."
            )
