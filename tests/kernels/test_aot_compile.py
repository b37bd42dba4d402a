"""Every kernel also passes the real Triton compiler for sm_90 (the interpreter is more permissive)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import triton

CHECK = Path(__file__).with_name("aot_compile_check.py")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists() and shutil.which("ptxas") is None, reason="no ptxas for the NVIDIA backend")
def test_kernels_compile_for_sm90(tmp_path):
    import kvcompress_kernels

    shim = tmp_path / "shim"  # makes the package importable by name whether or not it is installed
    shim.mkdir()
    (shim / "kvcompress_kernels").symlink_to(Path(kvcompress_kernels.__file__).resolve().parent)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled 48/48" in proc.stdout  # 16 launches per dtype: 8, with and without summary biases
