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
:func:`~kvcompress.experiment.prompts.bind_tokenizer`, which renders it with ``repeat_prompt_ids``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from kvcompress.cache.paged import PagedKVCache
from kvcompress.cache.step import PrefillObservation
from kvcompress.policies.base import Policy, group_max

DEFAULT_INSTRUCTION = "Repeat the previous context exactly."


@dataclass
class KVzipPolicy(Policy):
    """``instruction``: the repeat request, rendered after the context (as the end of its user turn, then the
    assistant header, when the tokenizer has a chat template); ``repeat_ids``: its token ids, set by the caller
    that owns the tokenizer (None until then: reconstruction raises)."""

    instruction: str = DEFAULT_INSTRUCTION
    repeat_ids: list[int] | None = None
    window_reduce: ClassVar[str] = "max"

    def reconstruction(self, prompt: Sequence[int]) -> list[int]:
        """``[*repeat_ids, *prompt]``: the repeat prompt, then the context teacher-forced as its answer."""
        if self.repeat_ids is None:
            raise ValueError(
                "KVzipPolicy.repeat_ids is not set: tokenize the repeat prompt with the model's tokenizer, e.g. "
                "policy.repeat_ids = kvcompress.experiment.prompts.repeat_prompt_ids(tokenizer, policy.instruction)"
            )
        return [*self.repeat_ids, *prompt]

    def observe_prefill(self, cache: PagedKVCache, obs: PrefillObservation) -> None:
        """Fold one reconstruction chunk in: slot score = max(score so far, max over the group's query heads of
        the chunk's max attention). Context slots start at 0 (the context prefill is not observed)."""
        view = cache.view(obs.layer, [obs.seq_id], with_kv=False)
        assert obs.window_probs is not None, "KVzip observes every reconstruction query"
        probs = obs.window_probs[..., : view.valid.shape[-1]].float()  # [1, H_q, L], max over the chunk's queries
        cache.set_scores(view, view.scores.maximum(group_max(probs, view.valid.shape[1])))
