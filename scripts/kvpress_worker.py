"""Run one NVIDIA kvpress press over prepared samples with kvpress's own pipeline; write predictions as jsonl.

Started by scripts/compare_kvpress.py with the kvpress virtualenv's python (imports only kvpress, transformers
and torch: kvcompress is not installed there). Input lines: ``{"id", "context", "question", "max_new_tokens"}``,
already laid out for the mode (query-aware: the question folded into ``context``, ``question`` empty). Samples
sharing a context are answered in one pipeline call with ``questions=[...]``, as kvpress's own evaluation does
(the context is prefilled and compressed once, then each question is decoded greedily from that cache).

Output lines: ``{"id", "prediction", "context_tokens", "question_tokens"}``, the token counts being what the
pipeline prefilled as the compressed context and as the uncompressed question part (chat template included).

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

    with open(args.out, "w", encoding="utf-8") as out:
        for (context, max_new), group in groups.items():
            questions = [s["question"] for s in group]
            t0 = time.perf_counter()
            answers = pipe(context, questions=questions, press=press, max_new_tokens=max_new)["answers"]
            elapsed = time.perf_counter() - t0
            ids = pipe.preprocess(context, questions, answer_prefix="", max_context_length=int(1e10))
            context_tokens = int(ids["context_ids"].shape[1])
            for s, answer, q_ids in zip(group, answers, ids["questions_ids"], strict=True):
                row = {
                    "id": s["id"],
                    "prediction": answer.strip(),
                    "context_tokens": context_tokens,
                    "question_tokens": int(q_ids.shape[1]),
                    "time_s": elapsed / len(group),
                }
                out.write(json.dumps(row) + "\n")
                out.flush()


if __name__ == "__main__":
    main()
