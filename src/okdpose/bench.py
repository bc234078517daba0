"""CPU benchmarks measured side by side in one run: ratios, not just absolute times.

    okdpose bench [--quick] [--threads N] [--json PATH]     (or python -m okdpose.bench ...)

a. training step (forward + backward + Adam) of the multi-output HRNet with the full OKD loss vs
   the same network single-output with plain MSE, contiguous vs channels-last, with achieved
   GFLOP/s against this CPU's fp32 peak (training FLOPs = 3 x forward FLOPs, `okdpose.model.cost`);
b. data loading per worker (PoseDataset of data/prepared, train=True, the configured augmentation)
   vs the training consumption rate of the configured model (params.yaml);
c. inference per truncated stage count (batch, eval, no_grad) with params, FLOPs and % of peak:
   contiguous, channels-last, and folded (`okdpose.model.fuse.inference_copy`: BN folded into the
   convs, channels-last; what `predict` runs);
d. EigenCAM: `okdpose.explain` vs stock `pytorch_grad_cam.EigenCAM` (projection step and one
   layer end to end, exact and with `fold_bn=True`), with the maximum difference of the maps.

a. and c. also profile one call: the time inside the convolution ops (oneDNN) and the GFLOP/s
they reach, a ceiling the whole step cannot beat however cheap the rest (BN, ReLU, adds, Adam).

Every comparison runs its variants interleaved (round robin, `repeats` rounds after `warmup`)
and reports medians, so slow drifts of a shared machine hit all variants alike. Wall time is
what the ratios use; CPU time of this process is reported too (`cpu_util` = CPU s / wall s, at
most the thread count): on a busy machine the % of peak per CPU-second used (`pct_peak_cpu`)
tells the code's efficiency apart from the share of the cores it got.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from okdpose.losses import OKDLoss
from okdpose.model import MultiOutHRNet, count_params, forward_flops
from okdpose.params import LossParams, Params, SyntheticParams, load_params
from okdpose.train import make_optimizer

FLOPS_PER_CYCLE = 32     # fp32 per core and cycle with two 256-bit FMA units (AVX2: Zen 2/3, Haswell+)
FORMATS = ("contiguous", "channels_last")
INFER_FORMATS = FORMATS + ("folded",)     # folded: okdpose.model.fuse.inference_copy (BN folded, channels-last), what predict runs
AUGMENT_ON = {"flip": True, "rotation": 30.0, "scale": 0.25, "half_body_prob": 0.3}   # the original's


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


def peak_gflops(cores: Optional[int] = None, ghz: Optional[float] = None,
                flops_per_cycle: int = FLOPS_PER_CYCLE) -> float:
    """fp32 peak of `cores` cores: cores x flops/cycle x GHz (NaN when the clock is unknown)."""
    cores = cpu_cores() if cores is None else cores
    ghz = cpu_ghz() if ghz is None else ghz
    return cores * flops_per_cycle * ghz if ghz else math.nan


def auto_threads() -> int:
    """torch's thread count on an idle machine; 1 when other processes already keep half the cores busy."""
    return 1 if os.getloadavg()[0] >= 0.5 * cpu_cores() else torch.get_num_threads()


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


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time each callable `repeats` times after `warmup` untimed calls, round robin over the
    variants so that load changes on a shared machine affect them alike."""
    out = {name: Timing([], []) for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            if r >= warmup:
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


def _rate(flop: float, t: Timing, peak: float, threads: int) -> dict[str, float]:
    """Achieved GFLOP/s for `flop` FLOPs per call; % of the whole CPU's peak, and % of the peak of
    the CPU time this process actually got (efficiency independent of other load)."""
    gflops = flop / t.median / 1e9
    per_core = peak / cpu_cores()
    cpu_s = statistics.median(t.cpu)
    return {"gflop_per_s": round(gflops, 2), "pct_peak": round(100 * gflops / peak, 1),
            "pct_peak_cpu": round(100 * flop / 1e9 / cpu_s / per_core, 1) if cpu_s > 0 else math.nan,
            "cpu_util": round(t.cpu_util, 2)}


def _to_format(x: Any, fmt: str) -> Any:
    memory = torch.channels_last if fmt in ("channels_last", "folded") else torch.contiguous_format
    return x.to(memory_format=memory)


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
    on `flop` convolution FLOPs: the % of peak a call could reach if everything else were free,
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
                    fmt: str = "contiguous", seed: int = 0) -> Callable[[], float]:
    """A closure running one training step (forward, loss, backward, Adam) on a fixed random batch."""
    g = torch.Generator().manual_seed(seed)
    w, h = int(image_size[0]), int(image_size[1])
    j = model.num_joints
    x = _to_format(torch.randn(batch, 3, h, w, generator=g), fmt)
    target = torch.rand(batch, j, h // 4, w // 4, generator=g)
    weight = torch.ones(batch, j)
    _to_format(model, fmt).train()
    opt = make_optimizer(model, "adam", 1e-4)          # what the Trainer uses

    def step() -> float:
        total, _ = loss_fn(model(x), target, weight)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return float(total.detach())

    return step


def train_bench(width: int = 32, n_stage: int = 4, num_joints: int = 12, image_size: Sequence[int] = (192, 256),
                batch: int = 8, repeats: int = 3, warmup: int = 1, formats: Sequence[str] = FORMATS,
                peak: Optional[float] = None, threads: Optional[int] = None) -> dict[str, Any]:
    """OKD multi-output vs single-output training steps, per memory format -> table and ratios."""
    peak = peak_gflops() if peak is None else peak
    steps, flops = {}, {}
    for kind in ("okd", "single"):
        multi = kind == "okd"
        with torch.device("meta"):           # FLOPs counted without computing
            probe = MultiOutHRNet(num_joints, width, n_stage, multi=multi)
        flops[kind] = forward_flops(probe, tuple(image_size))
        loss = (OKDLoss(LossParams(kld_couples=_couples(n_stage)), tuple(range(1, n_stage + 1))) if multi
                else OKDLoss(LossParams(use_kld=False, kld_couples=()), (n_stage,)))
        for fmt in formats:
            torch.manual_seed(0)
            steps[f"{kind}/{fmt}"] = make_train_step(MultiOutHRNet(num_joints, width, n_stage, multi=multi),
                                                     loss, batch, image_size, fmt)
    with num_threads(threads):
        times = interleaved(steps, repeats, warmup)
    variants = {}
    for name, t in times.items():
        flop = 3 * flops[name.split("/")[0]] * batch
        variants[name] = {"s_per_step": round(t.median, 4), "img_per_s": round(batch / t.median, 3),
                          **_rate(flop, t, peak, threads or torch.get_num_threads())}
    ceiling = {fmt: conv_share(steps[f"okd/{fmt}"], 3 * flops["okd"] * batch, peak, threads) for fmt in formats}
    ratios = {}
    for fmt in formats:
        ratios[f"okd_vs_single/{fmt}"] = round(times[f"okd/{fmt}"].median / times[f"single/{fmt}"].median, 3)
    if len(formats) == 2:
        for kind in ("okd", "single"):
            ratios[f"channels_last_speedup/{kind}"] = round(
                times[f"{kind}/contiguous"].median / times[f"{kind}/channels_last"].median, 3)
    return {"config": {"width": width, "n_stage": n_stage, "joints": num_joints, "image_size": list(image_size),
                       "batch": batch, "repeats": repeats, "couples": [list(c) for c in _couples(n_stage)]},
            "forward_gflop_per_image": {k: round(v / 1e9, 3) for k, v in flops.items()},
            "variants": variants, "ratios": ratios, "conv_share": ceiling}


def _couples(n_stage: int) -> tuple[tuple[int, int], ...]:
    return tuple((s, n_stage) for s in range(1, n_stage))


# --------------------------------------------------------------------------- b. data loading

def loader_bench(prepared: str | Path, params: Any, samples: int = 64, repeats: int = 3,
                 threads: Optional[int] = None, train_repeats: int = 3) -> dict[str, Any]:
    """Samples/s of one loader worker (PoseDataset train=True with the configured augmentation,
    batched by a DataLoader without workers) vs the img/s one training step of the configured
    model consumes -> ratio (loader / training)."""
    from torch.utils.data import DataLoader, Subset

    from okdpose.data.dataset import PoseDataset

    import dataclasses

    d, m, t = params.data, params.model, params.train
    spec = params.joint_spec
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

    torch.manual_seed(0)
    model = MultiOutHRNet(spec.num_joints, m.width, m.n_stage, multi=m.multi)
    fmt = "contiguous"            # as okdpose.train.Trainer feeds the model
    step = make_train_step(model, OKDLoss(params.loss, params.output_stages()), batch, d.image_size, fmt)
    with num_threads(threads):
        lts = interleaved({k: load(v) for k, v in loaders.items()}, repeats, warmup=1)
        tt = interleaved({"train": step}, train_repeats, warmup=1)["train"]
    load_rate, train_rate = samples / lts["load"].median, batch / tt.median
    extra = {}
    if "load_augmented" in lts:
        rate = samples / lts["load_augmented"].median
        extra = {"augmented": {"augment": AUGMENT_ON, "loader_img_per_s_per_worker": round(rate, 2),
                               "ratio": round(rate / train_rate, 2)}}
    return {"config": {"prepared": str(prepared), "samples": int(samples), "batch": batch,
                       "image_size": list(d.image_size), "heatmap_size": list(d.heatmap_size),
                       "augment": bool(ds.augment is not None), "crop_cache": bool(ds.use_cache),
                       "model": {"width": m.width, "n_stage": m.n_stage, "multi": m.multi}, "memory_format": fmt},
            "loader_img_per_s_per_worker": round(load_rate, 2), "train_img_per_s": round(train_rate, 2),
            "ratio": round(load_rate / train_rate, 2), **extra}


# --------------------------------------------------------------------------- c. inference

def inference_bench(width: int = 32, stages: Sequence[int] = (2, 3, 4), num_joints: int = 12,
                    image_size: Sequence[int] = (192, 256), batch: int = 8, repeats: int = 3, warmup: int = 1,
                    formats: Sequence[str] = INFER_FORMATS, peak: Optional[float] = None,
                    threads: Optional[int] = None) -> dict[str, Any]:
    """Eval-mode no_grad forward of the model truncated after each stage (one head): plain
    (contiguous), channels-last, and folded (`inference_copy`: BN folded, channels-last; what
    `predict` runs); the convolution ceiling of the folded model of the deepest stage."""
    from okdpose.model.fuse import inference_copy

    peak = peak_gflops() if peak is None else peak
    w, h = int(image_size[0]), int(image_size[1])
    fns, info, stage_of = {}, {}, {}
    for k in stages:
        with torch.device("meta"):           # FLOPs counted without computing
            probe = MultiOutHRNet(num_joints, width, k, multi=False)
        info[k] = {"params_M": round(count_params(probe) / 1e6, 3),
                   "gflop_per_image": round(forward_flops(probe, (w, h)) / 1e9, 3)}
        for fmt in formats:
            torch.manual_seed(0)
            m = MultiOutHRNet(num_joints, width, k, multi=False).eval()
            m = inference_copy(m) if fmt == "folded" else _to_format(m, fmt)
            x = _to_format(torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(k)), fmt)

            def run(m: nn.Module = m, x: torch.Tensor = x) -> None:
                with torch.no_grad():
                    m(x)

            fns[f"stage{k}/{fmt}"] = run
            stage_of[f"stage{k}/{fmt}"] = k
    with num_threads(threads):
        times = interleaved(fns, repeats, warmup)
    rows = {}
    for name, t in times.items():
        k = stage_of[name]
        rows[name] = {**info[k], "img_per_s": round(batch / t.median, 2),
                      **_rate(info[k]["gflop_per_image"] * 1e9 * batch, t, peak, threads or torch.get_num_threads())}
    ratios = {}
    for fmt in formats[1:]:
        if "contiguous" in formats:
            ratios.update({f"{fmt}_speedup/stage{k}": round(times[f"stage{k}/contiguous"].median
                                                            / times[f"stage{k}/{fmt}"].median, 3) for k in stages})
    k = max(stages)
    ceiling = conv_share(fns[f"stage{k}/{formats[-1]}"], info[k]["gflop_per_image"] * 1e9 * batch, peak, threads)
    ceiling["variant"] = f"stage{k}/{formats[-1]}"
    return {"config": {"width": width, "image_size": [w, h], "batch": batch, "repeats": repeats,
                       "stages": list(stages)},
            "variants": rows, "ratios": ratios, "conv_share": ceiling}


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
        et = interleaved({"stock": stock, "ours": ours, "folded": folded}, e2e_repeats or repeats, max(warmup, 1))
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
    """What one run measures (full: the issue's sizes; quick: smaller sizes and fewer repeats)."""

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


FULL = Sizes((192, 256), 8, 3, (192, 256), 8, 3, 128, 3, (192, 256), 5, 3)
QUICK = Sizes((64, 96), 2, 2, (64, 96), 2, 2, 32, 2, (192, 256), 2, 1, cam_warmup=0)


def run_all(sizes: Sizes, threads: Optional[int] = None, peak: Optional[float] = None,
            sections: Sequence[str] = ("train", "loader", "inference", "eigencam"),
            log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    peak = peak_gflops() if peak is None else peak
    out: dict[str, Any] = {"machine": {"cores": cpu_cores(), "ghz": cpu_ghz(), "flops_per_cycle": FLOPS_PER_CYCLE,
                                       "peak_gflops": round(peak, 1), "threads": threads or torch.get_num_threads(),
                                       "loadavg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__}}
    if "train" in sections:
        log("a. training step ...")
        out["train"] = train_bench(image_size=sizes.train_image, batch=sizes.train_batch,
                                   repeats=sizes.train_repeats, peak=peak, threads=threads)
    if "loader" in sections:
        log("b. data loader ...")
        params, prepared = find_prepared()
        with tempfile.TemporaryDirectory(prefix="okdpose-bench-") as tmp:
            source = "data/prepared"
            if prepared is None:
                prepared, source = synthetic_prepared(Path(tmp), params), "synthetic (temp dir)"
            out["loader"] = loader_bench(prepared, params, sizes.loader_samples, sizes.loader_repeats, threads,
                                         train_repeats=sizes.loader_repeats)
            out["loader"]["config"]["source"] = source
    if "inference" in sections:
        log("c. inference ...")
        out["inference"] = inference_bench(image_size=sizes.infer_image, batch=sizes.infer_batch,
                                           repeats=sizes.infer_repeats, peak=peak, threads=threads)
    if "eigencam" in sections:
        log("d. EigenCAM ...")
        out["eigencam"] = eigencam_bench(image_size=sizes.cam_image, repeats=sizes.cam_repeats,
                                         e2e_repeats=sizes.cam_e2e_repeats, threads=threads, warmup=sizes.cam_warmup)
    out["load_after"] = round(os.getloadavg()[0], 2)
    out["targets"] = check_targets(out)
    return out


def check_targets(r: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of the issue: measured value, goal and whether it is met (None: not measured)."""
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, value: Optional[float], goal: str, met: Optional[bool]) -> None:
        out[name] = {"value": value, "goal": goal, "met": met}

    if "train" in r:
        t = r["train"]
        fmt = best_format(t["variants"], "okd")
        ratio = t["ratios"][f"okd_vs_single/{fmt}"]
        add("train OKD step time / single-output", ratio, "<= 1.05", ratio <= 1.05)
        pct = t["variants"][f"okd/{fmt}"]["pct_peak"]
        add("train OKD % of fp32 peak", pct, ">= 60", pct >= 60)
    if "loader" in r:
        ratio = r["loader"]["ratio"]
        add("loader per worker / training consumption", ratio, ">= 3", ratio >= 3)
    if "inference" in r:
        v = r["inference"]["variants"]
        worst = min(v[f"stage{k}/{best_format(v, f'stage{k}')}"]["pct_peak"]
                    for k in r["inference"]["config"]["stages"])
        add("inference % of fp32 peak (worst stage, best format)", worst, ">= 70", worst >= 70)
    if "eigencam" in r:
        e = r["eigencam"]
        add("EigenCAM projection speedup", e["projection"]["speedup"], ">= 20", e["projection"]["speedup"] >= 20)
        add("EigenCAM end-to-end speedup (maps equal stock)", e["end_to_end"]["speedup"], ">= 3",
            e["end_to_end"]["speedup"] >= 3)
        diff = max(e["projection"]["max_abs_diff"], e["end_to_end"]["max_abs_diff"])
        add("EigenCAM maps max |ours - stock|", diff, "<= 1e-5", diff <= 1e-5)
        if "end_to_end_folded" in e:
            f = e["end_to_end_folded"]
            add("EigenCAM end-to-end speedup, fold_bn=True", f["speedup"], ">= 3", f["speedup"] >= 3)
            add("EigenCAM fold_bn=True maps max |diff| (float rounding)", f["max_abs_diff"], "<= 1e-4",
                f["max_abs_diff"] <= 1e-4)
    return out


def best_format(variants: Mapping[str, Mapping[str, float]], prefix: str) -> str:
    """The memory format with the shortest time for the variants named `prefix/<format>`."""
    fmts = [n.split("/")[1] for n in variants if n.split("/")[0] == prefix]
    return max(fmts, key=lambda f: variants[f"{prefix}/{f}"].get("img_per_s", 0.0))


# --------------------------------------------------------------------------- printing

def _table(rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def format_report(r: Mapping[str, Any], quick: bool) -> str:
    m = r["machine"]
    lines = [f"okdpose bench ({'quick: smaller sizes and repeats, see each section' if quick else 'full'}); "
             f"{m['cores']} cores x {m['flops_per_cycle']} FLOP/cycle x {m['ghz']} GHz = {m['peak_gflops']} GFLOP/s "
             f"fp32 peak; torch {m['torch']}, {m['threads']} threads"
             f"{' (auto: 1 on a busy machine)' if m.get('threads_chosen') == 'auto' and m['threads'] == 1 else ''}; load avg {m['loadavg_1min']} before, "
             f"{r.get('load_after')} after, counting this run's threads (medians of interleaved repeats; ratios are what to compare)"]
    if m["loadavg_1min"] > 0.5 * m["cores"]:      # before the run: afterwards it counts the bench's own threads
        lines.append(f"WARNING: the machine is busy (load average {m['loadavg_1min']} on {m['cores']} cores before "
                     "the run): absolute rates are low and noisy; the interleaved ratios and "
                     "%peak/CPU-s (efficiency per CPU-second this process got) are the meaningful columns")
    cols = ("variant", "s/step", "img/s", "GFLOP/s", "%peak", "%peak/CPU-s", "cpu util")
    if "train" in r:
        t, c = r["train"], r["train"]["config"]
        lines.append(f"\na. training step: W{c['width']} n_stage {c['n_stage']}, {c['joints']} joints, "
                     f"{c['image_size'][0]}x{c['image_size'][1]} (w x h), batch {c['batch']}, Adam; okd = multi-output, "
                     f"OKDLoss MSE on all heads + KL {c['couples']}; single = multi: false, MSE; forward "
                     f"GFLOP/image {t['forward_gflop_per_image']}, training = 3x")
        lines.append(_table([cols] + [(n, v["s_per_step"], v["img_per_s"], v["gflop_per_s"], v["pct_peak"],
                                       v["pct_peak_cpu"], v["cpu_util"]) for n, v in t["variants"].items()]))
        lines.append("  ratios: " + ", ".join(f"{k} {v}" for k, v in t["ratios"].items())
                     + "  (okd_vs_single: time ratio, 1.05 = 5% slower; channels_last_speedup: >1 = faster)")
        for fmt, cc in t.get("conv_share", {}).items():
            lines.append(f"  convolutions in the okd/{fmt} step (profiled): {cc['conv_s']} of {cc['call_s']} s "
                         f"({100 * cc['conv_share']:.0f}%), at {cc['conv_gflop_per_s']} GFLOP/s = {cc['conv_pct_peak']}% "
                         "of peak: the step's ceiling if everything else were free")
    if "loader" in r:
        b, c = r["loader"], r["loader"]["config"]
        lines.append(f"\nb. data loading ({c['source']}, train split, {c['samples']} samples, batch {c['batch']}, "
                     f"{c['image_size'][0]}x{c['image_size'][1]}, augmentation {'on' if c['augment'] else 'off'}, "
                     f"crop cache {'used' if c['crop_cache'] else 'not used'}) vs training W{c['model']['width']} "
                     f"n_stage {c['model']['n_stage']} multi {c['model']['multi']} ({c['memory_format']}):")
        lines.append(f"  loader {b['loader_img_per_s_per_worker']} img/s per worker, training consumes "
                     f"{b['train_img_per_s']} img/s -> ratio {b['ratio']}")
        if "augmented" in b:
            a = b["augmented"]
            lines.append(f"  for reference, with augmentation {a['augment']} (frames decoded and warped): "
                         f"{a['loader_img_per_s_per_worker']} img/s per worker -> ratio {a['ratio']}")
    if "inference" in r:
        i, c = r["inference"], r["inference"]["config"]
        lines.append(f"\nc. inference: W{c['width']} truncated after stage k (one head), {c['image_size'][0]}x"
                     f"{c['image_size'][1]}, batch {c['batch']}, eval, no_grad")
        icol = ("variant", "params M", "GFLOP/img", "img/s", "GFLOP/s", "%peak", "%peak/CPU-s", "cpu util")
        lines.append(_table([icol] + [(n, v["params_M"], v["gflop_per_image"], v["img_per_s"], v["gflop_per_s"],
                                       v["pct_peak"], v["pct_peak_cpu"], v["cpu_util"]) for n, v in i["variants"].items()]))
        if i["ratios"]:
            lines.append("  ratios: " + ", ".join(f"{k} {v}" for k, v in i["ratios"].items()))
        if "conv_share" in i:
            cc = i["conv_share"]
            lines.append(f"  convolutions in {cc['variant']} (profiled): {cc['conv_s']} of {cc['call_s']} s per batch "
                         f"({100 * cc['conv_share']:.0f}%), at {cc['conv_gflop_per_s']} GFLOP/s = {cc['conv_pct_peak']}% "
                         "of peak: the ceiling if everything else were free")
    if "eigencam" in r:
        e, c = r["eigencam"], r["eigencam"]["config"]
        p, x = e["projection"], e["end_to_end"]
        lines.append("\nd. EigenCAM, okdpose.explain vs stock pytorch_grad_cam.EigenCAM")
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
    lines.append("\ntargets:")
    lines.append(_table([("target", "value", "goal", "met")]
                        + [(k, v["value"], v["goal"], {True: "yes", False: "NO", None: "-"}[v["met"]])
                           for k, v in r["targets"].items()]))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m okdpose.bench") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and repeats, for a quick check")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's, or 1 when the load average is already >= half "
                         "the cores: OpenMP threads competing with other processes run several times slower)")
    ap.add_argument("--peak-gflops", type=float, default=None, help="override the computed fp32 peak")
    ap.add_argument("--only", nargs="+", choices=("train", "loader", "inference", "eigencam"),
                    default=("train", "loader", "inference", "eigencam"), help="run only these sections")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    threads = args.threads or auto_threads()
    result = run_all(QUICK if args.quick else FULL, threads, args.peak_gflops, args.only,
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
