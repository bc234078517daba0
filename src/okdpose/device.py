"""Where and in what precision the model runs: the device a `*.device` param names, the autocast
dtype, the cuDNN / determinism settings, and the one log line every stage that runs the model
starts with.

    dev = resolve_device(p.train.device)                  # 'auto' -> cuda when torch sees a GPU
    dtype = autocast_dtype(dev, p.train.precision)        # None (fp32), bf16 or fp16 (+ GradScaler)
                                                          # auto on a CPU: bf16 only where measured faster
    configure_backends(dev, p.train.deterministic)        # cuDNN benchmark or deterministic; CPU: nothing
    log.info(describe(dev, dtype, torch.channels_last))   # 'device cuda:0 (...), precision ..., ...'
"""
from __future__ import annotations

import logging
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

import torch

from okdpose.params import ParamsError

log = logging.getLogger(__name__)

PRECISION = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}
SHORT = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# CPU flags (as /proc/cpuinfo spells them) of units that run bf16 matmuls / convolutions natively
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# auto takes bf16 on a CPU with bf16 units only where a convolution runs at least this much faster
# in bf16 than in fp32 (`cpu_bf16_probe`): the flags alone are folklore. Measured: an Intel Xeon
# with avx512_bf16 but no AMX runs bf16 convolutions and matmuls at 0.51-0.76x fp32 (the W8 default
# step 0.89x, W32 0.76x); an AMD EPYC with avx512_bf16 at 2.2x (matmul; W8 step 1.17x), AMX at
# 5.8x. Interpolating the two avx512_bf16 CPUs, the W8 step breaks even near 1.25x: the autocast
# casts cost per op, so a small convolution gain is lost in the step.
BF16_MIN_SPEEDUP = 1.3
# the flags the bench and the metrics report
REPORTED_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


class DeviceError(ParamsError):
    """A `*.device` param this machine cannot honour (a ParamsError: every stage reports it as one)."""


def _no_gpu_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
    return (f"torch {torch.__version__} is a CUDA {torch.version.cuda} build whose driver cannot run, or no GPU "
            "is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")


