"""Exporting one stage output of a trained MultiOutHRNet as a standalone deployable model: ONNX and
TorchScript files carrying `DeployMeta`, checked against PyTorch on real crops, and timed.

Legend: N crops, J joints, H x W model input, h x w heatmaps (H/4 x W/4); sizes are (w, h);
stages are 1-based (`MultiOutHRNet.output_stages`).

    sm = stage_model(model, 3)                   # trunk up to stage 3 + its head, BN folded, eval
    write_onnx(sm, "stage3.onnx", meta, opset=17)     # dynamic batch: "input" -> "heatmaps"
    write_torchscript(sm, "stage3.pt", meta)
    read_meta("stage3.onnx")                     # -> DeployMeta (also for .pt)
    compare(reference_hm, onnx_runner("stage3.onnx")(x), crops, tolerance=1e-4)   # or ExportError

Agreement (`compare`): max |export - PyTorch| <= tolerance x max |PyTorch heatmap|, and the decoded
keypoints (`HeatmapCodec.decode`) identical at every point whose decoding such a difference
cannot tip: a point is a near-tie when the runner-up of its argmax, one of its quarter-pixel
refinement neighbour differences or its peak value (<= 0 decodes to (0, 0)) lies within 2 x
max |diff|; near-ties are counted, and above a share of `max_near_ties` (flat heatmaps: an
untrained model) the keypoint check is recorded as "inconclusive" with a warning instead of
"passed" (the heatmaps still had to agree). Outside them the bound makes the points equal, so an
unequal one means that decoding itself went wrong, and fails.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import statistics
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from okdpose.codec import HeatmapCodec, get_max_preds
from okdpose.deploy_meta import META_KEY, DeployMeta, MetaError
from okdpose.files import atomic_path
from okdpose.model import MultiOutHRNet, count_params, forward_flops
from okdpose.model.fuse import fold_batchnorm

log = logging.getLogger(__name__)

META_FILE = META_KEY + ".json"              # TorchScript extra file holding DeployMeta JSON
INPUT_NAME, OUTPUT_NAME = "input", "heatmaps"
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
RUNTIMES = {"onnx": "onnxruntime", "torchscript": "torchscript"}    # format -> runtime timed
TRACE_BATCH = 2                             # example batch of the exports; verification uses others

Runner = Callable[[np.ndarray], np.ndarray]     # (N, 3, H, W) float32 -> (N, J, h, w) float32


class ExportError(RuntimeError):
    """An export that cannot be built from the model, or does not compute what PyTorch computes."""


# --------------------------------------------------------------------------- the standalone model

class StageModel(nn.Module):
    """Stage `stage` of a MultiOutHRNet alone: (N, 3, H, W) -> (N, J, h, w), one tensor."""

    def __init__(self, net: MultiOutHRNet) -> None:
        super().__init__()
        self.net = net
        self.stage, self.num_joints = net.n_stage, net.num_joints

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[0]


def stage_model(model: MultiOutHRNet, stage: int, *, fold: bool = True) -> StageModel:
    """A new CPU model computing only `model`'s output `stage`: MultiOutHRNet(J, width, stage,
    multi=False) (the trunk up to that stage, its head `intermediate_layers.{stage-1}` or
    `final_layer`) with `model`'s weights, eval mode, BN folded unless `fold` is False."""
    if stage not in model.output_stages:
        raise ExportError(f"stage {stage} is not an output of this model (outputs {list(model.output_stages)})")
    net = MultiOutHRNet(model.num_joints, model.width, stage, multi=False)
    src, need = model.state_dict(), net.state_dict()
    missing = [k for k in need if k not in src]
    wrong = [k for k in need if k in src and src[k].shape != need[k].shape]
    if missing or wrong:
        raise ExportError(f"the trained model lacks {len(missing)} and mismatches {len(wrong)} of the {len(need)} "
                          f"tensors stage {stage} needs (e.g. {(missing or wrong)[0]!r}); export from the checkpoint "
                          "of a MultiOutHRNet that has this stage")
    net.load_state_dict({k: src[k] for k in need}, strict=True)
    net.eval().requires_grad_(False)
    if fold:
        fold_batchnorm(net)
    return StageModel(net).eval()


