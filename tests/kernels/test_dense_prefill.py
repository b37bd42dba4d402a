"""The fresh-prefill path (fused dense attention over the new tokens) equals the paged prefill reference on the
same tokens written into a paged pool, outputs and observation windows alike."""

from __future__ import annotations

import pytest
import torch
from kvcompress_kernels import dense_prefill, paged_prefill_torch
from paged_case import make_case


@pytest.mark.parametrize("obs_window,power", [(0, 1), (5, 1), (8, 2), (1 << 30, 1)])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("exclude", [(0, 0), (2, 9)])
def test_dense_prefill_equals_paged_reference(
    obs_window: int, power: int, group: int, reduce: str, exclude: tuple[int, int]
) -> None:
    counts, heads, dim = [37, 5, 64], 2, 16
    case = make_case([[n] * heads for n in counts], dim, torch.float32, seed=3)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(sum(counts), heads * group, dim, generator=gen)
    # the packed k/v of each sequence, read back from the pool in logical (= position) order
    k = torch.cat([torch.stack([case.dense(b, h)[0] for h in range(heads)], 1) for b in range(len(counts))])
    v = torch.cat([torch.stack([case.dense(b, h)[1] for h in range(heads)], 1) for b in range(len(counts))])
    q_pos = torch.cat([torch.arange(n) for n in counts]).to(torch.int32)
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    want, want_obs = paged_prefill_torch(
        q, case.k_cache, case.v_cache, case.slot_pos, case.block_tables, case.lengths, q_pos, cu, dim**-0.5,
        obs_window=obs_window, obs_power=power, obs_reduce=reduce, obs_exclude=exclude,
    )  # fmt: skip
    got, got_obs = dense_prefill(
        q, k, v, counts, dim**-0.5, obs_window=obs_window, obs_power=power, obs_reduce=reduce, obs_exclude=exclude
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if obs_window:
        torch.testing.assert_close(got_obs, want_obs, atol=1e-5, rtol=1e-5)
    else:
        assert got_obs is None and want_obs is None
