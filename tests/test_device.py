"""okdpose.device: device resolution and its messages, the AMP dtype, backend settings, the log line
(CUDA mocked: no GPU is needed)."""
import logging
import os

import pytest
import torch

from okdpose.device import (DeviceError, amp_dtype, configure_backends, describe, input_memory_format, memory_format,
                            resolve_device)


def no_gpu(monkeypatch, cuda_build):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)


def test_cpu_and_auto_without_gpu(monkeypatch, caplog):
    assert resolve_device("cpu") == torch.device("cpu")
    no_gpu(monkeypatch, None)
    with caplog.at_level(logging.INFO):
        assert resolve_device("auto") == torch.device("cpu")
    assert not caplog.text                     # a CPU-only build: the CPU was meant
    no_gpu(monkeypatch, "12.8")
    with caplog.at_level(logging.INFO):
        assert resolve_device("auto", "evaluate.device") == torch.device("cpu")
    assert "evaluate.device is auto and runs on the CPU" in caplog.text and "driver cannot run" in caplog.text


@pytest.mark.parametrize("build, why", [(None, "CPU-only build"),
                                        ("12.8", "a CUDA 12.8 build whose driver cannot run")])
def test_cuda_without_gpu_names_the_param_and_the_fix(monkeypatch, build, why):
    no_gpu(monkeypatch, build)
    with pytest.raises(DeviceError, match="train.device is 'cuda'") as e:
        resolve_device("cuda")
    assert why in str(e.value) and "Set train.device: cpu to run it on the CPU (training presets/paper" in str(e.value)
    with pytest.raises(DeviceError, match="Set explain.device: cpu to run it on the CPU, or auto"):
        resolve_device("cuda", "explain.device")


def test_cuda_with_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_dtype_needs_bf16_tensor_cores(monkeypatch, native, expected):
    calls = []

    def supported(including_emulation=True):
        calls.append(including_emulation)
        return native or including_emulation     # T4 / V100: bf16 only through emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert amp_dtype(torch.device("cuda"), True) is expected and calls == [False]
    assert amp_dtype(torch.device("cuda"), False) is None
    assert amp_dtype(torch.device("cpu"), True) is None       # CPU: fp32, no autocast


def test_backends(monkeypatch):
    cudnn = torch.backends.cudnn
    for name in ("benchmark", "deterministic", "allow_tf32"):
        monkeypatch.setattr(cudnn, name, getattr(cudnn, name))          # restored after the test
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    for deterministic in (False, True):
        configure_backends(torch.device("cpu"), deterministic)        # CPU: nothing changes
        assert (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled()) == before
    configure_backends(torch.device("cuda"), False)
    assert cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    try:
        configure_backends(torch.device("cuda"), True)
        assert torch.are_deterministic_algorithms_enabled() and cudnn.deterministic and not cudnn.benchmark
        assert not cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        configure_backends(torch.device("cuda"), False)                 # a second run in the same process
        assert cudnn.benchmark and cudnn.allow_tf32 and not cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


def test_describe(monkeypatch):
    line = describe(torch.device("cpu"), None, torch.contiguous_format)
    assert line.startswith("device cpu (") and line.endswith("precision fp32, memory format contiguous")

    class Props:
        name, total_memory = "Tesla T4", 16 * 2 ** 30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    line = describe(torch.device("cuda"), torch.float16, torch.channels_last)
    assert line.startswith("device cuda:0 (Tesla T4, 16 GiB, ")
    assert line.endswith("precision fp16 autocast + GradScaler, memory format channels-last")
    assert "bf16 autocast" in describe(torch.device("cuda:0"), torch.bfloat16, torch.channels_last)


def test_inputs_go_channels_last_on_the_cpu_only():
    assert input_memory_format("cpu") == torch.channels_last
    assert input_memory_format(torch.device("cuda", 0)) == torch.contiguous_format
    assert memory_format(True) == torch.channels_last and memory_format(False) == torch.contiguous_format
