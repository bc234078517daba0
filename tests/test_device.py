"""okdpose.device: device resolution and its messages, the AMP dtype, backend settings, the log line
(CUDA mocked: no GPU is needed)."""
import logging
import os
from pathlib import Path

import pytest
import torch

from okdpose.device import (BF16_MIN_SPEEDUP, DeviceError, autocast_dtype, channels_last_for, configure_backends,
                            cpu_bf16_probe, cpu_flags, cpu_model, describe, fast_bf16, input_memory_format, isa_cap,
                            memory_format, native_bf16, precision_record, reported_flags, resolve_device,
                            usable_flags)
from okdpose.params import ParamsError


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
def test_auto_precision_on_cuda_needs_bf16_tensor_cores(monkeypatch, native, expected):
    calls = []

    def supported(including_emulation=True):
        calls.append(including_emulation)
        return native or including_emulation     # T4 / V100: bf16 only through emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert autocast_dtype(torch.device("cuda"), "auto") is expected and calls == [False]
    assert autocast_dtype(torch.device("cuda"), "fp32") is None
    assert autocast_dtype(torch.device("cuda"), "bf16") is torch.bfloat16     # as asked, native or not
    assert autocast_dtype(torch.device("cuda"), "fp16") is torch.float16


AVX2 = {"sse4_2", "avx", "avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512_vnni"}


# speedup: what cpu_bf16_probe would report there (bf16 / fp32 rate): 0.6 is the probe on the Intel Xeon without
# AMX; 2.2 (AMD EPYC) and 5.8 (AMX) are those CPUs' measured matmul ratios (the probe did not exist yet)
@pytest.mark.parametrize("flags, speedup, expected", [
    (AVX2, 0.03, None),                                    # bf16 emulated: 30-60x slower, auto stays fp32
    (AVX512, 2.0, None),                                   # AVX-512 without its BF16 extension: never probed
    (AVX512 | {"avx512_bf16"}, 2.2, torch.bfloat16),       # AMD EPYC (Zen 4)
    (AVX512 | {"avx512_bf16"}, 0.6, None),                 # Intel Xeon with avx512_bf16, no AMX: slower
    (AVX512 | {"avx512_bf16"}, BF16_MIN_SPEEDUP, torch.bfloat16),   # the threshold itself takes bf16
    (AVX512 | {"avx512_bf16", "amx_tile", "amx_bf16"}, 5.8, torch.bfloat16),   # Sapphire Rapids AMX
    (set(), 2.0, None),                                    # flags unknown (not Linux)
])
def test_auto_precision_on_cpu_needs_bf16_units_measured_faster(flags, speedup, expected):
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto", flags=flags, speedup=speedup) is expected
    assert fast_bf16(cpu, flags, speedup) is (expected is not None)
    assert autocast_dtype(cpu, "fp32", flags=flags, speedup=speedup) is None
    assert autocast_dtype(cpu, "bf16", flags=flags, speedup=speedup) is torch.bfloat16   # forced: runs on any CPU
    with pytest.raises(ParamsError, match="evaluate.precision is fp16, which runs on CUDA only"):
        autocast_dtype(cpu, "fp16", flags=flags, key="evaluate.precision")


def test_the_bf16_probe_measures_once_per_thread_count_and_leaves_the_rng_alone(monkeypatch):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    probe = cpu_bf16_probe()
    assert torch.equal(torch.rand(3), expected)                  # the global RNG untouched
    assert probe["fp32_ms"] > 0 and probe["bf16_ms"] > 0 and probe["threads"] == torch.get_num_threads()
    assert probe["speedup"] == pytest.approx(probe["fp32_ms"] / probe["bf16_ms"], rel=0.01)
    assert probe["min_speedup"] == BF16_MIN_SPEEDUP
    assert cpu_bf16_probe() == probe                             # cached: one decision per process
    calls = []
    monkeypatch.setattr("okdpose.device.cpu_bf16_probe", lambda: calls.append(1) or {"speedup": 9.0})
    assert autocast_dtype(torch.device("cpu"), "auto", flags=AVX2) is None and not calls   # no units: not probed
    assert autocast_dtype(torch.device("cpu"), "auto", flags=AVX512 | {"avx512_bf16"}) is torch.bfloat16
    assert calls == [1]


