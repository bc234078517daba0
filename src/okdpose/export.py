"""Exporting one stage output of a trained MultiOutHRNet as a standalone deployable model: ONNX and
TorchScript files carrying `DeployMeta`, checked against PyTorch on real crops, and timed.

Legend: N crops, J joints, H x W model input, h x w heatmaps (H/4 x W/4); sizes are (w, h);
stages are 1-based (`MultiOutHRNet.output_stages`).

    sm = stage_model(model, 3)                   # trunk up to stage 3 + its head, BN folded, eval
    write_onnx(sm, "stage3.onnx", meta, opset=17)     # dynamic batch: "input" -> "heatmaps"
    write_torchscript(sm, "stage3.pt", meta)
    read_meta("stage3.onnx")                     # -> DeployMeta (also for .pt)
    compare(reference_hm, onnx_runner("stage3.onnx")(x), crops, tolerance=1e-4)   # or ExportError
    low = lowered(sm, "fp16")                    # computes in fp16, float32 in and out (export.precision)

Agreement (`compare`): max |export - PyTorch| <= tolerance x max |PyTorch heatmap|, and the decoded
keypoints (`HeatmapCodec.decode`) identical at every point whose decoding such a difference
cannot tip: a point is a near-tie when the runner-up of its argmax, one of its quarter-pixel
refinement neighbour differences or its peak value (<= 0 decodes to (0, 0)) lies within 2 x
max |diff|; near-ties are counted, and above a share of `max_near_ties` (flat heatmaps: an
untrained model) the keypoint check is recorded as "inconclusive" with a warning instead of
"passed" (the heatmaps still had to agree). Outside them the bound makes the points equal, so an
unequal one means that decoding itself went wrong, and fails.

Precision (`export.precision`, per format `export_precision`): fp32 as always; fp16 / bf16 fold
BN in fp32, then cast the weights and wrap the model so that it casts its float32 input to that
dtype and its heatmaps back to float32 (`lowered`): callers (`okdpose predict`) feed and read
float32 whatever the file computes in, and DeployMeta.precision says which. bf16 is TorchScript
only (ONNX Conv has no bfloat16); onnxruntime's x86 CPU provider runs an fp16 graph in fp32 on
its fp16-rounded weights (no fp16 kernels: same speed, half the file). A lower-precision file
is verified against PyTorch eager running the same lowered model (what the file claims to
compute) with that dtype's measured bound `PRECISION_TOLERANCE`; `export.tolerance` stays the
fp32 bound. What the lower precision costs is recorded next to it, never traded silently:
`precision_shift` of the file's heatmaps and decoded keypoints against the fp32 PyTorch model.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from okdpose.codec import HeatmapCodec, get_max_preds
from okdpose.deploy_meta import META_KEY, PRECISIONS, DeployMeta, MetaError
from okdpose.device import BF16_CPU_FLAGS, cpu_bf16_probe, cpu_flags, fast_bf16, native_bf16, reported_flags
from okdpose.files import atomic_path
from okdpose.model import MultiOutHRNet, count_params, forward_flops
from okdpose.model.fuse import fold_batchnorm

log = logging.getLogger(__name__)

META_FILE = META_KEY + ".json"              # TorchScript extra file holding DeployMeta JSON
INPUT_NAME, OUTPUT_NAME = "input", "heatmaps"
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
RUNTIMES = {"onnx": "onnxruntime", "torchscript": "torchscript"}    # format -> runtime timed
TRACE_BATCH = 2                             # example batch of the exports; verification uses others
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# ONNX Conv has no tensor(bfloat16) up to opset 20 (onnxruntime rejects such a graph)
FORMAT_PRECISIONS = {"onnx": ("fp32", "fp16"), "torchscript": PRECISIONS}
# max |export - PyTorch eager in the same dtype| / max |heatmap| of a lower-precision export
# (export.tolerance is the fp32 bound), and the |export - fp32| above which the export warns.
# Measured on a 2-core AVX2 CPU (torch 2.14.1, onnxruntime 1.32; W8 default trained model on 32
# test crops, W8 kaiming-initialised "trained-like" models on 8, tiny W4 test models on random
# inputs; stages 1-4): onnxruntime fp16 vs torch fp16 <= 4.3e-3 (W8) / 1.2e-2 (W4); TorchScript
# fp16 and bf16 vs eager 0 (the same kernels); vs fp32: fp16 <= 3.8e-3 (W8) / 2.0e-2 (W4), bf16
# <= 2.8e-2 (W8) / 1.0e-1 (W4). Two implementations of one dtype (another CPU's bf16 kernels,
# onnxruntime's fp16 graph) may round apart by up to about twice their distance from fp32:
# fp16 4x over the largest same-dtype difference, bf16 2x over its largest fp32 distance; a
# wrong model is ~1 off. (W8 default-initialised weights give ~1e-8 heatmaps, which fp16
# cannot hold: `_check_range` refuses them.)
PRECISION_TOLERANCE = {"fp16": 5e-2, "bf16": 2e-1}
# CPU flags of units that run fp16 convolutions natively (oneDNN); without them torch emulates fp16
FP16_CPU_FLAGS = ("avx512_fp16", "amx_fp16")

Runner = Callable[[np.ndarray], np.ndarray]     # (N, 3, H, W) float32 -> (N, J, h, w) float32


class ExportError(RuntimeError):
    """An export that cannot be built from the model, or does not compute what PyTorch computes."""


# --------------------------------------------------------------------------- the standalone model

class StageModel(nn.Module):
    """Stage `stage` of a MultiOutHRNet alone: (N, 3, H, W) float32 -> (N, J, h, w) float32, one
    tensor, computed in `precision` (the weights' dtype; `lowered`)."""

    def __init__(self, net: MultiOutHRNet, precision: str = "fp32") -> None:
        super().__init__()
        self.net = net
        self.stage, self.num_joints = net.n_stage, net.num_joints
        self.precision = precision

    def forward(self, x: Tensor) -> Tensor:
        if self.precision == "fp32":         # the graph fp32 exports always had: no casts
            return self.net(x)[0]
        # the casts are part of the exported graph: its interface stays float32
        return self.net(x.to(DTYPES[self.precision]))[0].float()


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


def lowered(sm: StageModel, precision: str) -> StageModel:
    """A copy of `sm` (BN already folded, in fp32) whose weights are cast to `precision` and which
    casts its float32 input to it and its heatmaps back to float32; `sm` itself for fp32."""
    if precision not in DTYPES:
        raise ExportError(f"precision {precision!r}: choose one of {list(DTYPES)}")
    if precision == sm.precision:
        return sm
    if sm.precision != "fp32":
        raise ExportError(f"stage model is {sm.precision} already; lower the fp32 stage model to {precision}")
    return StageModel(copy.deepcopy(sm.net).to(DTYPES[precision]), precision).eval()


def export_precision(asked: str, fmt: str, flags: Iterable[str] | None = None,
                     speedup: float | None = None) -> str:
    """The compute precision of the `fmt` export for export.precision `asked` on this CPU (or on
    one with `flags`, `speedup`): as asked; auto: TorchScript bf16 where the CPU has bf16 units
    that are measurably faster than fp32 (`okdpose.device.fast_bf16`: without the units torch
    emulates bf16, 16-36x slower than fp32 on an AVX2 CPU; with avx512_bf16 but no AMX one Intel
    Xeon ran it at 0.6-0.8x fp32), else fp32; ONNX always fp32: onnxruntime's x86 CPU provider has no fp16
    convolution kernels and runs an fp16 graph as fp32 on fp16-rounded weights (its optimised
    graph has float32 initialisers; W8 latency equal to fp32's within 8 %, AVX2), so fp16 buys
    only the half-size file and costs the rounding: ask for it by name (for that, or for a GPU /
    ARM runtime). ExportError for a precision the format cannot hold (bf16 ONNX)."""
    if fmt not in FORMAT_PRECISIONS:
        raise ExportError(f"format {fmt!r}: choose one of {list(FORMAT_PRECISIONS)}")
    if asked == "auto":
        return "bf16" if fmt == "torchscript" and fast_bf16(torch.device("cpu"), flags, speedup) else "fp32"
    if asked not in FORMAT_PRECISIONS[fmt]:
        if asked in DTYPES:
            raise ExportError(f"export.precision {asked} cannot be written as {fmt} (ONNX Conv has no bfloat16 type "
                              f"up to opset 20): set export.formats: [torchscript], or export.precision: fp16 or fp32")
        raise ExportError(f"export.precision is {asked!r}; choose auto, fp32, fp16 or bf16")
    return asked


def precision_info(asked: str, formats: Sequence[str], flags: Iterable[str] | None = None,
                   speedup: float | None = None) -> dict[str, Any]:
    """What reports/export.json records of the precision: asked, per format as resolved on this
    CPU, the CPU flags that decide `auto` and the speed (`okdpose.device.reported_flags`), and
    where `auto` measured this CPU's bf16 units, that probe (`okdpose.device.cpu_bf16_probe`)."""
    out = {"precision_asked": asked, "precision": {fmt: export_precision(asked, fmt, flags, speedup) for fmt in formats},
           "cpu_flags": " ".join(reported_flags(flags))}
    if asked == "auto" and flags is None and speedup is None and "torchscript" in formats and native_bf16(torch.device("cpu")):
        out["bf16_probe"] = cpu_bf16_probe()
    return out


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

    _check_precision(sm, meta)
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
        if meta.precision != "fp32":         # fp32 files keep the doc string they always had
            proto.doc_string += f" (computed in {meta.precision}, float32 input and output)"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def torchscript_bytes(sm: StageModel, meta: DeployMeta | None, image_size: Sequence[int]) -> bytes:
    """`torch.jit.trace` of `sm` (contiguous weights) saved with `meta` as extra file okdpose.json.
    Tracing records this model's one control-flow-free path; `compare` checks it at other batch sizes."""
    _check_precision(sm, meta)
    buf = io.BytesIO()         # through a file object: equal models give equal bytes (okdpose.files.save_deterministic)
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(sm, _example(image_size), check_trace=False)
        torch.jit.save(traced, buf, _extra_files={META_FILE: meta.to_json()} if meta is not None else None)
    return buf.getvalue()


def _check_precision(sm: StageModel, meta: DeployMeta | None) -> None:
    """A file whose metadata names another precision than its graph computes in would mislead."""
    if meta is not None and meta.precision != sm.precision:
        raise ExportError(f"the metadata says precision {meta.precision} but the model computes in {sm.precision}; "
                          "pass replace(meta, precision=sm.precision)")


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
                    "check to mean much at max |diff| %.2g (an untrained model, or a lower precision's rounding?); "
                    "the heatmaps agree within the tolerance", what, ties.sum(), ties.size, max_near_ties, diff)
    return report


