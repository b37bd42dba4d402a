"""Expected Attention: score keys by the attention that *future* queries are expected to give them.

No attention matrix is needed. The window queries (post-RoPE, at known positions) are rotated forward to the next
``n_future`` positions, which gives samples of where future queries will point. With their mean ``μ`` and
per-dimension variance ``σ²``, a Gaussian query gives ``E[exp(q·k/√d)] = exp(μ·k/√d + Σ_j σ_j² k_j² / 2d)``;
softmax over keys of that logit, times ``‖v‖``, summed over the GQA group, is the score. This follows kvpress's
ExpectedAttentionPress, with a diagonal covariance instead of the full one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcompress.cache.paged import PagedKVCache
from kvcompress.cache.step import PrefillObservation
from kvcompress.policies.base import Policy


def rotate(q: torch.Tensor, offsets: torch.Tensor, theta: float) -> torch.Tensor:
    """Apply the (rotate-half) RoPE rotation by ``offsets`` ``[n]`` to ``q`` ``[..., D]`` -> ``[..., n, D]``."""
    D = q.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64, device=q.device) / D)
    angle = (offsets.double()[:, None] * inv_freq[None]).float()  # [n, D/2]
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    half = torch.cat([-q[..., D // 2 :], q[..., : D // 2]], -1)
    return q[..., None, :] * cos + half[..., None, :] * sin


@dataclass
class ExpectedAttentionPolicy(Policy):
    """``window`` prompt queries give the statistics; ``n_future`` positions ahead are averaged over (sampled at
    ``n_samples`` offsets); ``use_vnorm`` multiplies by the value norm."""

    window: int = 32
    n_future: int = 512
    n_samples: int = 16
    use_vnorm: bool = True
    sinks: ClassVar[int] = 4

    def observe_prefill(self, cache: PagedKVCache, obs: PrefillObservation) -> None:
        view = cache.view(obs.layer, [obs.seq_id], with_kv=True)
        q = obs.queries[0].float()  # [H_q, w, D], rotated at positions window_start + i
        Hq, w, D = q.shape
        H = view.keys.shape[1]
        end = obs.window_start + w  # first future position
        future = torch.linspace(0, self.n_future - 1, self.n_samples, device=q.device).round()
        offsets = (end + future)[None, :] - (obs.window_start + torch.arange(w, device=q.device))[:, None]  # [w, n]
        samples = torch.stack([rotate(q[:, i], offsets[i], obs.rope_theta) for i in range(w)], 1)  # [Hq, w, n, D]
        samples = samples.reshape(Hq, -1, D)
        mu, var = samples.mean(1), samples.var(1, unbiased=False)  # [Hq, D]
        k = view.keys[0].float().repeat_interleave(Hq // H, 0)  # [Hq, L, D]
        logit = (k @ mu[..., None])[..., 0] / D**0.5 + (k.square() @ var[..., None])[..., 0] / (2 * D)
        valid = view.valid[0].repeat_interleave(Hq // H, 0)
        p = torch.softmax(logit.masked_fill(~valid, float("-inf")), -1).nan_to_num(0.0)
        if self.use_vnorm:
            p = p * view.values[0].float().norm(dim=-1).repeat_interleave(Hq // H, 0)
        cache.set_scores(view, p.view(H, Hq // H, -1).sum(1)[None])
