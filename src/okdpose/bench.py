"""CPU benchmarks measured side by side in one run: ratios, not just absolute times.

    okdpose bench [--quick] [--no-bf16] [--threads N] [--json PATH]   (or python -m okdpose.bench ...)

0. the limits, measured in the same run with the same threads: the fp32 and the bf16 rate of a
   large square `torch.mm` (sized so a call takes >= 0.2 s; bf16 labelled native or emulated by
   `okdpose.device.native_bf16`). Every % column refers to the matmul rate of its precision;
   the nominal cores x 32 FLOP/cycle x GHz is printed for information only (not a limit: one
   matmul beats it on CPUs that boost);
a. training step (forward + backward + Adam) of the multi-output HRNet with the full OKD loss,
   fp32 and bf16 autocast (forward only, the loss in fp32 as the Trainer), contiguous and
   channels-last, vs the same network single-output with plain MSE (fp32), and vs the original
   OKD-HRNet code's fp32 contiguous step (tests/original_hrnet.py, our OKDLoss on its outputs:
   the same loss terms, so the model code is what differs);
b. data loading per worker (PoseDataset of data/prepared, train=True, the configured
   augmentation and the original's augmentation) vs the fastest training step of the
   configured model (params.yaml);
c. inference per truncated stage count (batch, eval, no_grad) with params and FLOPs: fp32
   contiguous, channels-last, folded (`okdpose.model.fuse.inference_copy`: BN folded into the
   convs, channels-last; what `predict` runs on a checkpoint), the same in bf16 autocast, the
   stage's ONNX export run by onnxruntime (fp32, the bench's threads; what `predict` runs on an
   exported `.onnx`, its heatmaps checked against the folded model's), and the original eager
   model with N_STAGE = k; the students' real speed-up over the teacher vs their FLOP ratio;
d. EigenCAM: the explain stage's cost per image for all its layers (one forward, economy SVD,
   `okdpose.explain.eigencam_with_outputs` on the configured model) vs stock grad-cam run the
   plain way (one `EigenCAM` object and one forward per layer, full SVD); the projection alone
   and one layer end to end (exact and `fold_bn=True`), with the maximum difference of the maps.

a. and c. also profile one call: the time inside the convolution ops (oneDNN) and the GFLOP/s
they reach, a ceiling the whole step cannot beat however cheap the rest (BN, ReLU, adds, Adam).

bf16 on a CPU without bf16 units (AVX2) is emulated and 3-10x slower (convolutions; matmul ~60x):
its variants then run once without a warm-up call (and, in inference, on the teacher's stage
only) and are marked emulated; `--no-bf16` skips them.

Every comparison runs its variants interleaved (round robin, `repeats` rounds after `warmup`)
and reports medians, so slow drifts of a shared machine hit all variants alike. Wall time is
what the ratios use; CPU time of this process is reported too (`cpu_util` = CPU s / wall s, at
most the thread count): on a busy machine the % of the matmul rate per CPU-second used
(`pct_peak_cpu`) tells the code's efficiency apart from the share of the cores it got.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, ContextManager, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from okdpose import device as okd_device
from okdpose.losses import OKDLoss
from okdpose.model import MultiOutHRNet, count_params, forward_flops
from okdpose.params import LossParams, Params, SyntheticParams, load_params
from okdpose.train import make_optimizer

FLOPS_PER_CYCLE = 32     # fp32 per core and cycle with two 256-bit FMA units (AVX2): the nominal line only
FORMATS = ("contiguous", "channels_last")
INFER_FORMATS = FORMATS + ("folded",)     # folded: okdpose.model.fuse.inference_copy (BN folded, channels-last), what predict runs on a checkpoint
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
SETTLE_S = 0.3       # the CAM benches' pause before each timed call (`interleaved`): OpenBLAS threads go idle       # name -> autocast dtype (None: no autocast)
AUGMENT_ON = {"flip": True, "rotation": 30.0, "scale": 0.25, "half_body_prob": 0.3}   # the original's
# tests/original_hrnet.py: the original OKD-HRNet model, ported (a test file, not in the package)
ORIGINAL_HRNET = Path(__file__).resolve().parents[2] / "tests" / "original_hrnet.py"
ORIGINAL_MISSING = "original HRNet reference not found"

Peak = Mapping[str, Mapping[str, Any]]     # precision -> {"gflop_per_s", "gflop_per_cpu_s", ...}


# --------------------------------------------------------------------------- machine

def cpu_ghz() -> Optional[float]:
    """Nominal clock from /proc/cpuinfo ('cpu MHz' of the first core), None when unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000.0
    except (OSError, ValueError):
        pass
    return None


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                   # not on Linux
        return os.cpu_count() or 1


def nominal_gflops(cores: Optional[int] = None, ghz: Optional[float] = None,
                   flops_per_cycle: int = FLOPS_PER_CYCLE) -> float:
    """cores x flops/cycle x nominal GHz (NaN when the clock is unknown): informative, NOT a
    limit (the clock in /proc/cpuinfo is not the boost clock; AVX-512 has more FLOP/cycle)."""
    cores = cpu_cores() if cores is None else cores
    ghz = cpu_ghz() if ghz is None else ghz
    return cores * flops_per_cycle * ghz if ghz else math.nan


def auto_threads() -> int:
    """torch's thread count on an idle machine; 1 when other processes already keep half the cores busy."""
    return 1 if os.getloadavg()[0] >= 0.5 * cpu_cores() else torch.get_num_threads()


def bf16_label(native: Optional[bool] = None) -> str:
    """'native' or 'emulated': how this CPU runs bf16 (`okdpose.device.native_bf16`)."""
    native = okd_device.native_bf16(torch.device("cpu")) if native is None else native
    return "native" if native else "emulated"


# --------------------------------------------------------------------------- timing

@dataclass
class Timing:
    wall: list[float]
    cpu: list[float]

    @property
    def median(self) -> float:
        return float(statistics.median(self.wall))

    @property
    def cpu_util(self) -> float:
        """CPU seconds per wall second (summed over the process's threads), medians."""
        return float(statistics.median(self.cpu)) / self.median if self.median > 0 else math.nan


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                plan: Optional[Mapping[str, tuple[int, int]]] = None, settle_s: float = 0.0) -> dict[str, Timing]:
    """Time each callable `repeats` times after `warmup` untimed calls, round robin over the
    variants so that load changes on a shared machine affect them alike. `plan` gives some
    variants their own (warmup, repeats) (e.g. a slow emulated one): they take part in the
    first rounds only. `settle_s`: an untimed pause before each call, for variants that mix
    thread pools (numpy's OpenBLAS, torch's OpenMP): a pool's workers busy-wait after a call and
    take a core from the next variant (measured: our explain forward right after stock grad-cam's
    2-thread SVD 49 ms/image, after a pause 35; AVX2 CPU, 2 cores)."""
    plan = {name: (plan or {}).get(name, (warmup, repeats)) for name in fns}
    out = {name: Timing([], []) for name in fns}
    for r in range(max(w + n for w, n in plan.values())):
        for name, fn in fns.items():
            w, n = plan[name]
            if r >= w + n:
                continue
            if settle_s:
                time.sleep(settle_s)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            if r >= w:
                out[name].wall.append(t1 - t0)
                out[name].cpu.append(c1 - c0)
    return out


@contextmanager
def num_threads(n: Optional[int]) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def autocast(precision: str) -> ContextManager[Any]:
    """The forward's autocast for a precision name ('fp32': none)."""
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


# --------------------------------------------------------------------------- 0. measured limits

