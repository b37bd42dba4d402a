"""Triton paged-attention kernels for kvcompress (imported as ``kvcompress_kernels``).

Each op has a Triton kernel (``*_triton``), a PyTorch reference with the same signature (``*_torch``)
and a dispatcher (plain name) that picks one according to :func:`set_backend` /
``$KVCOMPRESS_KERNEL_BACKEND`` (``auto``: Triton for CUDA tensors, PyTorch for CPU tensors).
See docs/KERNELS.md for the memory layout and the algorithms.
"""

_hub = None
if __name__ == "kernels":
    # This directory was imported by its directory name: the repository root is on sys.path (`python -m ...`,
    # `python -c` or a REPL started there) and something asked for PyPI's `kernels` (Hugging Face's kernel hub,
    # which transformers imports). Where that package is installed, hand the name over to it; where it is not,
    # this directory answers as before (transformers then finds no version and treats the hub as absent).
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _root = Path(__file__).resolve().parents[1]
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if Path(p or ".").resolve() != _root]
    )
    if _spec is not None and _spec.loader is not None:
        _hub = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _hub  # `import kernels` returns what sys.modules holds once this file has run
        _spec.loader.exec_module(_hub)
if _hub is None:
    from ._common import gather_logical
    from .backend import get_backend, interpreter_enabled, set_backend, use_backend
    from .cache_ops import compact, compact_torch, compact_triton, write_kv, write_kv_torch, write_kv_triton
    from .dense_prefill import dense_prefill
    from .paged_decode import decode_probs_torch, paged_decode, paged_decode_torch, paged_decode_triton
    from .paged_prefill import paged_prefill, paged_prefill_torch, paged_prefill_triton

    __all__ = [
        "compact",
        "compact_torch",
        "compact_triton",
        "decode_probs_torch",
        "dense_prefill",
        "gather_logical",
        "get_backend",
        "interpreter_enabled",
        "paged_decode",
        "paged_decode_torch",
        "paged_decode_triton",
        "paged_prefill",
        "paged_prefill_torch",
        "paged_prefill_triton",
        "set_backend",
        "use_backend",
        "write_kv",
        "write_kv_torch",
        "write_kv_triton",
    ]