# --------------------------------------------------------------------------- writing and reading files

def _example(image_size: Sequence[int], batch: int = TRACE_BATCH) -> Tensor:
    return torch.zeros(batch, 3, int(image_size[1]), int(image_size[0]))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence, around one export call, what the exporters always say: the legacy ONNX exporter's
    DeprecationWarning (the dynamo exporter needs onnxscript) and tracer warnings about the input
    shape check (traced as a constant; `compare` checks other batch sizes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch 2.14 marks torch.jit trace/save/load as deprecated (FutureWarning); TorchScript is
        # still what the issue asks for and what C++ / mobile runtimes load
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        yield


def onnx_bytes(sm: StageModel, meta: DeployMeta | None, image_size: Sequence[int], opset: int = 17) -> bytes:
    """The ONNX model of `sm` (dynamic batch axis, input "input", output "heatmaps") with
    `meta` as metadata_props["okdpose"] (None: none, e.g. a model only timed), checked by `onnx.checker`."""
    import onnx

    buf = io.BytesIO()
    with _quiet(), torch.no_grad():
        torch.onnx.export(sm, (_example(image_size),), buf, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    if meta is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, meta.to_json()
        proto.doc_string = f"okdpose HRNet-W{meta.width} stage {meta.stage} of {meta.n_stage_trained}: {meta.joints} heatmaps"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def torchscript_bytes(sm: StageModel, meta: DeployMeta | None, image_size: Sequence[int]) -> bytes:
    """`torch.jit.trace` of `sm` (contiguous weights) saved with `meta` as extra file okdpose.json.
    Tracing records this model's one control-flow-free path; `compare` checks it at other batch sizes."""
    buf = io.BytesIO()         # through a file object: equal models give equal bytes (okdpose.files.save_deterministic)
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(sm, _example(image_size), check_trace=False)
        torch.jit.save(traced, buf, _extra_files={META_FILE: meta.to_json()} if meta is not None else None)
    return buf.getvalue()


def write_export(sm: StageModel, path: str | Path, meta: DeployMeta, image_size: Sequence[int],
                 fmt: str, opset: int = 17) -> Path:
    """Write `sm` in `fmt` ("onnx" | "torchscript") to `path`, atomically."""
    data = onnx_bytes(sm, meta, image_size, opset) if fmt == "onnx" else torchscript_bytes(sm, meta, image_size)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_onnx(sm: StageModel, path: str | Path, meta: DeployMeta, opset: int = 17) -> Path:
    return write_export(sm, path, meta, meta.image_size, "onnx", opset)


def write_torchscript(sm: StageModel, path: str | Path, meta: DeployMeta) -> Path:
    return write_export(sm, path, meta, meta.image_size, "torchscript")


def read_meta(path: str | Path) -> DeployMeta:
    """The DeployMeta inside an exported .onnx or .pt file; MetaError naming the file when it has none."""
    path = Path(path)
    if not path.is_file():
        raise MetaError(f"{path}: not found")
    if path.suffix == ".onnx":
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf / IO errors of a file that is not ONNX
            raise MetaError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from None
        props = {p.key: p.value for p in proto.metadata_props}
        if META_KEY not in props:
            raise MetaError(f"{path}: no '{META_KEY}' metadata; this ONNX file was not written by okdpose export "
                            "(dvc repro export, or okdpose export --model models/model.pt --stage k)")
        return DeployMeta.from_json(props[META_KEY], where=str(path))
    if path.suffix == ".pt":
        # the extra file sits in the TorchScript zip as <archive>/extra/okdpose.json: read it
        # without loading the weights
        try:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith(f"/extra/{META_FILE}")]
                text = z.read(names[0]) if names else None
        except (zipfile.BadZipFile, OSError) as e:
            raise MetaError(f"{path}: not a TorchScript file ({e})") from None
        if text is None:
            raise MetaError(f"{path}: no {META_FILE} inside; not a model written by okdpose export (a training "
                            "checkpoint such as models/model.pt needs --stage k)")
        return DeployMeta.from_json(text, where=str(path))
    raise MetaError(f"{path}: expected an exported .onnx or .pt file")


# --------------------------------------------------------------------------- runners

def torch_runner(sm: nn.Module, channels_last: bool = True) -> Runner:
    """`sm` run as `predict` runs a model on the CPU: eval, no_grad, channels-last weights and inputs."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = copy.deepcopy(sm).eval().to(memory_format=fmt)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(x).contiguous(memory_format=fmt)).numpy()
    return run


def torchscript_runner(path: str | Path | bytes) -> Runner:
    with _quiet():
        ts = torch.jit.load(io.BytesIO(path) if isinstance(path, bytes) else str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return ts(torch.from_numpy(x)).numpy()
    return run


def onnx_runner(path: str | Path | bytes, threads: int = 1) -> Runner:
    """An onnxruntime CPU session with `threads` intra-op threads (one inter-op thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
    opts.log_severity_level = 3              # errors only (no graph-optimisation chatter)
    session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts,
                                   providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]
    return run


# --------------------------------------------------------------------------- verification

@dataclass(frozen=True)
class Crops:
    """Model inputs with the boxes they were cut from (what decoding to frame pixels needs)."""

    images: np.ndarray          # (N, 3, H, W) float32, normalised as the data set does
    center: np.ndarray          # (N, 2) frame px
    scale: np.ndarray           # (N, 2) box size / 200
    codec: HeatmapCodec
    source: str                 # where they come from, e.g. "data/prepared test, 32 crops"

    def __len__(self) -> int:
        return len(self.images)


def dataset_crops(dataset: Any, n: int, name: str = "test") -> Crops:
    """`n` crops spread evenly over a PoseDataset (its normalised inputs, boxes and codec)."""
    if len(dataset) == 0:
        raise ExportError(f"the {name} split has no samples to verify the exports on")
    rows = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int))
    samples = [dataset[int(i)] for i in rows]
    return Crops(images=np.stack([s[0].numpy() for s in samples]).astype(np.float32),
                 center=np.stack([np.asarray(s[3]["center"]) for s in samples]).astype(np.float32),
                 scale=np.stack([np.asarray(s[3]["scale"]) for s in samples]).astype(np.float32),
                 codec=dataset.codec, source=f"{getattr(dataset, 'prepared', 'dataset')} {name}, {len(rows)} crops")


