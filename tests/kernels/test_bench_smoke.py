"""The benchmark script runs end to end (tiny shapes, Triton interpreter) and prints its Markdown tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_kernels.py"


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = out.read_text()
    for needle in ("| paged_decode + scores | 2 | 100 |", "| paged_prefill + obs(32) | 1 | 48 |", "% HBM"):
        assert needle in report