def precision_shift(ref32: np.ndarray, got: np.ndarray, crops: Crops) -> dict[str, float]:
    """How far heatmaps `got` (N, J, h, w) of a lower-precision export lie from the fp32 PyTorch
    model's `ref32`: max |diff| / max |ref32| and the shift of the decoded keypoints, frame px
    (mean and max over the N x J points, and how many moved more than 1 px: a point whose
    heatmap has two near-equal peaks may jump between them, which the max alone would hide)."""
    ref32, got = ref32.astype(np.float32), got.astype(np.float32)
    scale = float(np.abs(ref32).max())
    diff = float(np.abs(got - ref32).max()) if np.isfinite(got).all() else float("inf")
    xy_ref, _ = crops.codec.decode(ref32, crops.center, crops.scale)
    xy_got, _ = crops.codec.decode(got, crops.center, crops.scale)
    shift = np.linalg.norm(np.asarray(xy_got, np.float64) - np.asarray(xy_ref, np.float64), axis=-1)
    return {"max_rel_diff": diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")),
            "shift_px_mean": float(shift.mean()), "shift_px_max": float(shift.max()),
            "points_moved_1px": int((shift > 1.0).sum()), "points": int(shift.size)}


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
    """One exported stage: its fp32 model, files (format -> path), verification numbers and the
    files' compute precision (format -> fp32 | fp16 | bf16)."""

    stage: int
    model: StageModel
    files: dict[str, Path]
    verify: dict[str, dict[str, Any]]
    precision: dict[str, str] = field(default_factory=dict)     # absent format: fp32
    runners: dict[str, Runner] = field(default_factory=dict, repr=False, compare=False)   # format -> the verified file's