def random_crops(n: int, codec: HeatmapCodec, seed: int = 0) -> Crops:
    """`n` standard-normal inputs whose frame is the crop itself (when no prepared data is at hand)."""
    w, h = codec.image_size
    x = np.random.default_rng(seed).standard_normal((n, 3, h, w)).astype(np.float32)
    center = np.tile(np.float32([w / 2, h / 2]), (n, 1))
    return Crops(x, center, np.tile(np.float32([w / 200, h / 200]), (n, 1)), codec, f"{n} random inputs")


def near_ties(hm: np.ndarray, margin: float) -> np.ndarray:
    """(N, J) True where a change of every heatmap value by at most margin / 2 could change the
    decoded point: argmax runner-up, a refinement neighbour difference or the peak value (<= 0
    decodes to the origin) within `margin` (`okdpose.codec.get_max_preds`, `refine_quarter_pixel`)."""
    n, j, h, w = hm.shape
    flat = hm.reshape(n, j, -1)
    top2 = np.partition(flat, -2, axis=-1)[..., -2:] if flat.shape[-1] > 1 else np.concatenate([flat, flat], -1)
    coords, maxvals = get_max_preds(hm)
    px, py = coords[..., 0].astype(np.int64), coords[..., 1].astype(np.int64)
    inside = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)
    pxc, pyc = np.clip(px, 1, w - 2), np.clip(py, 1, h - 2)
    bi, ji = np.meshgrid(np.arange(n), np.arange(j), indexing="ij")
    dx = np.abs(hm[bi, ji, pyc, pxc + 1] - hm[bi, ji, pyc, pxc - 1])
    dy = np.abs(hm[bi, ji, pyc + 1, pxc] - hm[bi, ji, pyc - 1, pxc])
    return ((top2[..., 1] - top2[..., 0] <= margin) | (np.abs(maxvals) <= margin)
            | (inside & ((dx <= margin) | (dy <= margin))))


