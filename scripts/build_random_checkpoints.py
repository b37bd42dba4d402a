#!/usr/bin/env python
"""Build random-weight Hugging Face checkpoints of real model geometries, for GPU speed runs on offline nodes.

The embedded SmolLM2 GGUF (98 MB) does not travel to the GPU nodes and real 8B checkpoints are far larger, but speed
depends only on the geometry. So this writes ``config.json`` + ``generation_config.json`` + safetensors shards with
seeded random weights + the embedded SmolLM2 tokenizer (vocab 49152, which every geometry here uses, so any token it
produces is a valid id). Each directory loads with ``AutoModelForCausalLM.from_pretrained(dir)`` and
``kvcompress.model.load_model(dir)``.

    python scripts/build_random_checkpoints.py --out random-checkpoints                 # all of GEOMETRIES but tiny
    python scripts/build_random_checkpoints.py --out ckpt --names smollm2 llama8b-w8
    python scripts/build_random_checkpoints.py --tokenizer-only tok/                    # export the tokenizer (MBs)
    python scripts/build_random_checkpoints.py --out ckpt --tokenizer tok/              # on the node: carried copy

Memory: the model is instantiated on the ``meta`` device (no storage); each tensor is generated on the CPU from its
own seed (``seed ^ crc32(name)``, so a tensor does not depend on which others are built) and written shard by shard,
so the peak is about one shard (``--max-shard-mb``) plus one fp32 tensor. ``llama8b-w8`` (2.15 G params) is 4.3 GB
in bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

VOCAB = 49152  # the SmolLM2 tokenizer's vocabulary: every geometry uses it so its tokens are valid ids
GEOMETRIES: dict[str, dict] = {
    # SmolLM2-135M's own config (the embedded model): 30 layers, 9 q / 3 kv heads, head_dim 64, tied embeddings.
    "smollm2": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # Llama-3.1-8B width (32 q / 8 kv heads, head_dim 128) with 8 of its 32 layers.
    "llama8b-w8": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=8,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # Qwen2-7B-style attention (28 q / 4 kv heads, head_dim 128, qkv bias) with 8 layers.
    "qwen-28-4-128": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=8,
        num_attention_heads=28,
        num_key_value_heads=4,
        head_dim=128,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    # For tests: a few MB, same vocabulary.
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
}
DEFAULT_NAMES = ["smollm2", "llama8b-w8", "qwen-28-4-128"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INIT_STD = 0.02  # initializer_range of all three families


def embedded_tokenizer() -> PreTrainedTokenizerBase:
    """The embedded SmolLM2 tokenizer: from the converted cache when present (fast), else from the GGUF."""
    from kvcompress.model import cache_root, embedded_gguf

    for converted in sorted(cache_root().glob("smollm2-*")):
        if (converted / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(converted)
    gguf = embedded_gguf("smollm2")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def make_config(name: str, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> PretrainedConfig:
    """The HF config of geometry ``name``, with the tokenizer's special-token ids."""
    geo = dict(GEOMETRIES[name])
    if len(tokenizer) > VOCAB:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the geometries' vocab {VOCAB}")
    rope = {"rope_type": "default", "rope_theta": geo.pop("rope_theta")}
    config = AutoConfig.for_model(
        geo.pop("model_type"),
        vocab_size=VOCAB,
        rope_parameters=rope,
        initializer_range=INIT_STD,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **geo,
    )
    config.dtype = dtype
    return config


def tensor_shapes(config: PretrainedConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor the checkpoint stores (model built on ``meta``: no memory). Also records the
    model class in ``config.architectures``, as ``save_pretrained`` would."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # stored once, as the input embedding
    return shapes


def random_tensor(name: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Seeded init of one tensor: norms 1, biases 0, matrices N(0, 0.02) (so activations stay finite in bf16)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
    return (torch.randn(shape, generator=gen) * INIT_STD).to(dtype)


def shards(shapes: dict[str, torch.Size], dtype: torch.dtype, max_bytes: int) -> Iterator[list[str]]:
    """Tensor names in state-dict order, grouped so that each group's bytes stay under ``max_bytes``."""
    group: list[str] = []
    size = 0
    elt = torch.empty((), dtype=dtype).element_size()
    for name, shape in shapes.items():
        nbytes = shape.numel() * elt
        if group and size + nbytes > max_bytes:
            yield group
            group, size = [], 0
        group.append(name)
        size += nbytes
    if group:
        yield group


def build(
    name: str, out: Path, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, seed: int, max_shard_bytes: int
) -> Path:
    """Write checkpoint ``name`` into ``out/name``; returns that directory."""
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    config = make_config(name, tokenizer, dtype)
    shapes = tensor_shapes(config)
    groups = list(shards(shapes, dtype, max_shard_bytes))
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        file = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(
            {n: random_tensor(n, shapes[n], dtype, seed) for n in group}, target / file, metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(group, file))
        print(f"  {name}: wrote {file} ({len(group)} tensors)", flush=True)
    if len(groups) > 1:
        total = sum(shapes[n].numel() for n in shapes) * torch.empty((), dtype=dtype).element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(target)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(target)
    tokenizer.save_pretrained(target)
    params = sum(s.numel() for s in shapes.values())
    print(f"{name}: {params / 1e9:.3f} G params, {str(dtype).removeprefix('torch.')} -> {target}", flush=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="parent directory: each checkpoint goes to OUT/<name>")
    parser.add_argument(
        "--names",
        nargs="+",
        default=DEFAULT_NAMES,
        choices=sorted(GEOMETRIES),
        help=f"geometries to build (default: {' '.join(DEFAULT_NAMES)})",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the saved weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-mb", type=int, default=2048, help="safetensors shard size limit (MiB)")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="a tokenizer directory (e.g. from --tokenizer-only) to use instead of the embedded model's",
    )
    parser.add_argument(
        "--tokenizer-only",
        type=Path,
        metavar="DIR",
        help="only export the embedded SmolLM2 tokenizer to DIR (a few MB, to carry to a node)",
    )
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else embedded_tokenizer()
    if args.tokenizer_only:
        tokenizer.save_pretrained(args.tokenizer_only)
        print(f"tokenizer ({len(tokenizer)} tokens) -> {args.tokenizer_only}")
        return 0
    if args.out is None:
        parser.error("--out is required (unless --tokenizer-only)")
    for name in args.names:
        build(name, args.out, tokenizer, DTYPES[args.dtype], args.seed, args.max_shard_mb << 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
