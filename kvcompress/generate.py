"""``generate()``: greedy generation of a batch of prompts through the :class:`~kvcompress.engine.Engine`.

Two evaluation modes (docs/EXPERIMENTS.md, "Prompts and modes"):

* ``query_aware``: context + question are prefilled, then compressed; the template's tail (``suffix``: end of
  turn, assistant header) is prefilled on the compressed cache, then the answer is decoded.
* ``query_agnostic``: the context is prefilled and compressed before the question is seen; the question (and
  the suffix) are then prefilled on top of the compressed cache, unobserved by the policy.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel

from kvcompress.compressor import Compressor
from kvcompress.engine import Engine
from kvcompress.sequence import Request, RequestOutput

MODES = ("query_aware", "query_agnostic")


def as_request(
    request_id: int | str,
    context: Sequence[int],
    question: Sequence[int],
    mode: str,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    suffix: Sequence[int] = (),
    **fields,
) -> Request:
    """The request that evaluates ``context + question + suffix`` in ``mode``: what is compressed (context, plus
    the question when query-aware) and what is prefilled after compression (the rest)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "query_agnostic":
        compressed, after = list(context), [*question, *suffix]
    else:
        compressed, after = [*context, *question], list(suffix)
    return Request(request_id, compressed, max_new_tokens, eos_token_ids, question_ids=after, **fields)


def generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int] | tuple[Sequence[int], Sequence[int]]],
    compressor: Compressor | None = None,
    max_new_tokens: int = 32,
    eos_token_ids: Sequence[int] = (),
    mode: str = "query_aware",
    block_size: int = 16,
    num_blocks: int | None = None,
    cuda_graphs: bool | None = None,
) -> list[RequestOutput]:
    """Greedy-generate for a batch of prompts through one engine (one shared paged pool, batched decode).

    A prompt is a token list, or a ``(context_ids, question_ids)`` pair; in ``query_agnostic`` mode the context
    is compressed before the question is prefilled, in ``query_aware`` mode the whole prompt is compressed. Each
    output's ``memory`` is its cache accounting when decoding began; ``last_logits`` are its final-step logits.
    ``cuda_graphs``: see :class:`~kvcompress.engine.Engine` (None: on wherever the model is on CUDA).
    """
    pairs = [(list(p[0]), list(p[1])) if isinstance(p, tuple) else (list(p), []) for p in prompts]
    requests = [as_request(i, c, q, mode, max_new_tokens, eos_token_ids) for i, (c, q) in enumerate(pairs)]
    longest = max(len(c) + len(q) for c, q in pairs) + max_new_tokens
    engine = Engine(
        model,
        compressor,
        num_blocks=num_blocks,
        block_size=block_size,
        max_seqs=len(pairs),
        max_tokens_per_head=longest,
        keep_logits=True,
        cuda_graphs=cuda_graphs,
    )
    return engine.run(requests)
