"""Run one NVIDIA kvpress press over prepared samples with kvpress's own pipeline; write predictions as jsonl.

Started by scripts/compare_kvpress.py with the kvpress virtualenv's python (imports only kvpress, transformers
and torch: kvcompress is not installed there). Input lines: ``{"id", "context", "question", "max_new_tokens"}``,
already laid out for the mode (query-aware: the question folded into ``context``, ``question`` empty). Samples
sharing a context are answered in one pipeline call with ``questions=[...]``, as kvpress's own evaluation does
(the context is prefilled and compressed once, then each question is decoded greedily from that cache).

Output lines: ``{"id", "prediction", "context_tokens", "question_tokens"}``, the token counts being what the
pipeline prefilled as the compressed context and as the uncompressed question part (chat template included).

``--force``: every input line also carries ``forced_ids`` (an answer's token ids, e.g. the full cache's), and
instead of decoding, the pipeline's answer step teacher-forces them, forward for forward as kvpress decodes (the
question in one forward, then one per answer token, the forced token fed where greedy decoding feeds its own).
The line gets ``forced_ids`` (echoed, so a caller can tell what was forced), ``logprobs`` (each answer token's
log-probability) and ``greedy`` (the argmax at each step) in place of ``prediction``. Everything before that step
(prefill, the press, the cache trimmed after each question) is kvpress's own. Output is appended, so a caller can
resume by passing only the samples its file lacks.

    ~/.venvs/kvpress/bin/python scripts/kvpress_worker.py --model DIR --input in.jsonl --out preds.jsonl \\
        --press TOVAPress --compression-ratio 0.75
"""

from __future__ import annotations

import argparse
import json
import time

import kvpress
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
from transformers.utils import logging as hf_logging

EAGER_PRESSES = ("ObservedAttentionPress",)  # need the attention weights: eager attention


def main() -> None:
    parser = argparse.ArgumentParser(description="kvpress side of scripts/compare_kvpress.py")
    parser.add_argument("--model", required=True, help="local HF model directory")
    parser.add_argument("--input", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--press", default="", help="kvpress class name; empty: no press (full cache)")
    parser.add_argument("--compression-ratio", type=float, default=0.0, help="fraction of the context removed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="teacher-force each line's forced_ids (see above)")
    args = parser.parse_args()

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    attn = "eager" if args.press in EAGER_PRESSES else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), attn_implementation=attn
    ).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
    press = getattr(kvpress, args.press)(compression_ratio=args.compression_ratio) if args.press else None

    with open(args.input, encoding="utf-8") as handle:
        samples = [json.loads(line) for line in handle if line.strip()]
    groups: dict[tuple[str, int], list[dict]] = {}
    for s in samples:  # one call per (context, generation length): the compressed context is shared
        groups.setdefault((s["context"], s["max_new_tokens"]), []).append(s)

    with open(args.out, "a", encoding="utf-8") as out:  # appended: the caller resumes a cell cut short
        for (context, max_new), group in groups.items():
            questions = [s["question"] for s in group]
            if args.force:
                pipe.generate_answer = forced_answers(pipe, [s["forced_ids"] for s in group])
            t0 = time.perf_counter()
            answers = pipe(context, questions=questions, press=press, max_new_tokens=max_new)["answers"]
            elapsed = time.perf_counter() - t0
            ids = pipe.preprocess(context, questions, answer_prefix="", max_context_length=int(1e10))
            context_tokens = int(ids["context_ids"].shape[1])
            for s, answer, q_ids in zip(group, answers, ids["questions_ids"], strict=True):
                row = {
                    "id": s["id"],
                    **(answer if args.force else {"prediction": answer.strip()}),
                    "context_tokens": context_tokens,
                    "question_tokens": int(q_ids.shape[1]),
                    "time_s": elapsed / len(group),
                }
                out.write(json.dumps(row) + "\n")
                out.flush()


def forced_answers(pipe, forced: list[list[int]]):
    """A stand-in for ``pipe.generate_answer`` that teacher-forces ``forced`` (one answer per question, in the
    order kvpress asks them): returns ``{"forced_ids", "logprobs", "greedy"}`` per question instead of decoded text.

    It steps as kvpress's own ``generate_answer`` does, forward for forward: the question in one forward at the
    positions after the context, then one forward per answer token, each feeding the forced token where greedy
    decoding feeds its argmax. Presses that mask instead of evicting (KVzip's ``masked_key_indices``) build their
    fake keys from the queries of each forward, so the queries must come as kvpress's decoding brings them."""
    queue = iter(forced)

    @torch.no_grad()
    def generate_answer(question_ids: torch.Tensor, cache, context_length: int, max_new_tokens: int) -> dict:
        answer = next(queue)
        positions = torch.arange(context_length, context_length + question_ids.shape[1], device=question_ids.device)
        inputs, logprobs, greedy = question_ids, [], []
        for token in answer:
            logits = (
                pipe.model(input_ids=inputs, past_key_values=cache, position_ids=positions[None], logits_to_keep=1)
                .logits[0, -1]
                .float()
            )
            logprobs.append(float(logits.log_softmax(-1)[token]))
            greedy.append(int(logits.argmax()))
            inputs = torch.tensor([[token]], dtype=torch.long, device=question_ids.device)
            positions = positions[-1:] + 1
        return {"forced_ids": answer, "logprobs": logprobs, "greedy": greedy}

    return generate_answer


if __name__ == "__main__":
    main()
