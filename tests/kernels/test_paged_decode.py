"""paged_decode: Triton kernel vs torch reference vs naive dense loop, with fused score accumulation.

The Triton comparisons run on the ``device`` fixture (CUDA when present, else the CPU interpreter); the torch
reference vs naive loop checks stay on the CPU. bf16 and the real-model geometries only run on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvcompress_kernels import paged_decode, paged_decode_torch, paged_decode_triton, use_backend
from paged_case import DTYPES, MODEL_GEOMETRIES, make_case, naive_decode, random_bias
from paged_case import OUT_TOL as TOL

SCORE_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}

# per-head lengths around block boundaries, including empty and single-token heads; 150 spans 3 key tiles
LENGTHS = [[15, 0, 16], [1, 17, 150]]


def _query(
    batch: int, num_q_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 1, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Decode queries ``[B, H_q, D]`` (drawn on the CPU, so every device sees the same values)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_q_heads, head_dim, generator=gen).to(device, dtype)


def _run_both(case, q, scale, power, splits):
    """Triton and torch decode on the same case; each accumulates into its own copy of a non-zero score."""
    init = torch.rand(case.slot_score.shape, generator=torch.Generator().manual_seed(3)).to(case.slot_score.device)
    s_tri, s_ref = init.clone(), init.clone()
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.lengths, scale)
    out_tri = paged_decode_triton(*args, score_out=s_tri, score_power=power, num_splits=splits)
    out_ref = paged_decode_torch(*args, score_out=s_ref, score_power=power)
    return out_tri, out_ref, s_tri - init, s_ref - init


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_matches_torch(device, dtype, head_dim, group, splits):
    case = make_case(LENGTHS, head_dim, dtype, seed=group, device=device)
    q = _query(2, 3 * group, head_dim, dtype, device=device)
    power = 1 + (group + splits) % 2  # both powers across the grid, each with 1 and >1 splits
    out_tri, out_ref, add_tri, add_ref = _run_both(case, q, head_dim**-0.5, power, splits)
    assert out_tri.dtype == dtype and out_tri.shape == q.shape
    torch.testing.assert_close(out_tri, out_ref, **TOL[dtype])
    torch.testing.assert_close(add_tri, add_ref, **SCORE_TOL[dtype])
    assert torch.all(out_tri[0, group : 2 * group] == 0), "a length-0 head must output zeros"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("power", [1, 2])
def test_torch_matches_naive(dtype, group, power):
    head_dim = 64
    case = make_case(LENGTHS, head_dim, dtype, seed=7)
    q = _query(2, 3 * group, head_dim, dtype)
    score = torch.zeros_like(case.slot_score)
    out = paged_decode_torch(
        q, case.k_cache, case.v_cache, case.block_tables, case.lengths, 0.125, score_out=score, score_power=power
    )
    ref_out, ref_scores = naive_decode(q, case, 0.125, power)
    torch.testing.assert_close(out.float(), ref_out, **TOL[dtype])
    expected = torch.zeros_like(score)
    for slot, value in ref_scores.items():
        expected.view(-1)[slot] = value
    torch.testing.assert_close(score, expected, **SCORE_TOL[dtype])
    # with power 1 each query head's probabilities sum to 1 over its slots
    if power == 1:
        assert score.sum().item() == pytest.approx(group * int((case.lengths > 0).sum()), rel=1e-3)


@pytest.mark.parametrize("with_term", [False, True])
@pytest.mark.parametrize("power", [0, 1, 2])  # 0: no score accumulation (the reference's fused path)
@pytest.mark.parametrize("splits", [1, 3])
def test_slot_bias_weighs_each_slot_in_all_three(device, power, splits, with_term):
    """A ``slot_bias`` is added to each slot's logit, and a ``slot_term`` to each query head's logit of every slot
    with a positive bias: Triton, the torch reference and the naive loop agree, scores included, and a zero bias
    changes nothing."""
    case = make_case(LENGTHS, 64, torch.float32, seed=13, device=device)
    q = _query(2, 9, 64, torch.float32, device=device)
    bias = random_bias(case)
    term = (
        (4 * torch.rand(q.shape[:2], generator=torch.Generator().manual_seed(6)) - 1).to(device) if with_term else None
    )
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.lengths, 0.125)
    acc = dict(score_out=torch.zeros_like(case.slot_score), score_power=power) if power else {}
    ref = paged_decode_torch(*args, slot_bias=bias, slot_term=term, **acc)
    tri_acc = {**acc, "score_out": torch.zeros_like(case.slot_score)} if power else {}
    tri = paged_decode_triton(*args, slot_bias=bias, slot_term=term, num_splits=splits, **tri_acc)
    naive_out, naive_scores = naive_decode(
        q.cpu(), case.to("cpu"), 0.125, power or 1, bias.cpu(), None if term is None else term.cpu()
    )
    torch.testing.assert_close(ref.cpu(), naive_out, **TOL[torch.float32])
    torch.testing.assert_close(tri, ref, **TOL[torch.float32])
    if power:
        expected = torch.zeros(case.slot_score.numel())
        for slot, value in naive_scores.items():
            expected[slot] = value
        torch.testing.assert_close(acc["score_out"].cpu().view(-1), expected, **SCORE_TOL[torch.float32])
        torch.testing.assert_close(tri_acc["score_out"], acc["score_out"], **SCORE_TOL[torch.float32])
    plain = paged_decode_torch(*args)
    assert not torch.allclose(ref, plain, atol=1e-3)  # the bias matters
    if with_term:  # and so does the term
        assert not torch.allclose(ref, paged_decode_torch(*args, slot_bias=bias), atol=1e-3)
    torch.testing.assert_close(paged_decode_torch(*args, slot_bias=torch.zeros_like(bias)), plain)
    torch.testing.assert_close(
        paged_decode_triton(*args, slot_bias=torch.zeros_like(bias)), plain, **TOL[torch.float32]
    )


@pytest.mark.parametrize("power", [1, 2])
def test_split_invariance_and_scores(device, power):
    """Many splits (incl. splits that fall entirely past short heads) equal one split, scores included."""
    case = make_case([[300, 40], [5, 257]], 64, torch.float32, seed=11, device=device)
    q = _query(2, 8, 64, torch.float32, device=device)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.lengths, 0.125)
    results = []
    for splits in (1, 2, 5):
        score = torch.zeros_like(case.slot_score)
        out = paged_decode_triton(*args, score_out=score, score_power=power, num_splits=splits)
        results.append((out.cpu(), score.cpu()))
    for out, score in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(score, results[0][1], atol=1e-6, rtol=1e-5)
    # no slot outside the heads' valid ranges was touched
    valid = torch.zeros(case.slot_score.numel(), dtype=torch.bool)
    for b in range(2):
        for h in range(2):
            valid[case.slots(b, h)] = True
    assert torch.all(results[-1][1].view(-1)[~valid] == 0)
    assert torch.all(results[-1][1].view(-1)[valid] > 0)


def test_without_score_and_auto_splits(device):
    case = make_case(LENGTHS, 64, torch.float16, seed=5, device=device)
    q = _query(2, 12, 64, torch.float16, device=device)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.lengths, 0.125)
    torch.testing.assert_close(paged_decode_triton(*args), paged_decode_torch(*args), **TOL[torch.float16])


def test_dispatcher_routes_by_backend(device):
    case = make_case([[20]], 64, torch.float32, device=device)
    q = _query(1, 2, 64, torch.float32, device=device)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.lengths, 0.125)
    with use_backend("torch"):
        ref = paged_decode(*args)
    with use_backend("triton"):
        tri = paged_decode(*args)
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)


def test_rejects_bad_inputs():
    case = make_case([[20]], 64, torch.float32)
    q = _query(1, 3, 64, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_torch(
            q[:, :3],
            case.k_cache,
            case.v_cache,
            case.block_tables.expand(1, 2, -1).contiguous(),
            case.lengths.expand(1, 2).contiguous(),
            0.1,
        )
    with pytest.raises(ValueError, match="score_power"):
        paged_decode_torch(q, case.k_cache, case.v_cache, case.block_tables, case.lengths, 0.1, score_power=3)


def test_int32_offset_overflow_pool(device):
    """A pool of > 2**31 elements (never touched: torch.empty) with the used blocks at its far end."""
    head_dim, block_size = 64, 16
    num_blocks = (1 << 31) // (block_size * head_dim) + 64
    assert num_blocks * block_size * head_dim > 2**31
    case = make_case([[40, 17], [33, 70]], head_dim, torch.float16, num_blocks=num_blocks, seed=2, device=device)
    q = _query(2, 8, head_dim, torch.float16, device=device)
    for splits in (1, 2):
        out_tri, out_ref, add_tri, add_ref = _run_both(case, q, 0.125, 2, splits)
        torch.testing.assert_close(out_tri, out_ref, **TOL[torch.float16])
        torch.testing.assert_close(add_tri, add_ref, **SCORE_TOL[torch.float16])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.lists(st.integers(0, 90), min_size=2, max_size=2), min_size=1, max_size=2),
    group=st.sampled_from([1, 2, 4]),
    splits=st.integers(1, 3),
    power=st.sampled_from([1, 2]),
)
def test_random_shapes_property(device, lengths, group, splits, power):
    case = make_case(lengths, 64, torch.float32, seed=len(lengths), device=device)
    q = _query(len(lengths), 2 * group, 64, torch.float32, device=device)
    out_tri, out_ref, add_tri, add_ref = _run_both(case, q, 0.125, power, splits)
    torch.testing.assert_close(out_tri, out_ref, **TOL[torch.float32])
    torch.testing.assert_close(add_tri, add_ref, **SCORE_TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 4, None])
@pytest.mark.parametrize("geometry", MODEL_GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_model_geometries_on_gpu(device, geometry, splits, dtype):
    """Real-model (H_q, H_kv, D) on CUDA: per-head lengths from 0 to ~2k (several key tiles and splits, the
    automatic split count included), scores accumulated onto non-zero values."""
    num_q_heads, num_kv_heads, head_dim = geometry
    gen = torch.Generator().manual_seed(num_q_heads * head_dim)
    lengths = torch.randint(0, 2100, (3, num_kv_heads), generator=gen)
    lengths[0, 0], lengths[1, -1] = 0, 1
    case = make_case(lengths.tolist(), head_dim, dtype, seed=num_kv_heads, device=device)
    q = _query(3, num_q_heads, head_dim, dtype, seed=head_dim, device=device)
    out_tri, out_ref, add_tri, add_ref = _run_both(case, q, head_dim**-0.5, 2, splits)
    assert out_tri.is_cuda and out_tri.dtype == dtype
    torch.testing.assert_close(out_tri, out_ref, **TOL[dtype])
    torch.testing.assert_close(add_tri, add_ref, **SCORE_TOL[dtype])


@pytest.mark.parametrize("splits", [1, 2])
def test_small_head_dim(device, splits):
    """head_dim 16 (the project's tiny test Llama): the dot's K dimension is exactly the 16 minimum."""
    case = make_case([[70, 3, 0]], 16, torch.float32, seed=12, device=device)
    q = _query(1, 9, 16, torch.float32, device=device)
    out_tri, out_ref, add_tri, add_ref = _run_both(case, q, 0.25, 2, splits)
    torch.testing.assert_close(out_tri, out_ref, **TOL[torch.float32])
    torch.testing.assert_close(add_tri, add_ref, **SCORE_TOL[torch.float32])


@pytest.mark.parametrize("power", [0, 1, 2])
def test_strided_layout_reads_the_same_slots_as_the_gather(power):
    """With every head in one contiguous run on a (seq, head) grid, the torch reference reads the pool as a view
    (``layout``) and must give the gathered path's output and scores exactly."""
    B, Hkv, G, D, BS, n = 2, 3, 3, 64, 16, 37
    blocks = -(-n // BS)
    first = [[1 + b * 11 + h * 3 for h in range(Hkv)] for b in range(B)]  # runs of 3 blocks, seq stride 11
    tables = torch.tensor([[[f + j for j in range(blocks)] for f in row] for row in first], dtype=torch.int32)
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache = torch.randn(30, BS, D, generator=gen), torch.randn(30, BS, D, generator=gen)
    lengths = torch.full((B, Hkv), n, dtype=torch.int32)
    q = _query(B, Hkv * G, D, torch.float32)
    layout = (first[0][0] * BS, 11 * BS, 3 * BS)
    outs = []
    for lay in (None, layout):
        score = torch.zeros(30, BS) if power else None
        out = paged_decode_torch(
            q,
            k_cache,
            v_cache,
            tables,
            lengths,
            0.125,
            score_out=score,
            score_power=power or 2,
            max_len=n,
            min_len=n,
            layout=lay,
        )
        outs.append((out, score))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-6, rtol=1e-5)
    if power:
        torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-7, rtol=1e-6)
    # a wrong layout reads other slots: the check above can fail
    wrong = paged_decode_torch(
        q, k_cache, v_cache, tables, lengths, 0.125, max_len=n, min_len=n, layout=(layout[0] + BS, layout[1], layout[2])
    )
    assert not torch.allclose(wrong, outs[0][0])
