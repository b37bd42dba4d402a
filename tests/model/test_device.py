"""Device and dtype resolution: clear errors for devices this machine lacks, ``auto`` dtype per device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcompress.model import ModelConfigError, enable_tf32, resolve_device, resolve_dtype, resolve_model_path

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")


def test_auto_dtype_is_bf16_on_cuda_and_fp32_elsewhere() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ModelConfigError, match="model.dtype='fp8' is not supported; accepted: auto, float32"):
        resolve_dtype("fp8")


@no_cuda
def test_cuda_on_a_cpu_machine_names_the_available_devices() -> None:
    with pytest.raises(ModelConfigError, match=r"model.device='cuda': .*; available: cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ModelConfigError, match="'gpu' is not a device name; available: cpu"):
        resolve_device("gpu")


def test_auto_on_cpu_reuses_the_float32_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path))
    converted = tmp_path / "models" / "smollm2-float32"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert resolve_model_path("smollm2", resolve_dtype("auto", "cpu")) == (converted, True)


def test_tf32_only_for_fp32_on_cuda() -> None:
    before = torch.get_float32_matmul_precision()
    assert not enable_tf32(torch.device("cpu"), torch.float32)
    assert not enable_tf32(torch.device("cuda"), torch.bfloat16)
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_on_cuda_enables_tf32() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        assert enable_tf32(resolve_device("cuda"), resolve_dtype("float32", "cuda"))
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)