def compare(ref: np.ndarray, got: np.ndarray, crops: Crops, *, tolerance: float, max_near_ties: float = 0.05,
            what: str = "export") -> dict[str, Any]:
    """Check heatmaps `got` against PyTorch's `ref` (N, J, h, w) on `crops` (see the module
    docstring) -> the numbers; ExportError naming `what` when they disagree."""
    if got.shape != ref.shape:
        raise ExportError(f"{what}: output shape {tuple(got.shape)}, PyTorch's {tuple(ref.shape)}")
    ref, got = ref.astype(np.float32), got.astype(np.float32)
    hm_scale = float(np.abs(ref).max())
    diff = float(np.abs(got - ref).max()) if np.isfinite(got).all() else float("inf")
    rel = diff / hm_scale if hm_scale > 0 else (0.0 if diff == 0 else float("inf"))
    report: dict[str, Any] = {"max_abs_diff": diff, "heatmap_scale": hm_scale, "rel_diff": rel,
                              "tolerance": tolerance, "crops": len(crops)}
    if not rel <= tolerance:
        raise ExportError(f"{what}: max |diff| {diff:.3g} is {rel:.3g} of the heatmap scale {hm_scale:.3g} on "
                          f"{crops.source}, above the tolerance {tolerance:g}: the export does not compute the model")
    xy_ref, _ = crops.codec.decode(ref, crops.center, crops.scale)
    xy_got, _ = crops.codec.decode(got, crops.center, crops.scale)
    ties = near_ties(ref, 2 * diff)
    differ = (xy_ref != xy_got).any(axis=-1)
    mismatch = int((differ & ~ties).sum())
    report.update(points=int(ties.size), near_ties=int(ties.sum()), differing_points=int(differ.sum()),
                  mismatches=mismatch)
    if mismatch:
        raise ExportError(f"{what}: {mismatch} of {ties.size} decoded keypoints differ from PyTorch's where no "
                          f"near-tie explains it (max |diff| {diff:.3g}) on {crops.source}")
    # the heatmaps agree within the tolerance either way; with flat heatmaps (an untrained model)
    # most points are ties and the keypoint check says little: record it rather than refuse a
    # faithful export
    report["keypoint_check"] = "passed" if ties.mean() <= max_near_ties else "inconclusive"
    if report["keypoint_check"] != "passed":
        log.warning("%s: %d of %d points are decoding near-ties (> %g): the heatmaps are too flat for the keypoint "
                    "check to mean much (an untrained model?); the heatmaps agree within the tolerance",
                    what, ties.sum(), ties.size, max_near_ties)
    return report


def heatmaps(run: Runner, crops: Crops, batch: int | None = None) -> np.ndarray:
    """`run` over all crops in batches of `batch` (default: all at once) -> (N, J, h, w)."""
    b = batch or len(crops)
    return np.concatenate([run(crops.images[i:i + b]) for i in range(0, len(crops), b)])


def full_model_heatmaps(model: MultiOutHRNet, stage: int, crops: Crops) -> np.ndarray:
    """Output `stage` of the whole trained model (eval, BN not folded, no_grad) on the crops."""
    was_training = model.training
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            out = model.eval()(torch.from_numpy(crops.images).to(dev))[model.output_stages.index(stage)]
    finally:
        model.train(was_training)
    return out.float().cpu().numpy()


# --------------------------------------------------------------------------- cost

def latency_ms(runners: Mapping[str, Mapping[str, Runner]], images: np.ndarray, batches: Sequence[int], *,
               repeats: int = 10, warmup: int = 2, threads: int = 1) -> dict[str, dict[str, dict[str, float]]]:
    """Median wall ms per call of every runner ({model: {runtime: run}}) at each batch size, all
    timed interleaved (round robin, `repeats` rounds after `warmup`) so that load changes of a
    shared machine hit all alike; torch runs `threads` intra-op threads meanwhile (onnxruntime
    sessions get theirs when made: `onnx_runner(threads=)`). -> {model: {runtime: {"b1": ms}}}."""
    xs = {b: np.ascontiguousarray(np.resize(images, (b, *images.shape[1:])), dtype=np.float32) for b in batches}
    times: dict[tuple[str, str, int], list[float]] = {}
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for r in range(warmup + repeats):
            for b in batches:
                for model, by_runtime in runners.items():
                    for runtime, run in by_runtime.items():
                        t0 = time.perf_counter()
                        run(xs[b])
                        if r >= warmup:
                            times.setdefault((model, runtime, b), []).append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(old)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (model, runtime, b), t in times.items():
        out.setdefault(model, {}).setdefault(runtime, {})[f"b{b}"] = round(statistics.median(t), 3)
    return out


