"""paged_prefill: Triton kernel vs torch reference vs naive dense loop, incl. compacted prefixes and obs.

The Triton comparisons run on the ``device`` fixture (CUDA when present, else the CPU interpreter); the torch
reference vs naive loop checks stay on the CPU. bf16 and the real-model geometries only run on a GPU.
"""

from __future__ import annotations

import sys

import pytest
import torch
from kvcompress_kernels import paged_prefill, paged_prefill_torch, paged_prefill_triton, use_backend
from paged_case import DTYPES, MODEL_GEOMETRIES, make_case, naive_prefill, random_bias
from paged_case import OUT_TOL as TOL

REFERENCE = sys.modules["kvcompress_kernels.paged_prefill"]  # the package exports a function of the module's name
OBS_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=5e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=1.5e-2, rtol=1e-2),
}


def _chunked_case(prefix_kept, prefix_seen, new_tokens, heads, head_dim, dtype, seed=0, num_blocks=None, device="cpu"):
    """A chunked-prefill batch: per (seq, head), ``prefix_kept[b][h]`` survivors of ``prefix_seen[b]`` earlier
    tokens (random subset, shuffled slot order, as after compaction), then ``new_tokens[b]`` new tokens
    already written at the tail. Returns (case, q_pos ``[T]`` int32, cu_seqlens_q ``[B+1]`` int32), on ``device``."""
    gen = torch.Generator().manual_seed(seed + 100)
    lengths, positions = [], []
    for b, seen in enumerate(prefix_seen):
        row_len, row_pos = [], []
        for h in range(heads):
            kept = torch.randperm(seen, generator=gen)[: prefix_kept[b][h]]  # random survivors, shuffled
            row_pos.append(torch.cat([kept, torch.arange(seen, seen + new_tokens[b])]))
            row_len.append(prefix_kept[b][h] + new_tokens[b])
        lengths.append(row_len)
        positions.append(row_pos)
    case = make_case(lengths, head_dim, dtype, positions=positions, seed=seed, num_blocks=num_blocks, device=device)
    cu = torch.tensor([0, *torch.tensor(new_tokens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q_pos = torch.cat([torch.arange(seen, seen + n) for seen, n in zip(prefix_seen, new_tokens, strict=True)])
    return case, q_pos.to(device, torch.int32), cu


def _query(total, num_q_heads, head_dim, dtype, seed=1, device="cpu"):
    """Packed queries ``[T, H_q, D]`` (drawn on the CPU, so every device sees the same values)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(total, num_q_heads, head_dim, generator=gen).to(device, dtype)


def _args(case, q, q_pos, cu, scale):
    return (q, case.k_cache, case.v_cache, case.slot_pos, case.block_tables, case.lengths, q_pos, cu, scale)


# three sequences: fresh prompt (no prefix), compacted prefix with unequal per-head survivors (incl. 0),
# and a single new token after a long prefix; query counts straddle the tile sizes.
PREFIX_KEPT = [[0, 0], [20, 0], [37, 16]]
PREFIX_SEEN = [0, 45, 60]
NEW_TOKENS = [33, 17, 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("obs_window", [0, 8, 1000])
def test_triton_matches_torch(device, dtype, head_dim, group, obs_window):
    case, q_pos, cu = _chunked_case(PREFIX_KEPT, PREFIX_SEEN, NEW_TOKENS, 2, head_dim, dtype, seed=group, device=device)
    q = _query(int(cu[-1]), 2 * group, head_dim, dtype, device=device)
    power = 1 + group % 2
    args = _args(case, q, q_pos, cu, head_dim**-0.5)
    out_tri, obs_tri = paged_prefill_triton(*args, obs_window=obs_window, obs_power=power)
    out_ref, obs_ref = paged_prefill_torch(*args, obs_window=obs_window, obs_power=power)
    assert out_tri.dtype == dtype and out_tri.shape == q.shape
    torch.testing.assert_close(out_tri, out_ref, **TOL[dtype])
    if obs_window == 0:
        assert obs_tri is None and obs_ref is None
    else:
        assert obs_tri.shape == (3, 2 * group, int(case.lengths.max()))
        torch.testing.assert_close(obs_tri, obs_ref, **OBS_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize(("obs_window", "power"), [(5, 1), (5, 2), (10_000, 1)])
@pytest.mark.parametrize("query_chunk", [512, 4])
def test_torch_matches_naive(dtype, group, obs_window, power, query_chunk, monkeypatch):
    """``query_chunk`` 4 makes the reference's query chunks cut through the observation window (chunks before it,
    one across it, chunks inside it)."""
    monkeypatch.setattr(REFERENCE, "_REF_QUERY_CHUNK", query_chunk)
    case, q_pos, cu = _chunked_case(PREFIX_KEPT, PREFIX_SEEN, NEW_TOKENS, 2, 64, dtype, seed=9)
    q = _query(int(cu[-1]), 2 * group, 64, dtype)
    out, obs = paged_prefill_torch(*_args(case, q, q_pos, cu, 0.125), obs_window=obs_window, obs_power=power)
    ref_out, ref_obs = naive_prefill(q, case, q_pos, cu, 0.125, obs_window, power)
    torch.testing.assert_close(out.float(), ref_out, **TOL[dtype])
    torch.testing.assert_close(obs, ref_obs, **OBS_TOL[dtype])
    if power == 1:  # every window query spreads probability 1 over its head's slots
        window = torch.clamp(cu.diff(), max=obs_window).float()
        torch.testing.assert_close(obs.sum(-1), window[:, None].expand_as(obs.sum(-1)), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("with_term", [False, True])
@pytest.mark.parametrize(("obs_window", "power"), [(0, 1), (8, 2), (1000, 1)])
def test_slot_bias_weighs_each_slot_in_all_three(device, obs_window, power, with_term):
    """A ``slot_bias`` is added to each cached slot's logit, and a ``slot_term`` to each query's logit of every slot
    with a positive bias, in the output and in the observation's probabilities: Triton, the torch reference and the
    naive loop agree."""
    case, q_pos, cu = _chunked_case(PREFIX_KEPT, PREFIX_SEEN, NEW_TOKENS, 2, 64, torch.float32, seed=5, device=device)
    q = _query(int(cu[-1]), 6, 64, torch.float32, device=device)
    bias = random_bias(case)
    for b, kept in enumerate(PREFIX_KEPT):  # the new tokens' slots: 0, as the cache writes them
        for h, n in enumerate(kept):
            bias.view(-1)[case.slots(b, h)[n:].to(device)] = 0.0
    args = _args(case, q, q_pos, cu, 0.125)
    obs = dict(obs_window=obs_window, obs_power=power)
    gen = torch.Generator().manual_seed(6)
    term = (4 * torch.rand(q.shape[:2], generator=gen) - 1).to(device) if with_term else None
    out_ref, obs_ref = paged_prefill_torch(*args, slot_bias=bias, slot_term=term, **obs)
    out_tri, obs_tri = paged_prefill_triton(*args, slot_bias=bias, slot_term=term, **obs)
    naive_out, naive_obs = naive_prefill(
        q.cpu(),
        case.to("cpu"),
        q_pos.cpu(),
        cu.cpu(),
        0.125,
        obs_window,
        power,
        bias.cpu(),
        None if term is None else term.cpu(),
    )
    torch.testing.assert_close(out_ref.cpu(), naive_out, **TOL[torch.float32])
    torch.testing.assert_close(out_tri, out_ref, **TOL[torch.float32])
    if obs_window:
        torch.testing.assert_close(obs_ref.cpu(), naive_obs, **OBS_TOL[torch.float32])
        torch.testing.assert_close(obs_tri, obs_ref, **OBS_TOL[torch.float32])
    assert not torch.allclose(out_ref, paged_prefill_torch(*args, **obs)[0], atol=1e-3)  # the bias matters
    if with_term:  # and so does the term
        assert not torch.allclose(out_ref, paged_prefill_torch(*args, slot_bias=bias, **obs)[0], atol=1e-3)


def test_chunked_prefill_equals_one_shot(device):
    """Prefilling a prompt in two chunks (second reads the first through the cache) = one-shot prefill."""
    n, split = 50, 29
    case, q_pos, cu = _chunked_case([[0, 0]], [0], [n], 2, 64, torch.float32, seed=3, device=device)
    q = _query(n, 4, 64, torch.float32, device=device)
    full, _ = paged_prefill_triton(*_args(case, q, q_pos, cu, 0.125))
    lengths_all = case.lengths.clone()
    case.lengths.fill_(split)
    cu_first = torch.tensor([0, split], dtype=torch.int32, device=device)
    first, _ = paged_prefill_triton(*_args(case, q[:split], q_pos[:split], cu_first, 0.125))
    case.lengths.copy_(lengths_all)
    cu_second = torch.tensor([0, n - split], dtype=torch.int32, device=device)
    second, _ = paged_prefill_triton(*_args(case, q[split:], q_pos[split:], cu_second, 0.125))
    torch.testing.assert_close(torch.cat([first, second]), full, atol=1e-5, rtol=1e-5)


def test_dispatcher_and_validation(device):
    case, q_pos, cu = _chunked_case([[3, 5]], [9], [20], 2, 64, torch.float32, device=device)
    q = _query(20, 2, 64, torch.float32, device=device)
    with use_backend("torch"):
        ref, _ = paged_prefill(*_args(case, q, q_pos, cu, 0.125))
    with use_backend("triton"):
        tri, _ = paged_prefill(*_args(case, q, q_pos, cu, 0.125))
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill_torch(*_args(case, q, q_pos, cu.long(), 0.125))
    with pytest.raises(ValueError, match="obs_power"):
        paged_prefill_torch(*_args(case, q, q_pos, cu, 0.125), obs_window=2, obs_power=3)


def test_int32_offset_overflow_pool(device):
    head_dim, block_size = 64, 16
    num_blocks = (1 << 31) // (block_size * head_dim) + 64
    case, q_pos, cu = _chunked_case(
        [[10, 3], [0, 7]], [12, 9], [20, 6], 2, head_dim, torch.float16, num_blocks=num_blocks, seed=4, device=device
    )
    q = _query(int(cu[-1]), 4, head_dim, torch.float16, device=device)
    args = _args(case, q, q_pos, cu, 0.125)
    out_tri, obs_tri = paged_prefill_triton(*args, obs_window=4, obs_power=2)
    out_ref, obs_ref = paged_prefill_torch(*args, obs_window=4, obs_power=2)
    torch.testing.assert_close(out_tri, out_ref, **TOL[torch.float16])
    torch.testing.assert_close(obs_tri, obs_ref, **OBS_TOL[torch.float16])


@pytest.mark.slow
def test_long_prompt_many_tiles(device):
    """Several query and key tiles per head, tile-skipping by position, obs over every query."""
    case, q_pos, cu = _chunked_case([[100, 61]], [130], [300], 2, 64, torch.float32, seed=6, device=device)
    q = _query(300, 6, 64, torch.float32, device=device)
    args = _args(case, q, q_pos, cu, 0.125)
    out_tri, obs_tri = paged_prefill_triton(*args, obs_window=300, obs_power=2)
    out_ref, obs_ref = paged_prefill_torch(*args, obs_window=300, obs_power=2)
    torch.testing.assert_close(out_tri, out_ref, **TOL[torch.float32])
    torch.testing.assert_close(obs_tri, obs_ref, **OBS_TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("obs_window", "power"), [(0, 1), (32, 2), (100_000, 1)])
@pytest.mark.parametrize("geometry", MODEL_GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_model_geometries_on_gpu(device, geometry, obs_window, power, dtype):
    """Real-model (H_q, H_kv, D) on CUDA: a fresh 700-token prompt (many query and key tiles) next to a chunk of
    257 new tokens after a compacted 900-token prefix with per-head survivor counts from 0 to 900."""
    num_q_heads, num_kv_heads, head_dim = geometry
    gen = torch.Generator().manual_seed(num_q_heads * head_dim)
    kept = torch.randint(0, 901, (num_kv_heads,), generator=gen)
    kept[0] = 0
    case, q_pos, cu = _chunked_case(
        [[0] * num_kv_heads, kept.tolist()],
        [0, 900],
        [700, 257],
        num_kv_heads,
        head_dim,
        dtype,
        seed=num_kv_heads,
        device=device,
    )
    q = _query(int(cu[-1]), num_q_heads, head_dim, dtype, seed=head_dim, device=device)
    args = _args(case, q, q_pos, cu, head_dim**-0.5)
    out_tri, obs_tri = paged_prefill_triton(*args, obs_window=obs_window, obs_power=power)
    out_ref, obs_ref = paged_prefill_torch(*args, obs_window=obs_window, obs_power=power)
    assert out_tri.is_cuda and out_tri.dtype == dtype
    torch.testing.assert_close(out_tri, out_ref, **TOL[dtype])
    if obs_window:
        torch.testing.assert_close(obs_tri, obs_ref, **OBS_TOL[dtype])


def test_small_head_dim(device):
    """head_dim 16 with GQA 3 (the project's tiny test Llama)."""
    case, q_pos, cu = _chunked_case([[5, 9]], [12], [19], 2, 16, torch.float32, seed=13, device=device)
    q = _query(19, 6, 16, torch.float32, device=device)
    args = _args(case, q, q_pos, cu, 0.25)
    out_tri, obs_tri = paged_prefill_triton(*args, obs_window=6, obs_power=1)
    out_ref, obs_ref = paged_prefill_torch(*args, obs_window=6, obs_power=1)
    torch.testing.assert_close(out_tri, out_ref, **TOL[torch.float32])
    torch.testing.assert_close(obs_tri, obs_ref, **OBS_TOL[torch.float32])
