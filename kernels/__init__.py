"""Triton paged-attention kernels for kvcompress (imported as ``kvcompress_kernels``).

Each op has a Triton kernel (``*_triton``), a PyTorch reference with the same signature (``*_torch``)
and a dispatcher (plain name) that picks one according to :func:`set_backend` /
``$KVCOMPRESS_KERNEL_BACKEND`` (``auto``: Triton for CUDA tensors, PyTorch for CPU tensors).
See docs/KERNELS.md for the memory layout and the algorithms.
"""

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