# --------------------------------------------------------------------------- the whole export

@dataclass
class StageExport:
    """One exported stage: its model, files (format -> path) and verification numbers."""

    stage: int
    model: StageModel
    files: dict[str, Path]
    verify: dict[str, dict[str, Any]]


def export_stage(model: MultiOutHRNet, stage: int, out_dir: str | Path, meta: DeployMeta, crops: Crops, *,
                 formats: Sequence[str] = ("onnx", "torchscript"), opset: int = 17, tolerance: float = 1e-4,
                 max_near_ties: float = 0.05, threads: int = 1) -> StageExport:
    """Build stage `stage` of `model` alone, check it equals that output of `model`, write
    out_dir/stage{k}.onnx / .pt and check each file's outputs (onnxruntime, TorchScript) against the
    PyTorch stage model on `crops`, all at once and one crop alone (dynamic batch); ExportError on
    any disagreement."""
    sm = stage_model(model, stage)
    ref = heatmaps(torch_runner(sm, channels_last=False), crops)
    kw = dict(tolerance=tolerance, max_near_ties=max_near_ties)
    verify = {"full_model": compare(full_model_heatmaps(model, stage, crops), ref, crops,
                                    what=f"stage {stage} alone vs the whole model's stage {stage}", **kw)}
    files = {}
    for fmt in formats:
        path = write_export(sm, Path(out_dir) / f"stage{stage}{SUFFIX[fmt]}", meta, crops.codec.image_size, fmt, opset)
        run = onnx_runner(path, threads) if fmt == "onnx" else torchscript_runner(path)
        got = heatmaps(run, crops)
        verify[fmt] = compare(ref, got, crops, what=f"{path} ({RUNTIMES[fmt]})", **kw)
        one = heatmaps(run, crops, batch=1)                       # another batch size than the trace's and the above
        verify[fmt]["batch1_max_abs_diff"] = compare(ref, one, crops, what=f"{path} at batch 1", **kw)["max_abs_diff"]
        files[fmt] = path
        log.info("stage %d %s: %s, max |diff| %.3g (%.2g of the heatmap scale)", stage, fmt, path,
                 verify[fmt]["max_abs_diff"], verify[fmt]["rel_diff"])
    return StageExport(stage, sm, files, verify)


def stage_runners(sm: StageModel, files: Mapping[str, Path | bytes], threads: int) -> dict[str, Runner]:
    """{runtime: runner}: eager PyTorch (as predict runs it) and each exported file (or its bytes)."""
    runners = {"pytorch": torch_runner(sm)}
    for fmt, data in files.items():
        runners[RUNTIMES[fmt]] = onnx_runner(data, threads) if fmt == "onnx" else torchscript_runner(data)
    return runners