def resolve_device(device: str, key: str = "train.device") -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu (an info line says why when torch is a CUDA
    build; not a warning: PyPI's default Linux wheel is one); 'cuda' without a GPU is a
    DeviceError naming `key` and the fix."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.version.cuda is not None:       # a GPU may have been meant: say why it is not used
            log.info("%s is auto and runs on the CPU: %s", key, _no_gpu_reason())
        return torch.device("cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        days = " (training presets/paper_hrnet4_okd.yaml there takes days)" if key == "train.device" else ""
        raise DeviceError(f"{key} is {device!r} but torch sees no GPU: {_no_gpu_reason()}. Set {key}: cpu to run "
                          f"it on the CPU{days}, or auto")
    return torch.device(device)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (the first `flags` line of /proc/cpuinfo); empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# oneDNN's ISA cap (what `ONEDNN_MAX_CPU_ISA` may name, oneDNN's spelling) -> the /proc/cpuinfo
# flags whose units oneDNN may still use; flags of the families named here and not kept are dropped
ISA_CAP_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
_CAPPED_FAMILIES = ("avx2", "fma", "avx512", "amx")
_ISA_KEEPS = {
    "SSE41": (), "AVX": (), "AVX2": ("avx2", "fma"), "AVX2_VNNI": ("avx2", "fma"), "AVX2_VNNI_2": ("avx2", "fma"),
    "AVX512_CORE": ("avx2", "fma", "avx512f"), "AVX512_CORE_VNNI": ("avx2", "fma", "avx512f", "avx512_vnni"),
    "AVX512_CORE_BF16": ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"),
    "AVX512_CORE_FP16": ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16"),
    "AVX10_1_512": ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16"),
}


def isa_cap() -> Optional[str]:
    """The ISA oneDNN is limited to by its environment variable (upper case), None when not capped
    (unset, ALL, or an AMX level: every unit the flags name stays usable)."""
    for name in ISA_CAP_ENV:
        value = os.environ.get(name, "").strip().upper()
        if value:
            return value if value in _ISA_KEEPS else None
    return None


def usable_flags(flags: Optional[Iterable[str]] = None) -> frozenset[str]:
    """The CPU's flags less the units oneDNN is told not to use (`isa_cap`): with
    ONEDNN_MAX_CPU_ISA=AVX2 an AVX-512 CPU with bf16 units runs (and is judged as) an AVX2 one."""
    have = frozenset(cpu_flags() if flags is None else flags)
    cap = isa_cap()
    if cap is None:
        return have
    keep = set(_ISA_KEEPS[cap])
    return frozenset(f for f in have if f in keep or not f.startswith(_CAPPED_FAMILIES))


def cpu_model() -> str:
    """'model name' of /proc/cpuinfo, else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def reported_flags(flags: Optional[Iterable[str]] = None) -> list[str]:
    """The performance-relevant flags this CPU has and oneDNN may use (`usable_flags`), in
    `REPORTED_CPU_FLAGS` order."""
    have = usable_flags(flags)
    return [f for f in REPORTED_CPU_FLAGS if f in have]


def native_bf16(device: torch.device, flags: Optional[Iterable[str]] = None) -> bool:
    """Whether `device` runs bf16 natively: a GPU with bf16 tensor cores (not emulation), or a
    CPU with AVX-512 BF16 or AMX units (oneDNN's bf16 kernels; without them bf16 is emulated and
    30-60x slower than fp32, measured on an AVX2 CPU; units oneDNN is told not to use by
    `isa_cap` do not count)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    have = usable_flags(flags)
    return any(f in have for f in BF16_CPU_FLAGS)


@lru_cache(maxsize=None)
def _cpu_bf16_probe(threads: int) -> dict[str, float]:
    f = torch.nn.functional
    g = torch.Generator().manual_seed(0)          # the global RNG is left alone (training seeds it)
    x = torch.randn(8, 64, 48, 64, generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 64, 3, 3, generator=g) * 0.05).contiguous(memory_format=torch.channels_last)
    args = {"fp32": (x, w), "bf16": (x.bfloat16(), w.bfloat16())}
    best = {k: float("inf") for k in args}
    with torch.no_grad():
        for rep in range(6):                       # interleaved; the first two are warm-up
            for k, (a, b) in args.items():
                start = time.perf_counter()
                f.conv2d(a, b, padding=1)
                if rep >= 2:
                    best[k] = min(best[k], time.perf_counter() - start)
    return {"fp32_ms": round(best["fp32"] * 1e3, 3), "bf16_ms": round(best["bf16"] * 1e3, 3),
            "speedup": round(best["fp32"] / best["bf16"], 3), "min_speedup": BF16_MIN_SPEEDUP, "threads": threads}


@lru_cache(maxsize=None)
def _agreed_probe(threads: int, world: int) -> dict[str, float]:
    rec = _cpu_bf16_probe(threads)
    if world > 1:          # one decision for the whole job: ranks measuring near the threshold could differ
        from okdpose import distributed
        rec = {**distributed.broadcast_object(rec), "decided_by": f"rank 0 of {world}"}
    return rec


def cpu_bf16_probe() -> dict[str, float]:
    """One 3x3 convolution (8x64x48x64, 64 -> 64 channels, channels-last, no grad; 1.8 GFLOP) timed
    in fp32 and in bf16, interleaved, best of 4 each (~0.1-0.3 s, once per process and thread
    count) -> {fp32_ms, bf16_ms, speedup (fp32 / bf16 time), min_speedup, threads}. Under a
    process group of several ranks every rank takes rank 0's figures (+ `decided_by`): the first
    call after the group starts is a collective, which every rank makes (the same code runs)."""
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return dict(_agreed_probe(torch.get_num_threads(), world))


def fast_bf16(device: torch.device, flags: Optional[Iterable[str]] = None,
              speedup: Optional[float] = None) -> bool:
    """Whether `auto` takes bf16 on `device`: a GPU with bf16 tensor cores; a CPU with bf16 units
    (`native_bf16`) whose bf16 convolution is measured >= BF16_MIN_SPEEDUP x fp32 (`speedup`, or
    `cpu_bf16_probe` when None; not run on CPUs without the units)."""
    dev = torch.device(device)
    if not native_bf16(dev, flags):
        return False
    if dev.type == "cuda":
        return True
    return (cpu_bf16_probe()["speedup"] if speedup is None else speedup) >= BF16_MIN_SPEEDUP


def autocast_dtype(device: torch.device, precision: str, flags: Optional[Iterable[str]] = None,
                   key: str = "train.precision", speedup: Optional[float] = None) -> Optional[torch.dtype]:
    """The autocast dtype of a `*.precision` param: None (fp32), bf16 or fp16 (+ GradScaler).

    auto: bf16 where `device` runs it natively and, on a CPU, measurably faster (`fast_bf16`;
    `flags` / `speedup` stand in for this machine's in tests); else fp16 on a GPU (T4, V100: fp16
    tensor cores) and fp32 on a CPU. bf16 / fp16 are taken as asked (bf16 on a CPU without bf16
    units runs, slowly); fp16 autocast is CUDA only (a ParamsError naming `key`)."""
    dev = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if dev.type != "cuda":
            raise ParamsError(f"{key} is fp16, which runs on CUDA only (fp16 autocast on the CPU is not supported "
                              f"here); set {key}: bf16, fp32 or auto")
        return torch.float16
    if precision != "auto":
        raise ParamsError(f"{key} is {precision!r}; choose auto, fp32, bf16 or fp16")
    if fast_bf16(dev, flags, speedup):
        return torch.bfloat16
    return torch.float16 if dev.type == "cuda" else None


def precision_record(device: torch.device, dtype: Optional[torch.dtype], asked: str) -> dict[str, object]:
    """What the metrics files record of a run's precision (so two machines' runs can be told
    apart); on a CPU with bf16 units where `auto` was asked, the probe it decided by
    (`bf16_probe`: the two times and their ratio)."""
    dev = torch.device(device)
    rec: dict[str, object] = {"precision": SHORT[dtype], "precision_asked": asked, "device": dev.type}
    if dev.type == "cpu":
        rec["cpu_flags"] = " ".join(reported_flags())
        if isa_cap():
            rec["isa_cap"] = isa_cap()
        if asked == "auto" and native_bf16(dev):
            rec["bf16_probe"] = cpu_bf16_probe()
    return rec


def channels_last_for(device: torch.device, setting: "bool | str", flags: Optional[Iterable[str]] = None) -> bool:
    """A `*.channels_last` param: true / false as set; auto = channels-last on GPUs and on CPUs with
    AVX-512 (measured faster there, W8 and W32), contiguous on AVX2-only CPUs (measured slower for
    the W8 default; README "Benchmarks")."""
    if isinstance(setting, bool):
        return setting
    if torch.device(device).type == "cuda":
        return True
    return "avx512f" in usable_flags(flags)


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """CUDA: `deterministic` -> deterministic algorithms (cuDNN and cuBLAS) and TF32 off; else
    torch's defaults with cuDNN benchmark (autotuned, fastest, not bit-reproducible; matmul TF32
    stays as set, off by default), so a second run in a process does not inherit the first's
    mode. CPU: nothing is changed (its ops are deterministic here already)."""
    if torch.device(device).type != "cuda":
        return
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")    # read at the first cuBLAS call
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic     # torch's default: TF32 convolutions


def memory_format(channels_last: bool) -> torch.memory_format:
    """The model's and the batches' memory format for train.channels_last (checkpoints stay
    contiguous); a DDP model is moved to it before the wrap (`okdpose.distributed.wrap`)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def input_memory_format(device: str | torch.device) -> torch.memory_format:
    """The memory format `predict` feeds on `device`: channels-last on the CPU (oneDNN's CPU
    convolutions are faster so; the folded copy is channels-last there too), else as loaded."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


def describe(device: torch.device, dtype: Optional[torch.dtype], memory_format: torch.memory_format) -> str:
    """One line: the device (GPU name and memory, or the CPU threads), precision, memory format
    and the cuDNN mode."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        mode = ("deterministic" if torch.are_deterministic_algorithms_enabled()
                else "cudnn.benchmark" if torch.backends.cudnn.benchmark else "default")
        where = f"cuda:{index} ({props.name}, {props.total_memory / 2 ** 30:.0f} GiB, {mode})"
    else:
        where = f"cpu ({torch.get_num_threads()} threads, torch {torch.__version__})"
    fmt = "channels-last" if memory_format == torch.channels_last else "contiguous"
    return f"device {where}, precision {PRECISION[dtype]}, memory format {fmt}"