def export_stage(model: MultiOutHRNet, stage: int, out_dir: str | Path, meta: DeployMeta, crops: Crops, *,
                 formats: Sequence[str] = ("onnx", "torchscript"), opset: int = 17, tolerance: float = 1e-4,
                 max_near_ties: float = 0.05, threads: int = 1, precision: str = "fp32") -> StageExport:
    """Build stage `stage` of `model` alone, check it equals that output of `model`, write
    out_dir/stage{k}.onnx / .pt in `precision` (export.precision, resolved per format by
    `export_precision`) and check each file's outputs (onnxruntime, TorchScript) against the
    PyTorch stage model in the file's precision on `crops`, all at once and one crop alone
    (dynamic batch); ExportError on any disagreement. Lower precisions are checked with
    `PRECISION_TOLERANCE` and get verify[fmt]["vs_fp32"] (`precision_shift`)."""
    precs = {fmt: export_precision(precision, fmt) for fmt in formats}    # before any work: a bad pair fails fast
    sm = stage_model(model, stage)
    ref = heatmaps(torch_runner(sm, channels_last=False), crops)
    full = full_model_heatmaps(model, stage, crops)
    _check_finite(full, model, stage, meta, crops)
    verify = {"full_model": compare(full, ref, crops, tolerance=tolerance, max_near_ties=max_near_ties,
                                    what=f"stage {stage} alone vs the whole model's stage {stage}")}
    refs = {"fp32": ref}        # PyTorch eager in each precision: what a file of that precision claims to compute
    files, runners = {}, {}
    for fmt, prec in precs.items():
        low = lowered(sm, prec)
        _warn_if_emulated(prec, fmt)
        if prec not in refs:
            refs[prec] = heatmaps(torch_runner(low, channels_last=False), crops)
            _check_range(ref, refs[prec], prec, stage)
        kw = dict(tolerance=tolerance if prec == "fp32" else PRECISION_TOLERANCE[prec], max_near_ties=max_near_ties)
        path = write_export(low, Path(out_dir) / f"stage{stage}{SUFFIX[fmt]}", replace(meta, precision=prec),
                            crops.codec.image_size, fmt, opset)
        run = onnx_runner(path, threads) if fmt == "onnx" else torchscript_runner(path)
        got = heatmaps(run, crops)
        what = f"{path} ({RUNTIMES[fmt]}{'' if prec == 'fp32' else ', ' + prec} vs PyTorch {prec})"
        verify[fmt] = compare(refs[prec], got, crops, what=what, **kw)
        one = heatmaps(run, crops, batch=1)                       # another batch size than the trace's and the above
        verify[fmt]["batch1_max_abs_diff"] = compare(refs[prec], one, crops, what=f"{what} at batch 1",
                                                     **kw)["max_abs_diff"]
        # what the precision costs next to the fp32 model, recorded for every file (fp32: rounding only)
        verify[fmt].update(precision=prec, vs_fp32=precision_shift(ref, got, crops))
        files[fmt], runners[fmt] = path, run
        s32 = verify[fmt]["vs_fp32"]
        if prec != "fp32" and not s32["max_rel_diff"] <= PRECISION_TOLERANCE[prec]:
            log.warning("stage %d %s in %s moves the heatmaps by %.2g of their scale from fp32's, more than %s usually "
                        "does (<= %g): check the keypoints' shift in reports/export.json, or export in fp32", stage,
                        fmt, prec, s32["max_rel_diff"], prec, PRECISION_TOLERANCE[prec])
        log.info("stage %d %s (%s): %s, max |diff| %.3g (%.2g of the heatmap scale); vs fp32 %.2g, keypoints moved "
                 "%.2g px on average, %.2g px at most, %d of %d by > 1 px", stage, fmt, prec, path,
                 verify[fmt]["max_abs_diff"], verify[fmt]["rel_diff"], s32["max_rel_diff"], s32["shift_px_mean"],
                 s32["shift_px_max"], s32["points_moved_1px"], s32["points"])
    return StageExport(stage, sm, files, verify, precs, runners)