def export_report(model: MultiOutHRNet, exports: Sequence[StageExport], crops: Crops, *,
                  batches: Sequence[int] = (1, 8), repeats: int = 10, threads: int = 1, opset: int = 17,
                  formats: Sequence[str] = ("onnx", "torchscript")) -> dict[str, Any]:
    """Cost of each export next to the teacher's (the model's last output as a standalone model,
    exported the same way in memory when not among `exports`), all timed side by side in one run
    -> {"teacher": {stage, params_M, gflops, latency_ms}, "stage{k}": {params_M, gflops,
    flop_ratio, file_MB, latency_ms, speedup, verify}}; speed-up and FLOP ratio are teacher / stage,
    latency_ms is {runtime: {"b{batch}": ms}}."""
    image_size = crops.codec.image_size
    models = {f"stage{e.stage}": e.model for e in exports}
    runners = {f"stage{e.stage}": stage_runners(e.model, e.files, threads) for e in exports}
    teacher = f"stage{model.output_stages[-1]}"
    if teacher not in models:
        sm = models[teacher] = stage_model(model, model.output_stages[-1])
        blobs = {fmt: onnx_bytes(sm, None, image_size, opset) if fmt == "onnx" else torchscript_bytes(sm, None, image_size)
                 for fmt in formats}
        runners[teacher] = stage_runners(sm, blobs, threads)
    lat = latency_ms(runners, crops.images, batches, repeats=repeats, threads=threads)
    flops = {name: forward_flops(m, image_size) for name, m in models.items()}
    out: dict[str, Any] = {"teacher": {"stage": model.output_stages[-1],
                                       "params_M": round(count_params(models[teacher]) / 1e6, 4),
                                       "gflops": round(flops[teacher] / 1e9, 4), "latency_ms": lat[teacher]}}
    for e in exports:
        name = f"stage{e.stage}"
        out[name] = {
            "params_M": round(count_params(e.model) / 1e6, 4), "gflops": round(flops[name] / 1e9, 4),
            "flop_ratio": round(flops[teacher] / flops[name], 3),
            "file_MB": {fmt: round(path.stat().st_size / 2**20, 3) for fmt, path in e.files.items()},
            "latency_ms": lat[name],
            "speedup": {rt: {b: round(lat[teacher][rt][b] / ms, 3) for b, ms in by_b.items()}
                        for rt, by_b in lat[name].items()},
            "verify": e.verify,
        }
    return out


# --------------------------------------------------------------------------- metadata, and the command

