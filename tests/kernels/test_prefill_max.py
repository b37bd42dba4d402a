"""``obs_reduce="max"`` of the prefill observation (KVzip's score): Triton kernel = torch reference = a naive dense
loop, in fp32, over compacted prefixes and GQA groups."""

from __future__ import annotations

import pytest
import torch
from kvcompress_kernels import paged_prefill_torch, paged_prefill_triton
from paged_case import make_case

from kvcompress.cache.paged import HIDDEN

TOL = dict(atol=1e-4, rtol=1e-4)


def _case(device: torch.device, group: int):
    """Two sequences: a fresh 33-token prompt, and 17 new tokens after a compacted 45-token prefix."""
    gen = torch.Generator().manual_seed(group)
    kept = [torch.randperm(45, generator=gen)[:n] for n in (20, 6)]
    positions = [[torch.arange(33)] * 2, [torch.cat([k, torch.arange(45, 62)]) for k in kept]]
    case = make_case([[33, 33], [37, 23]], 64, torch.float32, positions=positions, seed=group, device=device)
    q_pos = torch.cat([torch.arange(33), torch.arange(45, 62)]).to(device, torch.int32)
    cu = torch.tensor([0, 33, 50], dtype=torch.int32, device=device)
    q = torch.randn(50, 2 * group, 64, generator=gen).to(device)
    return case, (q, case.k_cache, case.v_cache, case.slot_pos, case.block_tables, case.lengths, q_pos, cu, 0.125)


def _naive_max(case, args, obs_window: int, exclude: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Per (sequence, query head): softmax over the head's visible slots (those at positions in ``exclude`` left
    out, scoring 0), max over the last window queries."""
    q, q_pos, cu = args[0].cpu(), args[6].cpu(), args[7].cpu()
    batch, heads = case.lengths.shape
    group = q.shape[1] // heads
    obs = torch.zeros(batch, q.shape[1], int(case.lengths.max()))
    for b in range(batch):
        t0, t1 = int(cu[b]), int(cu[b + 1])
        for hq in range(q.shape[1]):
            k, _, kpos = case.dense(b, hq // group)
            kpos = kpos.cpu()
            hidden = (kpos[None] > q_pos[t0:t1, None]) | ((kpos >= exclude[0]) & (kpos < exclude[1]))[None]
            logits = (q[t0:t1, hq] @ k.cpu().T * 0.125).masked_fill(hidden, -torch.inf)
            probs = torch.softmax(logits, -1).nan_to_num(0.0)  # a query that sees only excluded keys observes none
            obs[b, hq, : k.shape[0]] = probs[max(0, t1 - t0 - obs_window) :].amax(0)
    return obs


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("obs_window", [8, 1000])
def test_max_reduction(device, group, obs_window):
    case, args = _case(device, group)
    _, tri = paged_prefill_triton(*args, obs_window=obs_window, obs_reduce="max")
    _, ref = paged_prefill_torch(*args, obs_window=obs_window, obs_reduce="max")
    torch.testing.assert_close(tri, ref, **TOL)
    torch.testing.assert_close(ref.cpu(), _naive_max(case, args, obs_window), **TOL)
    assert float(ref.max()) <= 1 + 1e-6
    # one window query: max and sum agree
    torch.testing.assert_close(paged_prefill_torch(*args, obs_window=1, obs_reduce="max")[1],
                               paged_prefill_torch(*args, obs_window=1)[1])  # fmt: skip


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("exclude", [(0, 5), (3, 20), (40, 1000)])
def test_excluded_positions_leave_the_observation_only(device, group, exclude):
    """Keys at positions ``[lo, hi)`` score 0 and every observed query is renormalised over the rest (ranges: the
    first keys, a band through the compacted prefix, everything from position 40); the output is unchanged."""
    case, args = _case(device, group)
    out_tri, tri = paged_prefill_triton(*args, obs_window=1000, obs_reduce="max", obs_exclude=exclude)
    out_ref, ref = paged_prefill_torch(*args, obs_window=1000, obs_reduce="max", obs_exclude=exclude)
    torch.testing.assert_close(tri, ref, **TOL)
    torch.testing.assert_close(ref.cpu(), _naive_max(case, args, 1000, exclude), **TOL)
    torch.testing.assert_close(out_tri, out_ref, **TOL)
    torch.testing.assert_close(out_ref, paged_prefill_torch(*args)[0], **TOL)
    plain = paged_prefill_torch(*args, obs_window=1000, obs_reduce="max")[1]
    assert not torch.allclose(ref, plain, **TOL)
    with pytest.raises(ValueError, match="obs_exclude"):
        paged_prefill_torch(*args, obs_window=4, obs_exclude=(5, 2))


@pytest.mark.parametrize("group", [1, 4])
def test_hidden_slots_are_out_of_every_querys_reach(device, group):
    """``PagedKVCache.rewound`` hides a prefix's later slots by moving their positions up by ``HIDDEN``: they get
    no attention and no observation (0), in the Triton kernel as in the reference, and the rest is attended as
    the naive loop says."""
    case, args = _case(device, group)
    pos = case.slot_pos.view(-1)
    slots = torch.cat([case.slots(1, h) for h in range(2)])
    moved = pos[slots.to(pos.device)]
    pos[slots.to(pos.device)] = torch.where((moved >= 30) & (moved < 45), moved + HIDDEN, moved)
    out_tri, tri = paged_prefill_triton(*args, obs_window=1000, obs_reduce="max")
    out_ref, ref = paged_prefill_torch(*args, obs_window=1000, obs_reduce="max")
    torch.testing.assert_close(tri, ref, **TOL)
    torch.testing.assert_close(out_tri, out_ref, **TOL)
    torch.testing.assert_close(ref.cpu(), _naive_max(case, args, 1000), **TOL)
    for h in range(2):
        _, _, kpos = case.dense(1, h)
        hidden = (kpos >= HIDDEN).cpu()
        assert hidden.any() and (ref[1, h * group : (h + 1) * group, : len(kpos)].cpu()[:, hidden] == 0).all()


def test_unknown_reduction_is_rejected(device):
    _, args = _case(device, 1)
    with pytest.raises(ValueError, match="obs_reduce"):
        paged_prefill_torch(*args, obs_window=4, obs_reduce="mean")
