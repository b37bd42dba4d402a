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

    def bins_of(self, lengths: torch.Tensor) -> torch.Tensor:
        """The bin of each sequence length, on ``lengths``' device (nothing is read back to the host)."""
        edges = self._tensors(lengths.device)[1]
        return torch.searchsorted(edges, lengths.to(edges.dtype).contiguous(), right=True) - 1

    def for_layer(self, layer: int, seen: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """``[S, H]``: each sequence's bias for every kv head of ``layer`` (``seen`` ``[S]``: its length); raises
        when the file was made for another geometry."""
        layers, heads = self.bias.shape[:2]
        if layer >= layers or heads != num_kv_heads:
            raise ValueError(
                f"head bias is for {layers} layers x {heads} kv heads, but the model has a layer {layer} with "
                f"{num_kv_heads} kv heads; calibrate one for this model (scripts/calibrate_head_bias.py)"
            )
        return self._tensors(seen.device)[0][layer][:, self.bins_of(seen)].T

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``bias`` and ``pos_bins`` on ``device``, copied there once."""
        if device not in self._on:
            self._on[device] = (torch.from_numpy(self.bias).to(device), torch.from_numpy(self.pos_bins).to(device))
        return self._on[device]