def _matmul_size(dtype: torch.dtype, min_s: float, max_n: int, start: int = 256) -> int:
    """The square size n (multiple of 64) at which one n x n x n `torch.mm` takes >= min_s."""
    n = start
    for _ in range(8):
        a = torch.randn(n, n).to(dtype)
        torch.mm(a, a)                                  # first call: allocation, kernel choice
        t0 = time.perf_counter()
        torch.mm(a, a)
        t = time.perf_counter() - t0
        if t >= min_s or n >= max_n:
            return n
        grow = (1.3 * min_s / max(t, 1e-6)) ** (1 / 3)   # time grows as n^3
        n = min(max_n, max(n + 64, int(n * grow) // 64 * 64))
    return n


def matmul_rates(threads: Optional[int] = None, min_s: float = 0.2, repeats: int = 3, warmup: int = 1,
                 max_n: int = 8192, n: Optional[int] = None,
                 ns: Optional[Mapping[str, int]] = None) -> dict[str, dict[str, Any]]:
    """The measured limits: GFLOP/s of a square fp32 and bf16 `torch.mm` (2 n^3 FLOPs), each
    sized so a call takes >= `min_s` (or of size `n`, or per precision `ns`: a re-measurement at
    the sizes of an earlier one), interleaved, medians; with the rate per CPU-second this process
    got (what `pct_peak_cpu` refers to). bf16 is always measured and labelled native or emulated."""
    with num_threads(threads):
        sizes = {p: (ns or {}).get(p) or n or _matmul_size(PRECISIONS[p] or torch.float32, min_s, max_n)
                 for p in PRECISIONS}
        mats = {p: torch.randn(k, k, generator=torch.Generator().manual_seed(0)).to(PRECISIONS[p] or torch.float32)
                for p, k in sizes.items()}
        times = interleaved({p: (lambda a=a: torch.mm(a, a)) for p, a in mats.items()}, repeats, warmup)
    out = {}
    for p, t in times.items():
        flop = 2.0 * sizes[p] ** 3
        cpu_s = statistics.median(t.cpu)
        out[p] = {"n": sizes[p], "s_per_call": round(t.median, 6), "gflop_per_s": round(flop / t.median / 1e9, 2),
                  "gflop_per_cpu_s": round(flop / cpu_s / 1e9, 2) if cpu_s > 0 else math.nan,
                  "cpu_util": round(t.cpu_util, 2), "source": "measured"}
    out["bf16"]["label"] = bf16_label()
    return out


def fixed_peak(gflops: float, cores: Optional[int] = None) -> dict[str, dict[str, Any]]:
    """A given peak for every precision (`--peak-gflops`, tests): per CPU-second = per core."""
    per_cpu_s = gflops / (cpu_cores() if cores is None else cores)
    return {p: {"gflop_per_s": gflops, "gflop_per_cpu_s": per_cpu_s, "source": "given"} for p in PRECISIONS}


def as_peak(peak: Union[None, float, Peak], threads: Optional[int] = None) -> Peak:
    """A section's peak argument: None -> measured now (short), a number -> `fixed_peak`, else as is."""
    if peak is None:
        return matmul_rates(threads, min_s=0.05, repeats=1)
    if isinstance(peak, (int, float)):
        return fixed_peak(float(peak))
    return peak


def _rate(flop: float, t: Timing, peak: Mapping[str, Any]) -> dict[str, float]:
    """Achieved GFLOP/s for `flop` FLOPs per call; % of the measured matmul rate (`peak`, of the
    variant's precision), and % of the matmul's rate per CPU-second for the CPU time this call
    got (efficiency independent of other load)."""
    gflops = flop / t.median / 1e9
    cpu_s = statistics.median(t.cpu)
    per_cpu = peak.get("gflop_per_cpu_s", math.nan)
    return {"gflop_per_s": round(gflops, 2), "pct_peak": round(100 * gflops / peak["gflop_per_s"], 1),
            "pct_peak_cpu": round(100 * flop / 1e9 / cpu_s / per_cpu, 1) if cpu_s > 0 and per_cpu > 0 else math.nan,
            "cpu_util": round(t.cpu_util, 2)}


def _to_format(x: Any, fmt: str) -> Any:
    memory = torch.channels_last if fmt in ("channels_last", "folded") else torch.contiguous_format
    return x.to(memory_format=memory)


def load_original(path: Optional[Path] = None) -> Optional[ModuleType]:
    """tests/original_hrnet.py (the original OKD-HRNet model, ported) imported by path; None
    when it is absent or does not import (an installed package has no tests/)."""
    path = ORIGINAL_HRNET if path is None else Path(path)
    if not path.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location("okdpose_bench_original_hrnet", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module if hasattr(module, "MultiOutPoseHrnet") else None
    except Exception:            # a broken reference must not stop the bench: its rows say why
        return None


# --------------------------------------------------------------------------- convolution share

@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop lines), restoring it afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def conv_share(fn: Callable[[], Any], flop: float, peak: float, threads: Optional[int] = None) -> dict[str, Any]:
    """Profile one call of `fn` (after one warm-up call): the wall time spent inside convolution
    ops (forward and backward, their own time) vs the whole call, and the GFLOP/s those ops reach
    on `flop` convolution FLOPs: the % of the fp32 matmul rate (`peak`) a call could reach if everything else were free,
    i.e. the ceiling the convolution library sets for this model on this CPU."""
    from torch.profiler import ProfilerActivity, profile

    with num_threads(threads):
        fn()
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
    conv_us = sum(e.self_cpu_time_total for e in prof.key_averages()
                  if ("convolution" in e.key or "conv2d" in e.key) and not e.key.startswith("autograd::"))
    conv_s = conv_us / 1e6
    gflops = flop / conv_s / 1e9 if conv_s > 0 else math.nan
    return {"call_s": round(wall, 6), "conv_s": round(conv_s, 6), "conv_share": round(conv_s / wall, 3),
            "conv_gflop_per_s": round(gflops, 2), "conv_pct_peak": round(100 * gflops / peak, 1)}


# --------------------------------------------------------------------------- a. training step

def make_train_step(model: nn.Module, loss_fn: OKDLoss, batch: int, image_size: Sequence[int],
                    fmt: str = "contiguous", seed: int = 0, precision: str = "fp32") -> Callable[[], float]:
    """A closure running one training step on a fixed random batch as the Trainer does: forward
    under `precision`'s autocast, the loss in fp32 (OKDLoss casts the heatmaps), backward, Adam."""
    g = torch.Generator().manual_seed(seed)
    w, h = int(image_size[0]), int(image_size[1])
    j = int(getattr(model, "num_joints", 0) or model.final_layer.out_channels)
    x = _to_format(torch.randn(batch, 3, h, w, generator=g), fmt)
    target = torch.rand(batch, j, h // 4, w // 4, generator=g)
    weight = torch.ones(batch, j)
    _to_format(model, fmt).train()
    opt = make_optimizer(model, "adam", 1e-4)          # what the Trainer uses

    def step() -> float:
        with autocast(precision):
            outputs = model(x)
        total, _ = loss_fn(outputs, target, weight)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return float(total.detach())

    return step


def _couples(n_stage: int) -> tuple[tuple[int, int], ...]:
    return tuple((s, n_stage) for s in range(1, n_stage))


def _okd_loss(n_stage: int) -> OKDLoss:
    return OKDLoss(LossParams(kld_couples=_couples(n_stage)), tuple(range(1, n_stage + 1)))


def _bf16_plan(names: Sequence[str], native: bool, repeats: int, warmup: int,
               bf16_repeats: int, bf16_warmup: int) -> dict[str, tuple[int, int]]:
    """(warmup, repeats) of the bf16 variants: as the others where bf16 is native, else reduced."""
    if native:
        return {}
    return {n: (min(warmup, bf16_warmup), max(1, min(repeats, bf16_repeats))) for n in names if "/bf16/" in n}


def train_bench(width: int = 32, n_stage: int = 4, num_joints: int = 12, image_size: Sequence[int] = (192, 256),
                batch: int = 8, repeats: int = 3, warmup: int = 1, formats: Sequence[str] = FORMATS,
                peak: Union[None, float, Peak] = None, threads: Optional[int] = None, bf16: bool = True,
                bf16_repeats: int = 1, bf16_warmup: int = 0, original: Union[bool, Path, None] = True,
                native: Optional[bool] = None) -> dict[str, Any]:
    """Training steps side by side -> table and ratios. Variants `<kind>/<precision>/<format>`:
    okd (multi-output, OKDLoss MSE on every head + KL couples to the teacher) in fp32 and bf16,
    single (multi: false, MSE) in fp32, and original/fp32/contiguous (the original OKD-HRNet
    model, `load_original`, with our OKDLoss on its outputs: same loss terms, the model code
    differs). `original`: True = tests/original_hrnet.py, a path, or False/None = skip.
    bf16 where it is emulated (`native` False) runs with `bf16_repeats` / `bf16_warmup`."""
    peak = as_peak(peak, threads)
    native = okd_device.native_bf16(torch.device("cpu")) if native is None else native
    precisions = ("fp32", "bf16") if bf16 else ("fp32",)
    steps, flops, kind_of = {}, {}, {}
    for kind in ("okd", "single"):
        multi = kind == "okd"
        with torch.device("meta"):           # FLOPs counted without computing
            probe = MultiOutHRNet(num_joints, width, n_stage, multi=multi)
        flops[kind] = forward_flops(probe, tuple(image_size))
        loss = _okd_loss(n_stage) if multi else OKDLoss(LossParams(use_kld=False, kld_couples=()), (n_stage,))
        for prec in precisions if multi else ("fp32",):
            for fmt in formats:
                torch.manual_seed(0)
                name = f"{kind}/{prec}/{fmt}"
                steps[name] = make_train_step(MultiOutHRNet(num_joints, width, n_stage, multi=multi),
                                              loss, batch, image_size, fmt, precision=prec)
                kind_of[name] = kind
    ref = load_original(None if original is True else original) if original else None
    note = None
    if ref is not None and n_stage == 4:
        torch.manual_seed(0)
        steps["original/fp32/contiguous"] = make_train_step(ref.MultiOutPoseHrnet(num_joints, width, 4),
                                                            _okd_loss(4), batch, image_size, "contiguous")
        kind_of["original/fp32/contiguous"] = "okd"         # the same FLOPs: 4 heads, the same trunk
    elif original:
        note = ORIGINAL_MISSING if ref is None else "the original's step is compared at n_stage 4 only"
    plan = _bf16_plan(list(steps), native, repeats, warmup, bf16_repeats, bf16_warmup)
    with num_threads(threads):
        times = interleaved(steps, repeats, warmup, plan)
    variants = {}
    for name, t in times.items():
        prec = name.split("/")[1]
        flop = 3 * flops[kind_of[name]] * batch
        variants[name] = {"precision": prec, "format": name.split("/")[2], "s_per_step": round(t.median, 4),
                          "img_per_s": round(batch / t.median, 3), "repeats": len(t.wall),
                          **({"bf16": bf16_label(native)} if prec == "bf16" else {}), **_rate(flop, t, peak[prec])}
    ceiling = {fmt: conv_share(steps[f"okd/fp32/{fmt}"], 3 * flops["okd"] * batch, peak["fp32"]["gflop_per_s"],
                               threads) for fmt in formats}
    med = {name: t.median for name, t in times.items()}
    ratios = {f"okd_vs_single/{fmt}": round(med[f"okd/fp32/{fmt}"] / med[f"single/fp32/{fmt}"], 3) for fmt in formats}
    if len(formats) == 2:
        for kind, prec in [("okd", p) for p in precisions] + [("single", "fp32")]:
            ratios[f"channels_last_speedup/{kind}/{prec}"] = round(
                med[f"{kind}/{prec}/contiguous"] / med[f"{kind}/{prec}/channels_last"], 3)
    if bf16:
        for fmt in formats:
            ratios[f"bf16_speedup/okd/{fmt}"] = round(med[f"okd/fp32/{fmt}"] / med[f"okd/bf16/{fmt}"], 3)
    best = max((n for n in variants if n.startswith("okd/")), key=lambda n: variants[n]["img_per_s"])
    vs_original: dict[str, Any] = {"note": note}
    if "original/fp32/contiguous" in med:
        vs_original = {"best": best, "speedup": round(med["original/fp32/contiguous"] / med[best], 3),
                       "speedup_same_setting": round(med["original/fp32/contiguous"] / med["okd/fp32/contiguous"], 3),
                       "loss": "okdpose OKDLoss on the original model's 4 outputs (MSE per head + KL couples)"}
    return {"config": {"width": width, "n_stage": n_stage, "joints": num_joints, "image_size": list(image_size),
                       "batch": batch, "repeats": repeats, "couples": [list(c) for c in _couples(n_stage)],
                       "bf16": bf16_label(native) if bf16 else "off"},
            "forward_gflop_per_image": {k: round(v / 1e9, 3) for k, v in flops.items()},
            "variants": variants, "ratios": ratios, "best": best, "vs_original": vs_original, "conv_share": ceiling}


# --------------------------------------------------------------------------- b. data loading

def loader_bench(prepared: str | Path, params: Any, samples: int = 64, repeats: int = 3,
                 threads: Optional[int] = None, train_repeats: int = 3,
                 native: Optional[bool] = None) -> dict[str, Any]:
    """Samples/s of one loader worker (PoseDataset train=True with the configured augmentation,
    and with the original's augmentation `AUGMENT_ON` when the configured one is off; batched by
    a DataLoader without workers) vs the img/s the FASTEST training step of the configured model
    consumes (fp32 contiguous / channels-last, and bf16 too where it is native: emulated bf16 is
    never the fastest) -> ratios (loader / training)."""
    from torch.utils.data import DataLoader, Subset

    from okdpose.data.dataset import PoseDataset

    d, m, t = params.data, params.model, params.train
    spec = params.joint_spec
    native = okd_device.native_bf16(torch.device("cpu")) if native is None else native
    ds = PoseDataset(prepared, "train", spec, d.codec, augment=d.augment, train=True)
    idx = np.random.default_rng(0).permutation(len(ds))[:samples]
    idx = np.resize(idx, samples) if len(idx) < samples else idx        # tiny data: cycle through it
    batch = t.batch_size
    loaders = {"load": ds}
    if ds.augment is None:        # also with augmentation (frames decoded and warped, no crop cache)
        aug = dataclasses.replace(d.augment, **AUGMENT_ON)
        loaders["load_augmented"] = PoseDataset(prepared, "train", spec, d.codec, augment=aug, train=True)

    def load(dataset: Any) -> Callable[[], None]:
        def run() -> None:
            for _ in DataLoader(Subset(dataset, idx.tolist()), batch_size=batch, num_workers=0):
                pass
        return run

    steps = {}
    for prec in ("fp32", "bf16") if native else ("fp32",):
        for fmt in FORMATS:
            torch.manual_seed(0)
            model = MultiOutHRNet(spec.num_joints, m.width, m.n_stage, multi=m.multi)
            steps[f"{prec}/{fmt}"] = make_train_step(model, OKDLoss(params.loss, params.output_stages()), batch,
                                                     d.image_size, fmt, precision=prec)
    with num_threads(threads):
        lts = interleaved({k: load(v) for k, v in loaders.items()}, repeats, warmup=1)
        tts = interleaved(steps, train_repeats, warmup=1)
    train_rates = {k: batch / v.median for k, v in tts.items()}
    fastest = max(train_rates, key=train_rates.get)
    load_rate, train_rate = samples / lts["load"].median, train_rates[fastest]
    aug_rate = samples / lts["load_augmented"].median if "load_augmented" in lts else load_rate
    out = {"config": {"prepared": str(prepared), "samples": int(samples), "batch": batch,
                      "image_size": list(d.image_size), "heatmap_size": list(d.heatmap_size),
                      "augment": bool(ds.augment is not None), "crop_cache": bool(ds.use_cache),
                      "model": {"width": m.width, "n_stage": m.n_stage, "multi": m.multi}},
           "train_variants_img_per_s": {k: round(v, 2) for k, v in train_rates.items()}, "train_fastest": fastest,
           "loader_img_per_s_per_worker": round(load_rate, 2), "train_img_per_s": round(train_rate, 2),
           "ratio": round(load_rate / train_rate, 2),
           "ratio_augmented": round(aug_rate / train_rate, 2)}     # the configured one when that augments
    if "load_augmented" in lts:
        out["augmented"] = {"augment": AUGMENT_ON, "loader_img_per_s_per_worker": round(aug_rate, 2),
                            "ratio": round(aug_rate / train_rate, 2)}
    return out


# --------------------------------------------------------------------------- c. inference

def inference_bench(width: int = 32, stages: Sequence[int] = (2, 3, 4), num_joints: int = 12,
                    image_size: Sequence[int] = (192, 256), batch: int = 8, repeats: int = 3, warmup: int = 1,
                    formats: Sequence[str] = INFER_FORMATS, peak: Union[None, float, Peak] = None,
                    threads: Optional[int] = None, bf16: bool = True, bf16_repeats: int = 1,
                    bf16_warmup: int = 0, original: Union[bool, Path, None] = True,
                    native: Optional[bool] = None, onnx: bool = True) -> dict[str, Any]:
    """Eval-mode no_grad forward of the model truncated after each stage (one head), variants
    `stage<k>/<precision>/<format>`: plain (contiguous), channels-last and folded
    (`inference_copy`: BN folded, channels-last; what `predict` runs on a checkpoint), in fp32 and
    bf16 autocast (where bf16 is emulated: the deepest stage only, `bf16_repeats`);
    `stage<k>/fp32/onnxruntime` (`onnx`): the stage's ONNX export (`okdpose.export`, BN folded)
    in an onnxruntime CPU session with the same threads, what `predict` runs on a `.onnx`
    (its heatmaps vs the folded model's: `max_abs_diff_vs_folded`); and `stage<k>/original`:
    the original eager model with N_STAGE = k (fp32, contiguous; it returns its k heads). The
    students' speed-up over the teacher (best variant each) vs their FLOP ratio; the convolution
    ceiling of the deepest stage's last format in fp32."""
    from okdpose.model.fuse import inference_copy

    peak = as_peak(peak, threads)
    native = okd_device.native_bf16(torch.device("cpu")) if native is None else native
    ref = load_original(None if original is True else original) if original else None
    missing = ORIGINAL_MISSING if original else "original not run"
    w, h = int(image_size[0]), int(image_size[1])
    teacher = max(stages)
    fns, info, stage_of, ort_diff = {}, {}, {}, {}
    ort_note = _onnx_missing() if onnx else "onnxruntime not run"
    ort_threads = int(threads or torch.get_num_threads())
    for k in stages:
        with torch.device("meta"):           # FLOPs counted without computing
            probe = MultiOutHRNet(num_joints, width, k, multi=False)
        info[k] = {"params_M": round(count_params(probe) / 1e6, 3),
                   "gflop_per_image": round(forward_flops(probe, (w, h)) / 1e9, 3)}
        x0 = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(k))
        precisions = ("fp32", "bf16") if bf16 and (native or k == teacher) else ("fp32",)
        for prec in precisions:
            for fmt in formats:
                torch.manual_seed(0)
                m = MultiOutHRNet(num_joints, width, k, multi=False).eval()
                m = inference_copy(m) if fmt == "folded" else _to_format(m, fmt)

                def run(m: nn.Module = m, x: torch.Tensor = _to_format(x0, fmt), prec: str = prec) -> None:
                    with torch.no_grad(), autocast(prec):
                        m(x)

                fns[f"stage{k}/{prec}/{fmt}"] = run
                stage_of[f"stage{k}/{prec}/{fmt}"] = k
        if ort_note is None:
            torch.manual_seed(0)
            fns[f"stage{k}/fp32/onnxruntime"], ort_diff[k] = _onnx_variant(
                MultiOutHRNet(num_joints, width, k, multi=False).eval(), x0, ort_threads)
            stage_of[f"stage{k}/fp32/onnxruntime"] = k
        if ref is not None:
            torch.manual_seed(0)
            om = ref.MultiOutPoseHrnet(num_joints, width, k).eval()

            def run_original(m: nn.Module = om, x: torch.Tensor = x0) -> None:
                with torch.no_grad():
                    m(x)

            fns[f"stage{k}/original"] = run_original
            stage_of[f"stage{k}/original"] = k
    plan = _bf16_plan(list(fns), native, repeats, warmup, bf16_repeats, bf16_warmup)
    with num_threads(threads):
        times = interleaved(fns, repeats, warmup, plan)
    rows = {}
    for name, t in times.items():
        k = stage_of[name]
        prec = "fp32" if name.endswith("/original") else name.split("/")[1]
        rows[name] = {**info[k], "precision": prec, "img_per_s": round(batch / t.median, 2), "repeats": len(t.wall),
                      **({"bf16": bf16_label(native)} if prec == "bf16" else {}),
                      **_rate(info[k]["gflop_per_image"] * 1e9 * batch, t, peak[prec])}
        if name.endswith("/onnxruntime"):
            rows[name].update(threads=ort_threads, max_abs_diff_vs_folded=ort_diff[k])
    med = {name: t.median for name, t in times.items()}
    ratios = {}
    for name in med:
        k, prec, fmt = (name.split("/") + [""])[:3]
        if fmt and fmt != "contiguous" and f"{k}/{prec}/contiguous" in med:
            ratios[f"{fmt}_speedup/{k}/{prec}"] = round(med[f"{k}/{prec}/contiguous"] / med[name], 3)
        if prec == "bf16":
            ratios[f"bf16_speedup/{k}/{fmt}"] = round(med[f"{k}/fp32/{fmt}"] / med[name], 3)
    best = {k: max((n for n in rows if stage_of[n] == k and not n.endswith("/original")),
                   key=lambda n: rows[n]["img_per_s"]) for k in stages}
    vs_original = {f"stage{k}": ({"best": best[k], "speedup": round(med[f"stage{k}/original"] / med[best[k]], 3)}
                                 if f"stage{k}/original" in med else {"note": missing}) for k in stages}
    students = {f"stage{k}": {"speedup": round(med[best[teacher]] / med[best[k]], 3),
                              "flop_ratio": round(info[teacher]["gflop_per_image"] / info[k]["gflop_per_image"], 3)}
                for k in stages if k != teacher}
    for s in students.values():
        s["speedup_over_flop_ratio"] = round(s["speedup"] / s["flop_ratio"], 3)
    last = f"stage{teacher}/fp32/{formats[-1]}"          # profiled: torch ops only, not onnxruntime's
    ceiling = conv_share(fns[last], info[teacher]["gflop_per_image"] * 1e9 * batch, peak["fp32"]["gflop_per_s"], threads)
    ceiling["variant"] = last
    return {"config": {"width": width, "image_size": [w, h], "batch": batch, "repeats": repeats,
                       "stages": list(stages), "bf16": bf16_label(native) if bf16 else "off",
                       "bf16_stages": [] if not bf16 else list(stages) if native else [teacher],
                       "onnxruntime": _onnx_version() if ort_note is None else ort_note},
            "variants": rows, "ratios": ratios, "best": {f"stage{k}": v for k, v in best.items()},
            "vs_original": vs_original, "students": students, "conv_share": ceiling}


def _onnx_missing() -> Optional[str]:
    """None when onnx and onnxruntime import, else why the onnxruntime variants are skipped."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(missing)} not installed (pip install -r requirements.txt)" if missing else None


def _onnx_version() -> str:
    import onnxruntime as ort
    return str(ort.__version__)


def _onnx_variant(net: MultiOutHRNet, x0: torch.Tensor, threads: int) -> tuple[Callable[[], None], float]:
    """(a timed call, max |heatmap difference| vs the folded eager model) of `net`'s last stage
    exported the way `okdpose export` does it (`stage_model` folds BN) in an onnxruntime session."""
    from okdpose.export import onnx_bytes, onnx_runner, stage_model
    from okdpose.model.fuse import inference_copy

    sm = stage_model(net, net.n_stage)
    run = onnx_runner(onnx_bytes(sm, None, (x0.shape[3], x0.shape[2])), threads=threads)
    x = np.ascontiguousarray(x0.numpy(), dtype=np.float32)
    with torch.no_grad():
        ref = inference_copy(net)(x0.contiguous(memory_format=torch.channels_last))[0].float().numpy()
    diff = float(np.abs(run(x) - ref).max())

    def call() -> None:
        run(x)
    return call, diff


# --------------------------------------------------------------------------- d. EigenCAM

def eigencam_bench(map_size: Sequence[int] = (48, 64), channels: int = 32, width: int = 32, n_stage: int = 4,
                   image_size: Sequence[int] = (192, 256), images: int = 1, layer: Optional[str] = None,
                   repeats: int = 3, e2e_repeats: Optional[int] = None, threads: Optional[int] = None,
                   warmup: int = 1) -> dict[str, Any]:
    """Projection of (1, C, h, w) activations (map_size (w, h)) and one layer end to end (model
    forward + projection + upsampling) for `images` crops: ours vs stock grad-cam."""
    from pytorch_grad_cam import EigenCAM
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    from okdpose.explain import economy_2d_projection, eigencam

    mw, mh = int(map_size[0]), int(map_size[1])
    rng = np.random.default_rng(0)
    acts = np.maximum(rng.standard_normal((1, channels, mh, mw)), 0).astype(np.float32)
    acts *= rng.random((1, channels, 1, 1), np.float32)            # channels of different scale
    proj: dict[str, np.ndarray] = {}
    with num_threads(threads):
        pt = interleaved({"stock": lambda: proj.__setitem__("stock", get_2d_projection(acts)),
                          "ours": lambda: proj.__setitem__("ours", economy_2d_projection(acts))}, repeats, warmup)

    torch.manual_seed(0)
    model = MultiOutHRNet(12, width, n_stage).eval()
    layer = layer or model.feature_layer_names()[-1]
    x = torch.randn(images, 3, int(image_size[1]), int(image_size[0]), generator=torch.Generator().manual_seed(1))
    maps: dict[str, np.ndarray] = {}

    def stock() -> None:
        with EigenCAM(model, [model.get_submodule(layer)]) as cam:
            maps["stock"] = cam(x, targets=[])          # targets=[]: grad-cam 1.5.7 with a list output

    def ours() -> None:
        maps["ours"] = eigencam(model, x, [layer], sign="stock")[layer]     # stock: grad-cam's own sign

    def folded() -> None:
        maps["folded"] = eigencam(model, x, [layer], fold_bn=True, sign="stock")[layer]

    with num_threads(threads):
        from okdpose.model.fuse import inference_copy
        t0 = time.perf_counter()
        inference_copy(model)                   # the one-off cost of the folded copy (cached by eigencam)
        copy_s = time.perf_counter() - t0
        et = interleaved({"stock": stock, "ours": ours, "folded": folded}, e2e_repeats or repeats, max(warmup, 1),
                         settle_s=SETTLE_S)
    return {"config": {"map_size": [mw, mh], "channels": channels, "width": width, "n_stage": n_stage,
                       "image_size": list(image_size), "images": images, "layer": layer, "repeats": repeats,
                       "e2e_repeats": e2e_repeats or repeats, "warmup": warmup},
            "projection": {"stock_ms": round(pt["stock"].median * 1e3, 2), "ours_ms": round(pt["ours"].median * 1e3, 3),
                           "speedup": round(pt["stock"].median / pt["ours"].median, 1),
                           "max_abs_diff": float(np.abs(proj["stock"] - proj["ours"]).max())},
            "end_to_end": {"stock_ms": round(et["stock"].median * 1e3, 1), "ours_ms": round(et["ours"].median * 1e3, 1),
                           "speedup": round(et["stock"].median / et["ours"].median, 2),
                           "max_abs_diff": float(np.abs(maps["stock"] - maps["ours"]).max())},
            "end_to_end_folded": {"ms": round(et["folded"].median * 1e3, 1), "copy_ms_once": round(copy_s * 1e3, 1),
                                  "speedup": round(et["stock"].median / et["folded"].median, 2),
                                  "max_abs_diff": float(np.abs(maps["stock"] - maps["folded"]).max())}}


def explain_bench(params: Any, images: int = 4, repeats: int = 3, warmup: int = 1,
                  threads: Optional[int] = None, bf16: bool = False) -> dict[str, Any]:
    """The explain stage's EigenCAM cost per image for all its layers (`cam_targets` of the
    configured model and explain params: every stage's feature and head, 8 layers for 4 stages)
    on `images` random crops of data.image_size: ours as the stage runs it
    (`eigencam_with_outputs`: one forward for all layers, economy SVD, fp32) vs stock grad-cam
    the plain way (one `EigenCAM` object and one forward per layer, full SVD via its own
    `get_2d_projection`). Random weights: the cost does not depend on them. `bf16`: also ours
    with explain.precision bf16 (the forward under bf16 autocast; the bench asks for it only where
    bf16 is native: emulated it is many times slower)."""
    from pytorch_grad_cam import EigenCAM

    from okdpose.explain import cam_targets, eigencam_with_outputs

    m, e, (w, h) = params.model, params.explain, params.data.image_size
    torch.manual_seed(0)
    model = MultiOutHRNet(params.joint_spec.num_joints, m.width, m.n_stage, multi=m.multi).eval()
    layers = [t.layer for t in cam_targets(model, e.stages, e.heads, e.layers)]
    x = torch.randn(images, 3, int(h), int(w), generator=torch.Generator().manual_seed(1))

    def stock() -> None:
        for name in layers:
            with EigenCAM(model, [model.get_submodule(name)]) as cam:
                cam(x, targets=[])              # targets=[]: grad-cam 1.5.7 with a list output

    fns = {"stock": stock, "ours": lambda: eigencam_with_outputs(model, x, layers, sign=e.sign)}
    if bf16:
        fns["ours_bf16"] = lambda: eigencam_with_outputs(model, x, layers, sign=e.sign, autocast=torch.bfloat16)
    with num_threads(threads):
        t = interleaved(fns, repeats, warmup, settle_s=SETTLE_S)
    out = {"config": {"width": m.width, "n_stage": m.n_stage, "multi": m.multi, "image_size": [int(w), int(h)],
                      "images": images, "layers": layers, "sign": e.sign, "repeats": repeats, "settle_s": SETTLE_S},
           "stock_ms_per_image": round(t["stock"].median / images * 1e3, 2),
           "ours_ms_per_image": round(t["ours"].median / images * 1e3, 2),
           "speedup": round(t["stock"].median / t["ours"].median, 2)}
    if bf16:
        out.update(ours_bf16_ms_per_image=round(t["ours_bf16"].median / images * 1e3, 2),
                   speedup_bf16=round(t["stock"].median / t["ours_bf16"].median, 2))
    return out


# --------------------------------------------------------------------------- data for b.

def find_prepared(params_path: Path = Path("params.yaml"),
                  prepared: Path = Path("data/prepared")) -> tuple[Any, Optional[Path]]:
    """(params, prepared folder or None): params.yaml of the working directory when it exists
    (else the defaults), data/prepared when it holds a train split for the configured joints."""
    params = load_params(params_path) if params_path.is_file() else Params()
    meta = prepared / "meta.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        if m.get("joints") == params.data.joints and "train" in m.get("splits", {}):
            return params, prepared
    return params, None


def synthetic_prepared(root: Path, params: Any) -> Path:
    """A tiny built-in data set (1 subject x 8 frames per split) prepared under `root`."""
    from okdpose.data.coco import prepare_dataset
    from okdpose.data.fetch import fetch_raw

    raw = root / "raw" / "babypose"
    fetch_raw(raw, "synthetic", synthetic=SyntheticParams(seed=0, subjects=(1, 1, 1), frames_per_subject=8),
              spec=params.joint_spec, progress=False)
    out = root / "prepared"
    prepare_dataset(raw, out, params.joint_spec, params.data.image_size, params.data.depth_range, progress=False)
    return out


# --------------------------------------------------------------------------- the run

@dataclass(frozen=True)
class Sizes:
    """What one run measures (full: the issue's sizes; quick: smaller sizes and fewer repeats).
    bf16_*: the bf16 variants' warm-up and repeats where bf16 is emulated (native: as fp32)."""

    train_image: tuple[int, int]
    train_batch: int
    train_repeats: int
    infer_image: tuple[int, int]
    infer_batch: int
    infer_repeats: int
    loader_samples: int
    loader_repeats: int
    cam_image: tuple[int, int]
    cam_repeats: int
    cam_e2e_repeats: int
    cam_warmup: int = 1
    explain_images: int = 4
    explain_repeats: int = 3
    bf16_repeats: int = 1
    bf16_warmup: int = 0             # an emulated bf16 call takes minutes at full size: no warm-up call
    matmul_min_s: float = 0.2
    matmul_repeats: int = 3


FULL = Sizes((192, 256), 8, 3, (192, 256), 8, 3, 128, 3, (192, 256), 5, 3)
QUICK = Sizes((64, 96), 2, 2, (64, 96), 2, 2, 32, 2, (192, 256), 2, 1, cam_warmup=0, explain_images=2,
              explain_repeats=1, matmul_repeats=2)
SECTIONS = ("train", "loader", "inference", "eigencam")


def machine_info(threads: Optional[int], peak: Peak) -> dict[str, Any]:
    """The CPU (model, the flags that matter, bf16 native or not), the measured limits and the
    nominal figure (informative)."""
    ghz = cpu_ghz()
    native = okd_device.native_bf16(torch.device("cpu"))
    with num_threads(threads):           # what `auto` decides by at these threads (okdpose.device)
        probe = okd_device.cpu_bf16_probe() if native else None
    capped = {}
    if okd_device.isa_cap():     # code paths of a smaller CPU on this one: say so beside every figure
        capped = {"isa_cap": okd_device.isa_cap(), "aten_capability": torch.backends.cpu.get_cpu_capability(),
                  "mkl_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "unset"),
                  "cpu_flags_all": [f for f in okd_device.REPORTED_CPU_FLAGS if f in okd_device.cpu_flags()]}
    return {"cpu_model": okd_device.cpu_model(), "cpu_flags": okd_device.reported_flags(),
            "native_bf16": native, "bf16_probe": probe, "cores": cpu_cores(), "ghz": ghz,
            "nominal_gflops": round(nominal_gflops(ghz=ghz), 1), "flops_per_cycle": FLOPS_PER_CYCLE,
            "matmul": {p: dict(v) for p, v in peak.items()}, "threads": threads or torch.get_num_threads(),
            "loadavg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__, **capped}


def run_all(sizes: Sizes, threads: Optional[int] = None, peak: Optional[float] = None,
            sections: Sequence[str] = SECTIONS, bf16: bool = True,
            log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    log("0. matmul limits ...")
    rates = matmul_rates(threads, sizes.matmul_min_s, sizes.matmul_repeats)
    if peak is not None:                                  # --peak-gflops: an override of the fp32 limit
        rates["fp32"] = {**rates["fp32"], **fixed_peak(peak)["fp32"], "measured_gflop_per_s": rates["fp32"]["gflop_per_s"]}
    out: dict[str, Any] = {"machine": machine_info(threads, rates)}
    native = out["machine"]["native_bf16"]
    bf = {"bf16": bf16, "bf16_repeats": sizes.bf16_repeats, "bf16_warmup": sizes.bf16_warmup, "native": native}
    if "train" in sections:
        log("a. training step ...")
        out["train"] = train_bench(image_size=sizes.train_image, batch=sizes.train_batch,
                                   repeats=sizes.train_repeats, peak=rates, threads=threads, **bf)
    params, prepared = find_prepared()
    if "loader" in sections:
        log("b. data loader ...")
        with tempfile.TemporaryDirectory(prefix="okdpose-bench-") as tmp:
            source = "data/prepared"
            if prepared is None:
                prepared, source = synthetic_prepared(Path(tmp), params), "synthetic (temp dir)"
            out["loader"] = loader_bench(prepared, params, sizes.loader_samples, sizes.loader_repeats, threads,
                                         train_repeats=sizes.loader_repeats, native=native)
            out["loader"]["config"]["source"] = source
    if "inference" in sections:
        log("c. inference ...")
        out["inference"] = inference_bench(image_size=sizes.infer_image, batch=sizes.infer_batch,
                                           repeats=sizes.infer_repeats, peak=rates, threads=threads, **bf)
    if "eigencam" in sections:
        log("d. EigenCAM ...")
        out["eigencam"] = eigencam_bench(image_size=sizes.cam_image, repeats=sizes.cam_repeats,
                                         e2e_repeats=sizes.cam_e2e_repeats, threads=threads, warmup=sizes.cam_warmup)
        out["eigencam"]["explain"] = explain_bench(params, sizes.explain_images, sizes.explain_repeats,
                                                   min(sizes.cam_warmup, 1), threads, bf16=bf16 and native)
    # the limits again at the same sizes: on a shared VM the machine's speed drifts (seen: the fp32 matmul
    # 104 to 200 GFLOP/s within minutes), which moves every absolute figure but not the interleaved ratios
    log("the matmul limits again ...")
    end = matmul_rates(threads, repeats=sizes.matmul_repeats, ns={p: v["n"] for p, v in rates.items() if "n" in v})
    out["machine"]["matmul_end"] = {p: {k: end[p][k] for k in ("n", "gflop_per_s", "cpu_util")} for p in end}
    out["load_after"] = round(os.getloadavg()[0], 2)
    out["targets"] = check_targets(out)
    return out


def check_targets(r: Mapping[str, Any], native: Optional[bool] = None) -> dict[str, dict[str, Any]]:
    """Each target of issue 18 under a fixed name: measured value, goal, whether it is met (None:
    not measured) and a detail (which variants). The goals that depend on the CPU use `native`
    (bf16 units), by default the result's machine record (else `okdpose.device.native_bf16`)."""
    if native is None:
        native = r.get("machine", {}).get("native_bf16")
        native = okd_device.native_bf16(torch.device("cpu")) if native is None else bool(native)
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, value: Optional[float], goal: str, met: Optional[bool], detail: str = "") -> None:
        out[name] = {"value": value, "goal": goal, "met": met, "detail": detail}

    def at_least(name: str, value: Optional[float], goal: float, detail: str = "", note: Optional[str] = None) -> None:
        if value is None:
            add(name, None, f">= {goal:g}", None, note or "not measured")
        else:
            add(name, value, f">= {goal:g}", value >= goal, detail)

    if "train" in r:
        t, v = r["train"], r["train"]["vs_original"]
        at_least("train step speed-up vs original fp32", v.get("speedup"), 1.7 if native else 1.25,
                 f"ours: {t['best']}", v.get("note"))
    if "inference" in r:
        i = r["inference"]
        for stage, v in i["vs_original"].items():
            at_least(f"inference {stage} vs original eager, batch {i['config']['batch']}", v.get("speedup"),
                     2.0 if native else 1.3, f"ours: {v.get('best')}", v.get("note"))
        for stage, s in i["students"].items():
            rel = s["speedup_over_flop_ratio"]
            add(f"{stage} speed-up over teacher / FLOP ratio", rel, "0.85 .. 1.15", abs(rel - 1) <= 0.15,
                f"{s['speedup']}x / {s['flop_ratio']}")
    if "eigencam" in r and "explain" in r["eigencam"]:
        x = r["eigencam"]["explain"]
        at_least("explain per image vs stock grad-cam", x["speedup"], 10.0, f"{len(x['config']['layers'])} layers")
    if "eigencam" in r:
        e = r["eigencam"]
        diff = max(e["projection"]["max_abs_diff"], e["end_to_end"]["max_abs_diff"])
        add("EigenCAM maps max |ours - stock| (check)", diff, "<= 1e-5", diff <= 1e-5)
    if "loader" in r:
        b = r["loader"]
        at_least("loader per worker / fastest training step", min(b["ratio"], b.get("ratio_augmented", b["ratio"])),
                 3.0, f"{b.get('train_fastest', '-')}; worst of augmentation as configured and on")
    return out


# --------------------------------------------------------------------------- printing

def _table(rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def machine_line(m: Mapping[str, Any]) -> str:
    """'CPU <model>, flags avx2 fma, bf16 emulated' (with bf16 units: the probe `auto` decides by,
    'bf16 native, bf16 conv 0.59x fp32 -> auto fp32'): what every figure of the run depends on."""
    line = (f"CPU {m['cpu_model']}, flags {' '.join(m['cpu_flags']) or 'none reported'}, "
            f"bf16 {'native' if m['native_bf16'] else 'emulated'}")
    probe = m.get("bf16_probe")
    if probe:
        line += (f", bf16 conv {probe['speedup']}x fp32 -> auto "
                 f"{'bf16' if probe['speedup'] >= probe['min_speedup'] else 'fp32'}")
    if m.get("isa_cap"):      # the flags above are what oneDNN may use; the CPU has more
        line += (f"; ISA CAPPED: oneDNN at {m['isa_cap']}, ATen {m['aten_capability']}, MKL "
                 f"{m.get('mkl_instructions', 'unset')} (the CPU's own flags: "
                 f"{' '.join(m['cpu_flags_all'])}): figures of these code paths on this CPU, not of a CPU that has "
                 "only them")
    return line


def slow_bf16_note(r: Mapping[str, Any]) -> Optional[str]:
    """Where the CPU has bf16 units but `auto` measured them slower than the threshold: what the
    goals for CPUs without native bf16 would say (the path `auto` runs here is fp32)."""
    m = r.get("machine", {})
    probe = m.get("bf16_probe")
    if not m.get("native_bf16") or not probe or probe["speedup"] >= probe["min_speedup"]:
        return None
    other = check_targets(r, native=False)
    rows = [f"{k} {v['value']} {v['goal']} {'yes' if v['met'] else 'NO'}" for k, v in other.items()
            if v["goal"] != r["targets"].get(k, {}).get("goal") and v["value"] is not None]
    return (f"this CPU's bf16 units run a convolution at {probe['speedup']}x fp32 (below {probe['min_speedup']}): "
            "`auto` runs fp32 here, and the bf16 goals above ask for a speed its bf16 does not have; against the "
            "goals for CPUs without native bf16: " + ("; ".join(rows) or "the same"))


DRIFT_WARN_PCT = 15.0


def limit_drift(m: Mapping[str, Any]) -> dict[str, float]:
    """Per precision: % change of the measured matmul rate from the start of the run to its end
    (`machine.matmul_end`); {} when not re-measured or the limit was given."""
    start, end = m.get("matmul", {}), m.get("matmul_end") or {}
    return {p: 100.0 * (end[p]["gflop_per_s"] / v["gflop_per_s"] - 1.0) for p, v in start.items()
            if p in end and v.get("source") == "measured" and v.get("gflop_per_s")}


def _limits(m: Mapping[str, Any]) -> list[str]:
    out = []
    for p, v in m["matmul"].items():
        if v.get("source") == "given":
            out.append(f"  {p}: {v['gflop_per_s']} GFLOP/s given (--peak-gflops; measured "
                       f"{v.get('measured_gflop_per_s', '-')})")
        else:
            out.append(f"  {p} torch.mm {v['n']}x{v['n']}: {v['gflop_per_s']} GFLOP/s, {v['gflop_per_cpu_s']} per "
                       f"CPU-second, {v['s_per_call']} s/call, cpu util {v['cpu_util']}"
                       + (f" ({v['label']})" if "label" in v else ""))
    drift = limit_drift(m)
    if drift:
        out.append("  again at the end of the run: " + ", ".join(
            f"{p} {m['matmul_end'][p]['gflop_per_s']} GFLOP/s ({d:+.0f} %)" for p, d in drift.items()))
        worst = max(drift.values(), key=abs)
        if abs(worst) > DRIFT_WARN_PCT:
            out.append(f"  WARNING: the machine's speed changed during the run (matmul {worst:+.0f} %): absolute "
                       "GFLOP/s and %mm are uncertain by that much; the interleaved ratios are not")
    if not m["native_bf16"]:
        out.append("  bf16 is emulated here: its matmul rate is no limit for the bf16 convolutions (oneDNN runs them "
                   "another way), so bf16 %mm may exceed 100; compare bf16 with fp32 by the ratios")
    out.append(f"  nominal, not a limit: {m['cores']} cores x {m['flops_per_cycle']} FLOP/cycle x {m['ghz']} GHz = "
               f"{m['nominal_gflops']} GFLOP/s fp32")
    return out


def format_report(r: Mapping[str, Any], quick: bool) -> str:
    m = r["machine"]
    ran = [k for k in SECTIONS if k in r]
    size = "quick: smaller sizes and repeats, see each section" if quick else "full sizes"
    scope = "" if len(ran) == len(SECTIONS) else f", only {' and '.join(ran) or 'the limits'}"
    lines = [f"okdpose bench ({size}{scope}); "
             f"{machine_line(m)}; torch {m['torch']}, {m['threads']} threads"
             f"{' (auto: 1 on a busy machine)' if m.get('threads_chosen') == 'auto' and m['threads'] == 1 else ''}; "
             f"load avg {m['loadavg_1min']} before, {r.get('load_after')} after, counting this run's threads "
             "(medians of interleaved repeats; ratios are what to compare)"]
    if m["loadavg_1min"] > 0.5 * m["cores"]:      # before the run: afterwards it counts the bench's own threads
        lines.append(f"WARNING: the machine is busy (load average {m['loadavg_1min']} on {m['cores']} cores before "
                     "the run): absolute rates are low and noisy; the interleaved ratios and "
                     "%mm/CPU-s (efficiency per CPU-second this process got) are the meaningful columns")
    lines.append("\n0. measured limits (same run, same threads; %mm = % of the matmul rate of the variant's precision):")
    lines += _limits(m)
    cols = ("variant", "s/step", "img/s", "GFLOP/s", "%mm", "%mm/CPU-s", "cpu util", "n")
    if "train" in r:
        t, c = r["train"], r["train"]["config"]
        lines.append(f"\na. training step: W{c['width']} n_stage {c['n_stage']}, {c['joints']} joints, "
                     f"{c['image_size'][0]}x{c['image_size'][1]} (w x h), batch {c['batch']}, Adam; okd = multi-output, "
                     f"OKDLoss MSE on all heads + KL {c['couples']}; single = multi: false, MSE; original = the original "
                     f"OKD-HRNet model (tests/original_hrnet.py) with our OKDLoss; bf16 = autocast forward, loss fp32 "
                     f"({c['bf16']}); forward GFLOP/image {t['forward_gflop_per_image']}, training = 3x")
        lines.append(_table([cols] + [(n, v["s_per_step"], v["img_per_s"], v["gflop_per_s"], v["pct_peak"],
                                       v["pct_peak_cpu"], v["cpu_util"], v["repeats"])
                                      for n, v in t["variants"].items()]))
        lines.append("  ratios: " + ", ".join(f"{k} {v}" for k, v in t["ratios"].items())
                     + "  (okd_vs_single: time ratio, 1.05 = 5% slower; *_speedup: >1 = faster)")
        o = t["vs_original"]
        lines.append(f"  vs the original's fp32 contiguous step: best ours {o['best']} {o['speedup']}x, "
                     f"okd/fp32/contiguous {o['speedup_same_setting']}x" if "speedup" in o
                     else f"  vs the original: {o.get('note') or 'not run'}")
        for fmt, cc in t.get("conv_share", {}).items():
            lines.append(f"  convolutions in the okd/fp32/{fmt} step (profiled): {cc['conv_s']} of {cc['call_s']} s "
                         f"({100 * cc['conv_share']:.0f}%), at {cc['conv_gflop_per_s']} GFLOP/s = {cc['conv_pct_peak']}% "
                         "of the fp32 matmul: the step's ceiling if everything else were free")
    if "loader" in r:
        b, c = r["loader"], r["loader"]["config"]
        lines.append(f"\nb. data loading ({c['source']}, train split, {c['samples']} samples, batch {c['batch']}, "
                     f"{c['image_size'][0]}x{c['image_size'][1]}, augmentation {'on' if c['augment'] else 'off'}, "
                     f"crop cache {'used' if c['crop_cache'] else 'not used'}) vs the fastest training step of "
                     f"W{c['model']['width']} n_stage {c['model']['n_stage']} multi {c['model']['multi']} "
                     f"(img/s {b['train_variants_img_per_s']}):")
        lines.append(f"  loader {b['loader_img_per_s_per_worker']} img/s per worker, training ({b['train_fastest']}) "
                     f"consumes {b['train_img_per_s']} img/s -> ratio {b['ratio']}")
        if "augmented" in b:
            a = b["augmented"]
            lines.append(f"  with augmentation {a['augment']} (frames decoded and warped): "
                         f"{a['loader_img_per_s_per_worker']} img/s per worker -> ratio {a['ratio']}")
    if "inference" in r:
        i, c = r["inference"], r["inference"]["config"]
        lines.append(f"\nc. inference: W{c['width']} truncated after stage k (one head; original: N_STAGE = k, its k "
                     f"heads), {c['image_size'][0]}x{c['image_size'][1]}, batch {c['batch']}, eval, no_grad; bf16 "
                     f"{c['bf16']} (stages {c['bf16_stages']})")
        icol = ("variant", "params M", "GFLOP/img", "img/s", "GFLOP/s", "%mm", "%mm/CPU-s", "cpu util", "n")
        lines.append(_table([icol] + [(n, v["params_M"], v["gflop_per_image"], v["img_per_s"], v["gflop_per_s"],
                                       v["pct_peak"], v["pct_peak_cpu"], v["cpu_util"], v["repeats"])
                                      for n, v in i["variants"].items()]))
        if i["ratios"]:
            lines.append("  ratios: " + ", ".join(f"{k} {v}" for k, v in i["ratios"].items()))
        ort = {n: v for n, v in i["variants"].items() if n.endswith("/onnxruntime")}
        if ort:
            lines.append(f"  onnxruntime {c.get('onnxruntime')}: the stage's ONNX export (BN folded), "
                         f"{next(iter(ort.values()))['threads']} intra-op threads, what `okdpose predict` runs on a "
                         ".onnx; max |heatmaps - folded model's| " + ", ".join(
                             f"{n.split('/')[0]} {v['max_abs_diff_vs_folded']:.2g}" for n, v in ort.items()))
        elif isinstance(c.get("onnxruntime"), str) and " not " in c["onnxruntime"]:
            lines.append(f"  onnxruntime variants skipped: {c['onnxruntime']}")
        lines.append("  vs the original eager model: " + ", ".join(
            f"{k} {v['best']} {v['speedup']}x" if "speedup" in v else f"{k} {v['note']}"
            for k, v in i["vs_original"].items()))
        if i["students"]:
            lines.append("  students vs the teacher (best variants): " + ", ".join(
                f"{k} {s['speedup']}x for a FLOP ratio {s['flop_ratio']} ({s['speedup_over_flop_ratio']})"
                for k, s in i["students"].items()))
        if "conv_share" in i:
            cc = i["conv_share"]
            lines.append(f"  convolutions in {cc['variant']} (profiled): {cc['conv_s']} of {cc['call_s']} s per batch "
                         f"({100 * cc['conv_share']:.0f}%), at {cc['conv_gflop_per_s']} GFLOP/s = {cc['conv_pct_peak']}% "
                         "of the fp32 matmul: the ceiling if everything else were free")
    if "eigencam" in r:
        e, c = r["eigencam"], r["eigencam"]["config"]
        p, x = e["projection"], e["end_to_end"]
        lines.append("\nd. EigenCAM, okdpose.explain vs stock pytorch_grad_cam.EigenCAM")
        if "explain" in e:
            s, sc = e["explain"], e["explain"]["config"]
            lines.append(f"  the explain stage per image, {len(sc['layers'])} layers of W{sc['width']} n_stage "
                         f"{sc['n_stage']} {sc['image_size'][0]}x{sc['image_size'][1]} ({sc['images']} images): stock "
                         f"(one EigenCAM and forward per layer, full SVD) {s['stock_ms_per_image']} ms, ours (one "
                         f"forward, economy SVD) {s['ours_ms_per_image']} ms -> {s['speedup']}x")
            if "speedup_bf16" in s:
                lines.append(f"  ... ours with explain.precision bf16 (native): {s['ours_bf16_ms_per_image']} ms -> "
                             f"{s['speedup_bf16']}x")
        lines.append(f"  projection ({c['channels']} channels, {c['map_size'][0]}x{c['map_size'][1]} map): stock "
                     f"{p['stock_ms']} ms, ours {p['ours_ms']} ms -> {p['speedup']}x, max |diff| {p['max_abs_diff']:.3g}")
        lines.append(f"  end to end, layer {c['layer']} of W{c['width']} n_stage {c['n_stage']}, {c['images']} image(s) "
                     f"{c['image_size'][0]}x{c['image_size'][1]}: stock {x['stock_ms']} ms, ours {x['ours_ms']} ms -> "
                     f"{x['speedup']}x, max |diff| {x['max_abs_diff']:.3g}")
        if "end_to_end_folded" in e:
            f = e["end_to_end_folded"]
            lines.append(f"  end to end with fold_bn=True (BN folded, channels-last; the folded copy, {f['copy_ms_once']} "
                         f"ms, is made once per model state and reused): {f['ms']} ms -> {f['speedup']}x, "
                         f"max |diff| {f['max_abs_diff']:.3g} (float rounding)")
    goals = "bf16 CPU goals" if m["native_bf16"] else "goals for CPUs without native bf16"
    lines.append(f"\ntargets ({machine_line(m)}; {goals}):")
    lines.append(_table([("target", "value", "goal", "met")]
                        + [(f"{k} ({v['detail']})" if v.get("detail") else k, v["value"], v["goal"],
                            {True: "yes", False: "NO", None: "-"}[v["met"]]) for k, v in r["targets"].items()]))
    note = slow_bf16_note(r)
    if note:
        lines.append("  " + note)
    return "\n".join(lines)


def _check_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before minutes of measuring, what would fail or mislead only at the end: a thread
    count torch rejects or that oversubscribes the cores, a peak that makes every % inf or NaN, a
    --json path that cannot be a file."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.threads is not None and not 1 <= args.threads <= 4 * cores:
        ap.error(f"--threads must be from 1 to {4 * cores} (4 per core of the {cores} here), got {args.threads}")
    if args.peak_gflops is not None and not (math.isfinite(args.peak_gflops) and args.peak_gflops > 0):
        ap.error(f"--peak-gflops must be a positive number of GFLOP/s, got {args.peak_gflops}")
    if args.json is not None:
        if args.json.is_dir():
            ap.error(f"--json {args.json} is a folder; give a file name, e.g. {args.json / 'bench.json'}")
        blocking = next((q for q in args.json.parents if q.exists() and not q.is_dir()), None)
        if blocking is not None:
            ap.error(f"--json {args.json}: {blocking} is a file, not a folder")


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m okdpose.bench") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and repeats, for a quick check")
    ap.add_argument("--no-bf16", action="store_true",
                    help="skip the bf16 training and inference variants (the bf16 matmul is still measured)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's, or 1 when the load average is already >= half "
                         "the cores: OpenMP threads competing with other processes run several times slower)")
    ap.add_argument("--peak-gflops", type=float, default=None,
                    help="override the measured fp32 matmul rate that the fp32 %% columns refer to")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS, help="run only these sections")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    _check_options(ap, args)
    start = time.perf_counter()
    threads = args.threads or auto_threads()
    result = run_all(QUICK if args.quick else FULL, threads, args.peak_gflops, args.only, bf16=not args.no_bf16,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
    result["machine"]["threads_chosen"] = "given" if args.threads else "auto"
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(format_report(result, args.quick))
    print(f"\n({result['seconds']} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