def _check_finite(full: np.ndarray, model: MultiOutHRNet, stage: int, meta: DeployMeta, crops: Crops) -> None:
    """ExportError naming the checkpoint when the trained model's own PyTorch heatmaps hold NaN /
    inf: no export can match them, and the fault is the checkpoint's, not the export's."""
    bad = ~np.isfinite(full)
    if not bad.any():
        return
    ckpt = meta.source.get("checkpoint", "the trained model")
    tensors = [n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    why = (f"{len(tensors)} of its tensors hold NaN / inf, e.g. {tensors[0]!r}" if tensors
           else "NaN / inf weights, or activations overflowing float32?")
    raise ExportError(f"{ckpt}: the checkpoint's outputs are not finite: stage {stage} of the PyTorch model gives "
                      f"{int(bad.sum())} NaN / inf of {bad.size} heatmap values on {crops.source} ({why}); export "
                      "from a checkpoint with finite weights (an earlier one, or retrain)")


def _check_range(ref32: np.ndarray, low: np.ndarray, prec: str, stage: int) -> None:
    """ExportError when PyTorch's own `prec` heatmaps collapsed (inf / NaN, or all zero where
    fp32's are not): the dtype's range (fp16: normal 6e-5 .. 65504) does not hold the model's
    activations, and no file of it can be right (an untrained model's ~1e-8 heatmaps underflow)."""
    finite = bool(np.isfinite(low).all())
    if finite and (np.abs(low).max() > 0 or np.abs(ref32).max() == 0):
        return
    what = "overflow (inf / NaN)" if not finite else "underflow to zero"
    other = "bf16 (TorchScript only: fp32's range) or fp32" if prec == "fp16" else "fp32"
    raise ExportError(f"stage {stage} in {prec}: PyTorch's own {prec} heatmaps {what} while fp32's peak |heatmap| is "
                      f"{np.abs(ref32).max():.3g}: {prec}'s range does not hold this model's activations; set "
                      f"export.precision: {other}")


def _warn_if_emulated(prec: str, fmt: str) -> None:
    """Say so when this CPU emulates the precision asked (the file is right, but slow here)."""
    cpu = torch.device("cpu")
    if prec == "bf16" and not native_bf16(cpu):
        log.warning("export.precision bf16: this CPU has no bf16 units (%s): torch emulates bf16, 16-36x slower "
                    "than fp32 (measured, AVX2); the %s file is verified, and meant for CPUs with them or GPUs",
                    "/".join(BF16_CPU_FLAGS), fmt)
    if prec == "fp16" and fmt == "torchscript" and not set(FP16_CPU_FLAGS) & cpu_flags():
        log.warning("export.precision fp16: this CPU has no fp16 units (%s): torch emulates fp16 convolutions, "
                    "16-36x slower than fp32 (measured, AVX2); the TorchScript file is verified, and meant for GPUs "
                    "or CPUs with them", "/".join(FP16_CPU_FLAGS))


def stage_runners(sm: StageModel, files: Mapping[str, Path | bytes], threads: int,
                  loaded: Mapping[str, Runner] | None = None) -> dict[str, Runner]:
    """{runtime: runner}: eager PyTorch (as predict runs it) and each exported file (or its bytes);
    `loaded`: {format: runner} of files already loaded (the verification's), used as they are."""
    runners = {"pytorch": torch_runner(sm)}
    for fmt, data in files.items():
        run = (loaded or {}).get(fmt)
        runners[RUNTIMES[fmt]] = run or (onnx_runner(data, threads) if fmt == "onnx" else torchscript_runner(data))
    return runners


def export_bytes(sm: StageModel, fmt: str, image_size: Sequence[int], opset: int = 17) -> bytes:
    """`sm` in `fmt` without metadata, in memory (a model only timed)."""
    return onnx_bytes(sm, None, image_size, opset) if fmt == "onnx" else torchscript_bytes(sm, None, image_size)


def runtime_precisions(precision: Mapping[str, str]) -> dict[str, str]:
    """{runtime: its precision} of the runners `export_report` times for files of `precision`
    ({format: precision}): eager PyTorch fp32, each file, a lower-precision file's fp32 twin."""
    out = {"pytorch": "fp32"}
    for fmt, prec in precision.items():
        out[RUNTIMES[fmt]] = prec
        if prec != "fp32":
            out[f"{RUNTIMES[fmt]}_fp32"] = "fp32"
    return out


def export_report(model: MultiOutHRNet, exports: Sequence[StageExport], crops: Crops, *,
                  batches: Sequence[int] = (1, 8), repeats: int = 10, threads: int = 1, opset: int = 17,
                  formats: Sequence[str] = ("onnx", "torchscript")) -> dict[str, Any]:
    """Cost of each export next to the teacher's (the model's last output as a standalone model,
    exported the same way, in the exports' precision, in memory when not among `exports`), all
    timed side by side in one run -> {"teacher": {stage, params_M, gflops, precision,
    latency_ms}, "stage{k}": {params_M, gflops, flop_ratio, file_MB, precision, latency_ms,
    speedup, verify}}; speed-up and FLOP ratio are teacher / stage, latency_ms is {runtime:
    {"b{batch}": ms}}, precision {runtime: fp32 | fp16 | bf16} (a lower-precision file's fp32
    counterpart is timed too, as "{runtime}_fp32")."""
    image_size = crops.codec.image_size
    models = {f"stage{e.stage}": e.model for e in exports}
    precs = {f"stage{e.stage}": {fmt: e.precision.get(fmt, "fp32") for fmt in e.files} for e in exports}
    runners = {f"stage{e.stage}": stage_runners(e.model, e.files, threads, e.runners) for e in exports}
    teacher = f"stage{model.output_stages[-1]}"
    if teacher not in models:
        sm = models[teacher] = stage_model(model, model.output_stages[-1])
        precs[teacher] = {fmt: exports[0].precision.get(fmt, "fp32") if exports else "fp32" for fmt in formats}
        runners[teacher] = stage_runners(sm, {fmt: export_bytes(lowered(sm, p), fmt, image_size, opset)
                                              for fmt, p in precs[teacher].items()}, threads)
    for name, by_fmt in precs.items():         # a lower precision is timed next to its fp32 counterpart
        for fmt, p in by_fmt.items():
            if p != "fp32":
                fp32 = stage_runners(models[name], {fmt: export_bytes(models[name], fmt, image_size, opset)}, threads)
                runners[name][f"{RUNTIMES[fmt]}_fp32"] = fp32[RUNTIMES[fmt]]
    lat = latency_ms(runners, crops.images, batches, repeats=repeats, threads=threads)
    flops = {name: forward_flops(m, image_size) for name, m in models.items()}
    out: dict[str, Any] = {"teacher": {"stage": model.output_stages[-1],
                                       "params_M": round(count_params(models[teacher]) / 1e6, 4),
                                       "gflops": round(flops[teacher] / 1e9, 4),
                                       "precision": runtime_precisions(precs[teacher]),
                                       "latency_ms": lat[teacher]}}
    for e in exports:
        name = f"stage{e.stage}"
        out[name] = {
            "params_M": round(count_params(e.model) / 1e6, 4), "gflops": round(flops[name] / 1e9, 4),
            "flop_ratio": round(flops[teacher] / flops[name], 3),
            "file_MB": {fmt: round(path.stat().st_size / 2**20, 3) for fmt, path in e.files.items()},
            "precision": runtime_precisions(precs[name]),
            "latency_ms": lat[name],
            "speedup": {rt: {b: round(lat[teacher][rt][b] / ms, 3) for b, ms in by_b.items() if rt in lat[teacher]}
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
                  max_near_ties: float = 0.05, threads: int = 1, precision: str = "fp32") -> list[StageExport]:
    """`export_stage` for each stage of `metas` ({stage: its metadata}), in that order."""
    return [export_stage(model, k, out_dir, meta, crops, formats=formats, opset=opset, tolerance=tolerance,
                         max_near_ties=max_near_ties, threads=threads, precision=precision)
            for k, meta in metas.items()]


def latency_lines(report: Mapping[str, Any]) -> list[str]:
    """The latency table of `export_report` as text: one line per model, runtime (and its
    precision) and batch."""
    lines = [f"{'model':<9} {'runtime':<16} {'precision':<9} {'batch':>5} {'ms':>9} {'speed-up':>9} {'FLOP ratio':>10}"]
    for name, r in report.items():
        if name == "teacher" and f"stage{r['stage']}" in report:
            continue                             # the teacher is one of the exports: its own rows
        for rt, by_b in r["latency_ms"].items():
            for b, ms in by_b.items():
                up = r.get("speedup", {}).get(rt, {}).get(b)
                ratio = r.get("flop_ratio")
                prec = r.get("precision", {}).get(rt, "fp32")
                lines.append(f"{name:<9} {rt:<16} {prec:<9} {b[1:]:>5} {ms:>9.2f} "
                             f"{'' if up is None else f'{up:.2f}x':>9} {'' if ratio is None else f'{ratio:.2f}x':>10}")
    return lines


@contextlib.contextmanager
def staged_out(out: str | Path) -> Iterator[Path]:
    """A new empty folder to export into, on `out`'s file system (inside `out`, or inside its
    nearest existing parent while `out` is still to be made), checked before any work: ExportError
    naming --out when `out` is a file, lies under one or cannot be written. When the block
    succeeds its files move into `out` (made if missing), all or none: a failed run leaves `out`
    as it was (earlier files of the same names included) and the folder is removed either way.
    (`okdpose.files.atomic_dir` replaces a whole folder: --out may hold other files, e.g. `.`.)"""
    out = Path(out)
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        what = "is a file" if base == out else f"lies under {base}, a file"
        raise ExportError(f"--out {out}: {what}, not a folder; pass a folder for the stage{{k}}.onnx / .pt files "
                          "(made when missing)")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".okdpose-export.", suffix=".tmp", dir=base))
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write in {base} ({e.strerror or e}); pass a folder you can write "
                          "to") from None
    try:
        yield tmp
        _move_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into(tmp: Path, out: Path) -> None:
    """Move every file of `tmp` into `out` (made if missing); on any failure undo the moves done
    (earlier files back in place, folders made removed) and raise ExportError naming --out."""
    names = sorted(p.name for p in tmp.iterdir())
    clash = [out / n for n in names if (out / n).is_dir() and not (out / n).is_symlink()]
    if clash:
        raise ExportError(f"--out {out}: {clash[0]} is a folder; move it away or pass another --out")
    made = [d for d in (out, *out.parents) if not d.exists()]          # deepest first
    moved: list[tuple[Path, Path | None]] = []                         # (target, its earlier file kept in tmp)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            dst, old = out / name, None
            if dst.exists() or dst.is_symlink():
                old = tmp / f".old.{name}"
                os.replace(dst, old)
            moved.append((dst, old))
            os.replace(tmp / name, dst)
    except OSError as e:
        for dst, old in reversed(moved):
            with contextlib.suppress(OSError):
                os.replace(old, dst) if old is not None else dst.unlink(missing_ok=True)
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise ExportError(f"--out {out}: could not move the verified files into it ({e}); it was left as it "
                          "was: pass a folder you can write to") from None


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
    ap.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"),
                    help="compute dtype of the files, float32 in and out; bf16: TorchScript only (default: params "
                         "export.precision)")
    ap.add_argument("--latency", action="store_true", help="also time them next to the teacher and print the table")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tmp = None
    try:
        with staged_out(args.out) as tmp:        # --out checked first; its files appear only if all are verified
            if not args.model.is_file():
                raise FileNotFoundError(f"{args.model}: not found; check --model (dvc repro train-okd writes "
                                        "models/model.pt)")
            model, arch, _ = load_released(args.model)     # ours or an original OKD-HRNet / HRNet file
            print(f"{prog}: {args.model}: {arch.describe()}")
            # the file defines the model; params.yaml gives the data settings (its training sections are moot)
            overrides = {k: v for k, v in (("export.stages", args.stage), ("export.formats", args.formats),
                                           ("export.opset", args.opset), ("export.precision", args.precision))
                         if v is not None}
            overrides.update({f"model.{k}": v for k, v in arch.config().items() if k != "num_joints"})
            overrides.update({"model.pretrained": None, "model.checkpoint": None, "loss.use_kld": False,
                              "loss.kld_couples": [], "explain.stages": None})
            if args.params.is_dir():
                raise ExportError(f"--params {args.params}: is a folder, not a params file; pass the params.yaml "
                                  "the model was trained with")
            try:
                p = load_params(args.params, overrides)
            except OSError as err:
                raise ExportError(f"--params {args.params}: cannot read it ({err.strerror or err}); pass the "
                                  "params.yaml the model was trained with") from None
            e = p.export
            metas = {k: stage_meta(p, model, k, test_ap=stage_test_ap(args.eval_metrics, k),
                                   source=source_info(args.model)) for k in e.stages}
            if (args.data / "meta.json").is_file():
                crops = dataset_crops(PoseDataset(args.data, "test", p.joint_spec, p.data.codec), e.verify_samples)
            else:
                print(f"{prog}: no prepared data at {args.data}: verifying on random inputs", file=sys.stderr)
                crops = random_crops(e.verify_samples, p.data.codec)
            exports = export_stages(model, metas, tmp, crops, formats=e.formats, opset=e.opset,
                                    tolerance=e.tolerance, max_near_ties=e.max_near_ties, threads=e.threads,
                                    precision=e.precision)
            if args.latency:
                report = export_report(model, exports, crops, batches=e.latency_batches,
                                       repeats=e.latency_repeats, threads=e.threads, opset=e.opset,
                                       formats=e.formats)
                print("\n".join(latency_lines(report)))
    except (ParamsError, CheckpointError, MetaError, ExportError, DataError, OSError) as err:
        # a verification error names the file it wrote in the (removed) staging folder: name --out's
        print(f"{prog}: {str(err).replace(str(tmp), str(args.out)) if tmp else err}", file=sys.stderr)
        return 2
    for x in exports:                          # where the files are now
        x.files = {fmt: args.out / path.name for fmt, path in x.files.items()}
    for x in exports:
        for fmt, path in x.files.items():
            v = x.verify[fmt]
            s32 = v["vs_fp32"]
            low = "" if v["precision"] == "fp32" else (
                f"; vs fp32: {s32['max_rel_diff']:.2g} of the heatmap scale, keypoints moved "
                f"{s32['shift_px_mean']:.2g} px on average, {s32['shift_px_max']:.2g} px at most, "
                f"{s32['points_moved_1px']} by > 1 px")
            print(f"{path}: stage {x.stage}, {fmt}, {v['precision']}, verified on {crops.source} (max |diff| "
                  f"{v['max_abs_diff']:.2g}, {v['near_ties']} near-ties of {v['points']} points{low})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
