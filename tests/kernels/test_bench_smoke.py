"""The benchmark script runs end to end (tiny shapes, Triton interpreter) and prints its Markdown tables, and its
kernel-target table judges measurements the way the issue states the targets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench(script_module):
    return script_module("bench_kernels")


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--hbm-tbps", "4.3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode == 2 and "interpreter cannot run loops" in proc.stderr:  # e.g. Triton 3.6 + NumPy 2.4
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr
    report = out.read_text()
    for needle in (
        "| paged_decode + scores | 2 | 100 |",
        "| paged_prefill + obs(32) | 1 | 48 |",
        "% HBM",
        "HBM peak used for %: 4.3 TB/s",
        "### Kernel targets",
        "| decode bandwidth | B=32 ctx>=8192 | n/a | >= 85% HBM | n/a |",
    ):  # smoke grid has no such point
        assert needle in report


def test_target_rows(bench):
    m = bench.Measurement
    record = [
        m("decode", "paged_decode", 8, 16384, 1.0, int(3.1e9)),  # 3.1 TB/s = 72% of 4.3
        m("decode", "paged_decode + scores", 8, 16384, 1.05, int(3.1e9)),
        m("decode", "paged_decode", 32, 8192, 1.0, int(3.5e9)),  # 81%
        m("decode", "paged_decode + scores", 32, 8192, 1.2, int(3.5e9)),
        m("decode", "paged_decode", 32, 32768, 1.0, int(4.0e9)),  # 93%
        m("decode", "paged_decode", 1, 1024, 1.0, int(1e9)),  # below 4k: no overhead target
        m("decode", "paged_decode + scores", 1, 1024, 9.0, int(1e9)),
        m("prefill", "paged_prefill", 1, 4096, 2.0, 0, flops=1e12),  # 0.5 TFLOP/s
        m("prefill", "SDPA flash_attention", 1, 4096, 1.0, 0, flops=1e12),  # 1.0
        m("prefill", "paged_prefill", 1, 8192, 1.1, 0, flops=4e12),
        m("prefill", "SDPA flash_attention", 1, 8192, 1.0, 0, flops=4e12),  # 0.91x
    ]
    rows = bench.target_rows(record, 4.3e12)
    assert "| score accumulation overhead | B=8 ctx=16384 | +5.0% | <= +10% | yes |" in rows
    assert "| score accumulation overhead | B=32 ctx=8192 | +20.0% | <= +10% | NO |" in rows
    assert not any("B=1 ctx=1024" in r for r in rows)
    assert "| decode bandwidth | B=8 ctx=16384 | 72% HBM | >= 70% HBM | yes |" in rows
    assert "| decode bandwidth | B=32 ctx=8192 | 81% HBM | >= 85% HBM | NO |" in rows
    assert "| decode bandwidth | B=32 ctx=32768 | 93% HBM | >= 85% HBM | yes |" in rows
    assert "| prefill vs SDPA flash | T=4096 | 0.50x TFLOP/s | >= 0.80x | NO |" in rows
    assert "| prefill vs SDPA flash | T=8192 | 0.91x TFLOP/s | >= 0.80x | yes |" in rows
    unknown_gpu = bench.target_rows(record, None)
    assert "| decode bandwidth | B=8 ctx=16384 | n/a | >= 70% HBM | n/a |" in unknown_gpu