def stage_test_ap(eval_metrics: str | Path, stage: int) -> float | None:
    """The stage's test AP from the evaluate stage's metrics file (metrics/eval.json), None when unknown."""
    import json

    try:
        ap = json.loads(Path(eval_metrics).read_text())[f"stage{stage}"]["AP"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(ap) if isinstance(ap, (int, float)) and not isinstance(ap, bool) else None


def source_info(checkpoint: str | Path) -> dict[str, str]:
    """Where an export comes from: the checkpoint file, the git commit (an experiment's baseline
    commit under `dvc exp run`) and the DVC experiment name, when known."""
    import os

    from okdpose.tracking import git_commit, tracking_root

    info = {"checkpoint": str(checkpoint), "commit": git_commit(tracking_root()),
            "dvc_experiment": os.environ.get("DVC_EXP_NAME")}
    return {k: v for k, v in info.items() if v}


def stage_meta(p: Any, model: MultiOutHRNet, stage: int, *, test_ap: float | None = None,
               source: Mapping[str, Any] | None = None) -> DeployMeta:
    """DeployMeta of `model`'s stage `stage` with the data section of params `p` (joints, sizes,
    normalisation, depth range); ExportError when the model and the params' joints differ."""
    try:
        return DeployMeta.for_model(p, model, stage=stage, test_ap=test_ap, source=dict(source or {}))
    except MetaError as e:
        raise ExportError(str(e)) from None


def export_stages(model: MultiOutHRNet, metas: Mapping[int, DeployMeta], out_dir: str | Path, crops: Crops,
                  *, formats: Sequence[str] = ("onnx", "torchscript"), opset: int = 17, tolerance: float = 1e-4,
                  max_near_ties: float = 0.05, threads: int = 1) -> list[StageExport]:
    """`export_stage` for each stage of `metas` ({stage: its metadata}), in that order."""
    return [export_stage(model, k, out_dir, meta, crops, formats=formats, opset=opset, tolerance=tolerance,
                         max_near_ties=max_near_ties, threads=threads) for k, meta in metas.items()]


def latency_lines(report: Mapping[str, Any]) -> list[str]:
    """The latency table of `export_report` as text: one line per model, runtime and batch."""
    lines = [f"{'model':<9} {'runtime':<12} {'batch':>5} {'ms':>9} {'speed-up':>9} {'FLOP ratio':>10}"]
    for name, r in report.items():
        if name == "teacher" and f"stage{r['stage']}" in report:
            continue                             # the teacher is one of the exports: its own rows
        for rt, by_b in r["latency_ms"].items():
            for b, ms in by_b.items():
                up = r.get("speedup", {}).get(rt, {}).get(b)
                ratio = r.get("flop_ratio")
                lines.append(f"{name:<9} {rt:<12} {b[1:]:>5} {ms:>9.2f} {'' if up is None else f'{up:.2f}x':>9} "
                             f"{'' if ratio is None else f'{ratio:.2f}x':>10}")
    return lines


def main(argv: Sequence[str] | None = None, prog: str = "okdpose export") -> int:
    """okdpose export: stage(s) of a trained model as standalone verified ONNX / TorchScript files."""
    from okdpose.data.coco import DataError
    from okdpose.data.dataset import PoseDataset
    from okdpose.model import CheckpointError, load_released
    from okdpose.params import EXPORT_FORMATS, ParamsError, load_params

    ap = argparse.ArgumentParser(prog=prog, description=(
        "Export output stage(s) of a trained model as standalone models (only what the stage needs, BN "
        "folded) with their metadata inside, each checked against PyTorch on test crops."))
    ap.add_argument("--model", type=Path, default=Path("models/model.pt"),
                    help="okdpose checkpoint or an original OKD-HRNet / HRNet file (default: %(default)s)")
    ap.add_argument("--stage", type=int, nargs="+", help="1-based output stage(s) (default: params export.stages)")
    ap.add_argument("--formats", nargs="+", choices=EXPORT_FORMATS, help="default: params export.formats")
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for stage{k}.onnx / stage{k}.pt (default: .)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"),
                    help="the params the model was trained with: joints, sizes, depth range (default: %(default)s)")
    ap.add_argument("--data", type=Path, default=Path("data/prepared"),
                    help="prepared data whose test crops verify the exports (random inputs when absent)")
    ap.add_argument("--eval-metrics", type=Path, default=Path("metrics/eval.json"),
                    help="where the stages' test AP is read for the metadata (default: %(default)s)")
    ap.add_argument("--opset", type=int, help="ONNX opset (default: params export.opset)")
    ap.add_argument("--latency", action="store_true", help="also time them next to the teacher and print the table")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if not args.model.is_file():
            raise FileNotFoundError(f"{args.model}: not found; check --model (dvc repro train-okd writes models/model.pt)")
        model, arch, _ = load_released(args.model)     # ours or an original OKD-HRNet / HRNet file
        print(f"{prog}: {args.model}: {arch.describe()}")
        # the file defines the model; params.yaml gives the data settings (and its training sections are moot)
        overrides = {k: v for k, v in (("export.stages", args.stage), ("export.formats", args.formats),
                                       ("export.opset", args.opset)) if v is not None}
        overrides.update({f"model.{k}": v for k, v in arch.config().items() if k != "num_joints"})
        overrides.update({"model.pretrained": None, "model.checkpoint": None, "loss.use_kld": False,
                          "loss.kld_couples": [], "explain.stages": None})
        p = load_params(args.params, overrides)
        e = p.export
        metas = {k: stage_meta(p, model, k, test_ap=stage_test_ap(args.eval_metrics, k), source=source_info(args.model))
                 for k in e.stages}
        if (args.data / "meta.json").is_file():
            crops = dataset_crops(PoseDataset(args.data, "test", p.joint_spec, p.data.codec), e.verify_samples)
        else:
            print(f"{prog}: no prepared data at {args.data}: verifying on random inputs", file=sys.stderr)
            crops = random_crops(e.verify_samples, p.data.codec)
        exports = export_stages(model, metas, args.out, crops, formats=e.formats, opset=e.opset,
                                tolerance=e.tolerance, max_near_ties=e.max_near_ties, threads=e.threads)
        if args.latency:
            report = export_report(model, exports, crops, batches=e.latency_batches, repeats=e.latency_repeats,
                                   threads=e.threads, opset=e.opset, formats=e.formats)
            print("\n".join(latency_lines(report)))
    except (ParamsError, CheckpointError, MetaError, ExportError, DataError, FileNotFoundError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    for x in exports:
        for fmt, path in x.files.items():
            v = x.verify[fmt]
            print(f"{path}: stage {x.stage}, {fmt}, verified on {crops.source} (max |diff| {v['max_abs_diff']:.2g}, "
                  f"{v['near_ties']} near-ties of {v['points']} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
