"""KV-Compress's per-head metric bias: an offline-profiled offset per (layer, kv head, sequence-length bin).

KV-Compress (Cloudflare's vLLM fork) can load a bias ``[num_layers, num_kv_heads, num_bins]`` with bin edges
``pos_bins`` ``[num_bins]`` (sequence lengths, ascending, the first 0) and adds ``bias[l, h, bin(seq_len)]`` to every
metric of head (l, h) before the one global sort. A head whose scores run low across prompts is lifted, one whose
scores run high is lowered, so the global threshold stops starving whole layers while the per-prompt variation
between heads still moves budget. The file format is theirs (``.npz`` with keys ``bias`` and ``pos_bins``), so a
bias profiled by either tool loads in the other.

How the bias is measured is ours (their profiler is not public): ``scripts/calibrate_head_bias.py`` runs the
policy on calibration prompts and sets ``bias[l, h, b]`` to the mean, over prompts whose length falls in bin b,
of ``q_all - q_lh``, where ``q_lh`` is head (l, h)'s own score at its ``1 - 1/ratio`` quantile (the last token a
uniform budget keeps) and ``q_all`` the same quantile over every head of the prompt. On calibration prompts the
biased global threshold then gives each head its uniform share on average.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BIAS_KEY, BINS_KEY = "bias", "pos_bins"


@dataclass
class HeadBias:
    """``bias`` ``[L, H, B]`` float32 added to head (l, h)'s scores when its sequence length falls in bin b;
    ``pos_bins`` ``[B]`` int: bin b holds lengths ``>= pos_bins[b]`` (and below the next edge)."""

    bias: np.ndarray
    pos_bins: np.ndarray

    def __post_init__(self) -> None:
        self.bias = np.asarray(self.bias, dtype=np.float32)
        self.pos_bins = np.asarray(self.pos_bins, dtype=np.int64)
        if self.bias.ndim != 3 or self.pos_bins.shape != (self.bias.shape[2],):
            raise ValueError(
                f"head bias must be [num_layers, num_kv_heads, num_bins] with pos_bins [num_bins]; got bias "
                f"{self.bias.shape} and pos_bins {self.pos_bins.shape}"
            )
        if self.pos_bins[0] != 0 or (np.diff(self.pos_bins) <= 0).any():
            raise ValueError(f"head bias pos_bins must start at 0 and increase; got {self.pos_bins.tolist()}")
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # bias and pos_bins per device

    @classmethod
    def load(cls, path: str | Path) -> HeadBias:
        """Read a ``.npz`` (keys ``bias``, ``pos_bins``), as written by :meth:`save` or KV-Compress."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"head bias file {str(path)!r} does not exist; make one with scripts/calibrate_head_bias.py"
            )
        with np.load(path) as f:
            missing = {BIAS_KEY, BINS_KEY} - set(f.files)
            if missing:
                raise ValueError(f"head bias file {str(path)!r} lacks {sorted(missing)} (has {f.files})")
            return cls(f[BIAS_KEY], f[BINS_KEY])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{BIAS_KEY: self.bias, BINS_KEY: self.pos_bins})

    def bins_of(self, lengths: np.ndarray) -> np.ndarray:
        """The bin of each sequence length."""
        return np.searchsorted(self.pos_bins, np.asarray(lengths), side="right") - 1

    def for_layer(self, layer: int, seen: torch.Tensor) -> torch.Tensor:
        """``[S, H]``: each sequence's bias for every kv head of ``layer`` (``seen`` ``[S]``: its length), looked
        up on ``seen``'s device (nothing is read back to the host)."""
        layers, heads = self.bias.shape[:2]
        if layer >= layers:
            raise ValueError(
                f"head bias has {layers} layers but the model has a layer {layer}; calibrate one for this model "
                "(scripts/calibrate_head_bias.py)"
            )
        if seen.device not in self._on:
            self._on[seen.device] = (
                torch.from_numpy(self.bias).to(seen.device),
                torch.from_numpy(self.pos_bins).to(seen.device),
            )
        bias, edges = self._on[seen.device]
        bins = torch.searchsorted(edges, seen.to(edges.dtype).contiguous(), right=True) - 1
        return bias[layer][:, bins].T  # [S, H]; the caller's scores are [S, H, L], so a head-count mismatch raises

    def check_heads(self, num_kv_heads: int) -> None:
        if self.bias.shape[1] != num_kv_heads:
            raise ValueError(
                f"head bias has {self.bias.shape[1]} kv heads per layer but the model has {num_kv_heads}; calibrate "
                "one for this model (scripts/calibrate_head_bias.py)"
            )
