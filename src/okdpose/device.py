"""Where and in what precision the model runs: the device a `*.device` param names, the autocast
dtype, the cuDNN / determinism settings, and the one log line every stage that runs the model
starts with.

    dev = resolve_device(p.train.device)                  # 'auto' -> cuda when torch sees a GPU
    dtype = amp_dtype(dev, p.train.amp)                   # None (fp32), bf16 or fp16 (+ GradScaler)
    configure_backends(dev, p.train.deterministic)        # cuDNN benchmark or deterministic; CPU: nothing
    log.info(describe(dev, dtype, torch.channels_last))   # 'device cuda:0 (...), precision ..., ...'
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from okdpose.params import ParamsError

log = logging.getLogger(__name__)

PRECISION = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}


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


def amp_dtype(device: torch.device, amp: bool) -> Optional[torch.dtype]:
    """The autocast dtype: None (fp32) on CPU (bf16 autocast is slower there) or without `amp`;
    bf16 on GPUs with bf16 tensor cores, fp16 (with a GradScaler) on the others (T4, V100), which
    `is_bf16_supported()` would count as bf16 through slow emulation."""
    if not amp or torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


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
