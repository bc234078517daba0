"""What a MultiOutHRNet costs: parameter and FLOP counts and CPU latency, per stage of the model
truncated there.

FLOPs are those of `torch.utils.flop_counter.FlopCounterMode`: convolutions and matmuls, a
multiply-add counted as 2 FLOPs; BN, ReLU, additions and upsampling are not counted. For our own
models, whose every FLOP runs in an `nn.Conv2d` module, the same count is summed by forward hooks
(`module_flops`; tests/test_cost.py pins it to FlopCounterMode's): FlopCounterMode dispatches
every op through Python and its first use imports torch._dynamo, 1.5 s of a 2-core CPU per
process. Latency is the median wall time of a batch-1 eval forward pass on CPU, BN folded and
channels-last as `okdpose.inference.predict` runs it.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Optional, Sequence

import torch
from torch import nn

from okdpose.model.fuse import inference_copy
from okdpose.model.hrnet import HRNetTrunk
from okdpose.model.multi_out import MultiOutHRNet


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# modules without FLOPs (FlopCounterMode's sense) whose forward is torch's own
_FLOP_FREE = (nn.BatchNorm2d, nn.ReLU, nn.Identity, nn.Upsample, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _counted_by_hooks(model: nn.Module) -> bool:
    """Every FLOP of `model` runs in an nn.Conv2d module: its modules are convs, torch's FLOP-free
    layers and containers, or okdpose's own (whose forwards call no functional conv or matmul)."""
    return all(type(m) is nn.Conv2d or type(m) in _FLOP_FREE or type(m).__module__.startswith("okdpose.")
               for m in model.modules())


def module_flops(model: nn.Module, x: torch.Tensor) -> Optional[int]:
    """FLOPs of `model(x)` summed over its nn.Conv2d modules by forward hooks, as FlopCounterMode
    counts a convolution: 2 x output elements x (in channels / groups x kernel area), bias not
    counted; None when `model` may compute outside such modules (`_counted_by_hooks`)."""
    if not _counted_by_hooks(model):
        return None
    total = 0

    def count(conv: nn.Module, _inputs: object, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * out.numel() * conv.weight[0].numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if type(m) is nn.Conv2d]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return total


def forward_flops(model: nn.Module, image_size: tuple[int, int], batch: int = 1) -> int:
    """FLOPs of one eval-mode forward pass on a (batch, 3, h, w) input; image_size is (w, h).
    Counted by hooks where `module_flops` can, else by FlopCounterMode; runs on the meta device
    when the model lives there (no compute)."""
    device = next(model.parameters()).device
    x = torch.zeros(batch, 3, image_size[1], image_size[0], device=device)   # not empty: stray denormals are slow
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flops = module_flops(model, x)
            if flops is None:
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as counter:
                    model(x)
                flops = counter.get_total_flops()
    finally:
        model.train(was_training)
    return int(flops)


@functools.lru_cache(maxsize=64)
def truncated_cost(num_joints: int, width: int, n_stage: int, multi: bool, image_size: tuple[int, int]) -> tuple[int, int]:
    """(params, FLOPs per image at image_size (w, h)) of MultiOutHRNet(num_joints, width, n_stage,
    multi), cached per process. Built and run on the CPU (its weights allocated for the call: W32
    114 MB), not on the meta device: for W8 about 4x faster, for W32 as fast (the four stages, 2
    threads, Intel Xeon avx512_bf16 amx_bf16: W8 0.5 vs 2.3 s, W32 1.3 vs 1.2 s; meta kernels run
    in Python and `torch.device("meta")` intercepts every call of the construction); the counts
    are the same (tests/test_cost.py). The global RNG is left as it was."""
    model = _truncated(num_joints, width, n_stage, multi)
    return count_params(model), forward_flops(model, tuple(image_size))


def stage_costs(num_joints: int, width: int, n_stage: int, image_size: tuple[int, int]) -> list[dict[str, int]]:
    """Cost of producing each stage's output alone, i.e. of the model truncated there with one
    head: [{"stage": k, "params": ..., "flops": ...}] for k = 1..n_stage (FLOPs per image)."""
    costs = []
    for k in range(1, n_stage + 1):
        params, flops = truncated_cost(num_joints, width, k, False, tuple(image_size))
        costs.append({"stage": k, "params": params, "flops": flops})
    return costs


def cpu_latency_ms(model: nn.Module, image_size: Sequence[int], *, repeats: int = 5, warmup: int = 1,
                   threads: int = 1) -> float:
    """Median wall time (ms) of a batch-1 eval forward pass on CPU with `threads` intra-op threads
    (restored afterwards), an HRNet BN folded and channels-last as `predict` runs it; image_size (w, h).

    One thread by default: at batch 1 HRNet's many small ops make multi-thread timings depend on
    what else runs on the machine; one thread is reproducible.
    """
    x = torch.zeros(1, 3, int(image_size[1]), int(image_size[0])).contiguous(memory_format=torch.channels_last)
    was_training, old_threads = model.training, torch.get_num_threads()
    model.eval()
    torch.set_num_threads(threads)
    times = []
    try:
        net = inference_copy(model) if isinstance(model, HRNetTrunk) else model
        with torch.no_grad():
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                net(x)
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)
    return float(statistics.median(times))


def stage_latencies_ms(num_joints: int, width: int, n_stage: int, image_size: Sequence[int], *,
                       stages: Sequence[int] | None = None, repeats: int = 5, warmup: int = 1) -> dict[int, float]:
    """CPU batch-1 single-thread latency (`cpu_latency_ms`) of the model truncated after each stage
    (one head, random weights: the cost does not depend on them) -> {stage: ms}."""
    out = {}
    for k in stages or range(1, n_stage + 1):
        out[int(k)] = cpu_latency_ms(_truncated(num_joints, width, int(k), False), image_size,
                                     repeats=repeats, warmup=warmup)
    return out


def _truncated(num_joints: int, width: int, n_stage: int, multi: bool) -> MultiOutHRNet:
    with torch.random.fork_rng(devices=[]):       # the weight init draws from it: the global RNG is left as it was
        return MultiOutHRNet(num_joints, width, n_stage, multi=multi)


def stage_costs_table(model: MultiOutHRNet, image_size: Sequence[int], repeats: int = 5) -> dict[int, dict[str, float]]:
    """{stage: {params_M, gflops, latency_ms}} for each output of a MultiOutHRNet: the model
    truncated after that stage with one head (what deploying that output alone costs); FLOPs of a
    forward pass at image_size (w, h), CPU batch-1 single-thread median latency of `repeats` runs.
    Each truncated model is built once for all three."""
    cfg = model.config()
    out = {}
    for k in model.output_stages:
        net = _truncated(cfg["num_joints"], cfg["width"], k, False)
        out[k] = {"params_M": round(count_params(net) / 1e6, 4),
                  "gflops": round(forward_flops(net, tuple(image_size)) / 1e9, 4),
                  "latency_ms": round(cpu_latency_ms(net, image_size, repeats=repeats), 2)}
    return out