def test_an_isa_cap_makes_the_cpu_count_as_the_cpu_onednn_is_allowed_to_be(monkeypatch):
    cpu, bf16_cpu = torch.device("cpu"), AVX512 | {"avx512_bf16", "amx_tile", "amx_bf16", "sse4_2"}
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    assert isa_cap() is None and usable_flags(bf16_cpu) == bf16_cpu
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")                   # oneDNN reads it case-insensitively
    assert isa_cap() == "AVX2"
    assert usable_flags(bf16_cpu) == {"avx", "avx2", "fma", "sse4_2"}     # other families untouched
    assert not native_bf16(cpu, bf16_cpu) and channels_last_for(cpu, "auto", flags=bf16_cpu) is False
    assert autocast_dtype(cpu, "auto", flags=bf16_cpu, speedup=9.0) is None       # judged as an AVX2 CPU
    assert reported_flags(bf16_cpu) == ["avx2", "fma"]
    assert precision_record(cpu, None, "fp32")["isa_cap"] == "AVX2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")       # bf16 units kept, AMX not
    assert native_bf16(cpu, bf16_cpu) and "amx_bf16" not in usable_flags(bf16_cpu)
    assert autocast_dtype(cpu, "auto", flags=bf16_cpu, speedup=2.0) is torch.bfloat16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert not native_bf16(cpu, bf16_cpu) and channels_last_for(cpu, "auto", flags=bf16_cpu) is True
    for everything in ("ALL", "AVX512_CORE_AMX", ""):                   # no cap: every unit usable
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", everything)
        assert isa_cap() is None and usable_flags(bf16_cpu) == bf16_cpu
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")                     # oneDNN's older name
    assert isa_cap() == "AVX2" and "isa_cap" not in precision_record(torch.device("cuda"), None, "fp32")


def test_channels_last_auto_follows_the_cpu_and_records_the_flags():
    cpu = torch.device("cpu")
    assert channels_last_for(cpu, "auto", flags=AVX2) is False      # measured slower for the W8 default (AVX2)
    assert channels_last_for(cpu, "auto", flags=AVX512) is True     # measured faster, W8 and W32 (AVX-512)
    assert channels_last_for(cpu, True, flags=AVX2) is True and channels_last_for(cpu, False, flags=AVX512) is False
    assert channels_last_for(torch.device("cuda"), "auto") is True
    assert reported_flags(AVX512 | {"avx512_bf16"}) == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
    rec = precision_record(cpu, torch.bfloat16, "auto")
    assert rec["precision"] == "bf16" and rec["precision_asked"] == "auto" and isinstance(rec["cpu_flags"], str)


def test_precision_record_names_the_probe_auto_decided_by(monkeypatch):
    cpu = torch.device("cpu")
    probe = {"fp32_ms": 8.7, "bf16_ms": 14.0, "speedup": 0.62, "min_speedup": BF16_MIN_SPEEDUP, "threads": 2}
    monkeypatch.setattr("okdpose.device.cpu_bf16_probe", lambda: dict(probe))
    monkeypatch.setattr("okdpose.device.native_bf16", lambda device, flags=None: True)
    assert precision_record(cpu, None, "auto")["bf16_probe"] == probe
    assert "bf16_probe" not in precision_record(cpu, None, "fp32")             # asked by name: nothing decided
    monkeypatch.setattr("okdpose.device.native_bf16", lambda device, flags=None: False)
    assert "bf16_probe" not in precision_record(cpu, None, "auto")             # no bf16 units: not probed


def test_cpu_flags_read_from_proc_cpuinfo():
    flags = cpu_flags()
    if Path("/proc/cpuinfo").is_file():
        assert "fpu" in flags or not flags          # x86 lists fpu; other platforms may have no flags line
    assert isinstance(cpu_model(), str) and cpu_model()


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
