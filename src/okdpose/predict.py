"""`okdpose predict`: keypoints of one infant on new recordings (an image, a folder of frames or a
video) with any model `okdpose.runner` loads, as COCO results, a tidy CSV and optional overlays.

Legend: N predictions (one per box kept), J joints; points (x, y) frame pixels; sizes (w, h).

    runner = load_runner("models/export/stage3.onnx")
    source = open_source("recording.mp4", depth_range=runner.meta.depth_range, on_error="skip")
    res = predict_frames(runner, source, track=True, smooth=OneEuroParams())
    res.coco_results(), res.csv_rows(), res.summary()

    okdpose predict recording.mp4 --model models/export/stage3.onnx --track --smooth --video-out

Boxes, one of:
- the whole frame (default), or a fixed `--region X Y W H` (e.g. the mattress of a fixed camera),
  searched by refinement (`--refine N`, default 2; `RefineParams`): predict on the box, take the
  box of all the predicted joints enlarged by `margin` (0.2) on every side, predict on it,
  and repeat until that box overlaps the one it came from by IoU >= `min_iou` (converged) or N
  re-predictions were made; the most confident prediction (mean joint maximum; on a tie the
  earlier) is kept, and searches that hit the cap are counted in `summary.json`. A frame
  costs 1 to N + 1 model calls (`summary.json`: model_calls). The model was trained on crops of the
  infant's box, and an infant in a whole 640x480 frame padded into the input is too small for it:
  one crop of the whole frame is `--refine 0`. Frames are searched in batches (iteration by
  iteration); every box is padded and widened to the model's aspect like a detection box
  (`geometry.box_to_center_scale`);
- `--track`: the box of each frame is the bounding box of the previous frame's keypoints scoring
  >= `TrackParams.min_score`, enlarged by `margin` (0.3, room to move) of its size on every side,
  and it seeds the same refinement (a still infant: 2 model calls a frame). The first frame, a
  frame after a skipped one, and every frame whose predecessor's mean joint confidence is below
  `min_confidence` (or had fewer than `min_joints` confident joints) start from the whole frame
  (or `--region`); so does a tracked frame whose search ends below `min_confidence` (the infant
  was lost in this frame; the more confident of the two searches is kept). Each fallback is
  logged (INFO). With `--refine 0` a tracked frame is one crop of the tracked box, and a lost
  infant gets one crop of the whole frame (or region) from the next frame on. For one infant and
  a fixed camera; frames run one at a time (each box needs the previous result);
- `--boxes dets.json`: a COCO detection-results file ([{image_id, category_id, bbox [x, y, w, h],
  score}, ...]), used as given (no refinement). A frame's image_id is the number in its file name
  when the name is a number (the BabyPose layout `000000010001.png` -> 10001), otherwise its
  index (0-based: position of the file in natural order, or the video frame number). The same
  image_id is written to the results. Boxes of other categories are ignored; a frame without a
  box gets no prediction.

Crops, normalisation and decoding are evaluate's: `geometry.crop_image` of (center, scale), the
PoseDataset normalisation with the model's mean/std, `HeatmapCodec.decode`. Each prediction's
score is evaluate's too (`metrics.rescore_and_nms`: box score x mean of the joint maxima above
`evaluate.in_vis_thre`, then OKS-NMS among a frame's boxes).

Outputs in `--out DIR` (written to a temporary folder and renamed into place when complete):
`keypoints.json` (COCO results), `keypoints.csv` (one row per frame and joint: frame, name,
joint, x, y, score; `exit_stage` with `--exit-threshold`; `instance` with `--boxes`; `x_raw`,
`y_raw` with `--smooth`), `summary.json` (model, source, frames read / skipped and why, box
modes, speed), `overlay/*.png` with `--overlay`, `overlay.mp4` (mp4v) with `--video-out`.
`--smooth` runs the One Euro filter (`okdpose.smoothing`) on each frame's best prediction, as
the frames arrive (it is causal), so the overlays show the smoothed skeleton.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from okdpose.codec import HeatmapCodec
from okdpose.deploy_meta import DeployMeta, MetaError
from okdpose.frames import ON_ERROR, Frame, FrameError, FrameSource, open_source
from okdpose.geometry import box_to_center_scale, crop_image, scale_area
from okdpose.metrics import rescore_and_nms
from okdpose.params import EvaluateParams
from okdpose.runner import ModelError, Runner, load_runner
from okdpose.smoothing import OneEuroFilter, OneEuroParams

IN_VIS_THRE = EvaluateParams().in_vis_thre      # the evaluate stage's rescoring and NMS defaults
OKS_THRE = EvaluateParams().oks_thre
BOX_MODES = ("frame", "track", "detections")
MAX_PX = 1e6                # |box coordinates| above this are no frame's pixels (and overflow float32 crops)
FPS_RANGE = (0.01, 1000.0)  # --fps: what smoothing times and mp4v (timebase <= 1/65535) take

log = logging.getLogger(__name__)


class PredictError(ValueError):
    """Input `predict` cannot use (detections file, options); the message names it and the fix."""


# --------------------------------------------------------------------------- boxes

@dataclass(frozen=True)
class TrackParams:
    # defaults measured with the default run's W8 model on the synthetic test split (118 frames,
    # README "Predicting on new recordings"); a better-trained model is more confident
    min_confidence: float = 0.2   # mean joint maximum of the previous frame below this: whole frame / region
    min_score: float = 0.2        # joints at least this confident define the box
    min_joints: int = 4           # fewer confident joints: whole frame / region
    margin: float = 0.3           # box enlarged by this fraction of its size on every side (the head is no
                                  # joint; a moving infant must stay inside; on val 0.3 tracked better than 0.2)
    min_size: float = 32.0        # px: smallest box side

    def validate(self) -> None:
        # NaN passes every < test: it would turn the fallback off without a word
        if not 0.0 <= self.min_confidence <= 1.0:
            raise PredictError(f"--track-min-confidence must be in [0, 1] (a mean joint confidence), got "
                               f"{self.min_confidence}")
        if not (0.0 <= self.min_score <= 1.0 and self.min_joints >= 0 and 0.0 <= self.margin <= MAX_PX
                and 0.0 < self.min_size <= MAX_PX):
            raise PredictError(f"track parameters out of range: {self}")


@dataclass(frozen=True)
class RefineParams:
    """The box search without a detector (module docstring); iterations 0: one crop, no search."""

    # defaults chosen on the val split with the default run's W8 model (README "Predicting on new
    # recordings"): 2, 3 and 4 iterations were within 0.2 px of each other (1: ~9 px worse)
    iterations: int = 2           # re-predictions at most: 1 + iterations model calls per frame
    min_iou: float = 0.9          # the new box overlaps the previous one this much: converged
    margin: float = 0.2           # box of all the joints enlarged by this on every side (val: 0.15-0.25
                                  # equally good, 0.3 worse: the crop is padded 1.25x on top)
    min_size: float = 32.0        # px: smallest box side

    def validate(self, where: str = "--refine") -> None:
        if self.iterations < 0:
            raise PredictError(f"{where} must be >= 0 (0: one crop per frame, no search), got {self.iterations}")
        if not 0.0 < self.min_iou <= 1.0:
            raise PredictError(f"{where}: min_iou must be in (0, 1], got {self.min_iou}")


def frame_box(image: np.ndarray, region: Optional[Sequence[float]] = None) -> np.ndarray:
    """(x, y, w, h) of the whole frame, or `region` when given."""
    if region is not None:
        return np.asarray(region, np.float64).reshape(4)
    return np.array([0.0, 0.0, image.shape[1], image.shape[0]])


def keypoint_box(keypoints: np.ndarray, params: TrackParams) -> Optional[np.ndarray]:
    """(x, y, w, h) around the confident joints of (J, 3) keypoints, or None when tracking is lost."""
    kp = np.asarray(keypoints, np.float64)
    if kp[:, 2].mean() < params.min_confidence:
        return None
    xy = kp[kp[:, 2] >= params.min_score, :2]
    if len(xy) < params.min_joints:
        return None
    return joints_box(xy, params.margin, params.min_size)


def joints_box(xy: np.ndarray, margin: float, min_size: float) -> np.ndarray:
    """(x, y, w, h) around (J, 2) points, enlarged by `margin` of its size on every side."""
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    size = np.maximum((hi - lo) * (1 + 2 * margin), min_size)
    center = (lo + hi) / 2
    return np.concatenate([center - size / 2, size])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (n, 4) xywh boxes `a` and `b`, row by row -> (n,)."""
    lo, hi = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, :2] + a[:, 2:], b[:, :2] + b[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    return inter / (np.prod(a[:, 2:], axis=1) + np.prod(b[:, 2:], axis=1) - inter)


@dataclass
class Search:
    """The outcome of `refine_boxes` for n frames: the most confident prediction of each."""

    keypoints: np.ndarray      # (n, J, 3) [x, y, maxval]
    boxes: np.ndarray          # (n, 4) xywh the kept prediction came from
    exit_stage: np.ndarray     # (n,)
    calls: np.ndarray          # (n,) model calls made
    converged: np.ndarray      # (n,) bool: the last box was stable within the iterations

    @property
    def confidence(self) -> np.ndarray:
        return self.keypoints[..., 2].mean(axis=-1)


PredictBoxes = Callable[[Sequence[np.ndarray], np.ndarray], tuple[np.ndarray, np.ndarray]]


def refine_boxes(predict: PredictBoxes, images: Sequence[np.ndarray], boxes: np.ndarray,
                 params: RefineParams) -> Search:
    """Search each image's box from its seed in (n, 4) `boxes` (module docstring).

    predict(images, boxes (m, 4)) -> (keypoints (m, J, 3) frame px, exit_stage (m,)); it is called
    once per iteration with the frames not yet converged. The box of a prediction is the box of
    all its joints (`joints_box` with `params.margin`, `params.min_size`).
    """
    box = np.array(boxes, np.float64).reshape(-1, 4)
    kp, ex = predict(images, box)
    out = Search(kp.copy(), box.copy(), ex.copy(), np.ones(len(box), np.int64), np.zeros(len(box), bool))
    active = np.arange(len(box))
    for it in range(params.iterations + 1):
        new = np.stack([joints_box(kp[i, :, :2], params.margin, params.min_size) for i in active]).reshape(-1, 4)
        stable = box_iou(new, box[active]) >= params.min_iou
        out.converged[active[stable]] = True
        active, new = active[~stable], new[~stable]
        if not len(active) or it == params.iterations:     # the last pass only checks convergence
            break
        box[active] = new
        kp[active], ex[active] = predict([images[i] for i in active], new)
        out.calls[active] += 1
        better = active[kp[active, :, 2].mean(axis=-1) > out.confidence[active]]
        out.keypoints[better], out.boxes[better], out.exit_stage[better] = kp[better], box[better], ex[better]
    return out


def frame_image_id(source: FrameSource, frame: Frame) -> int:
    """The image_id of a frame (module docstring): the file name's number, else the frame index."""
    return frame.index if source.kind == "video" else _name_id(frame.name, frame.index)


def _name_id(name: str, index: int) -> int:
    stem = Path(name).stem
    return int(stem) if stem.isdecimal() else index     # isdigit() passes '²', which int() refuses


def check_image_ids(source: FrameSource) -> None:
    """Refuse a folder where two frames would get one image_id (`1.png` and `01.png`, or `1.png`
    and a second file `x.png`): keypoints.json and --boxes need one id per frame."""
    if source.kind == "video":
        return
    seen: dict[int, str] = {}
    for i, f in enumerate(source.files):
        image_id = _name_id(f.name, i)
        if image_id in seen:
            raise PredictError(f"{source.path}: {seen[image_id]} and {f.name} would both be image_id {image_id} (a "
                               "frame's image_id is the number in its file name, else its 0-based position); "
                               "rename or move one of them")
        seen[image_id] = f.name


def overlay_names(source: FrameSource) -> dict[int, str]:
    """Frame index -> overlay PNG name: `<stem>.png`, or `<stem>_<suffix>.png` for frames sharing a
    stem (`a.png`, `a.jpg`), numbered on when that is taken too; compared case-insensitively, as
    some file systems do."""
    stems = [Path(f.name).stem for f in source.files]
    shared = {k for k, n in Counter(s.casefold() for s in stems).items() if n > 1}
    names: dict[int, str] = {i: s for i, s in enumerate(stems) if s.casefold() not in shared}
    used = {n.casefold() for n in names.values()}
    renamed = []
    for i, (f, stem) in enumerate(zip(source.files, stems)):
        if i in names:
            continue
        base = name = f"{stem}_{f.suffix.lstrip('.')}"
        k = 1
        while name.casefold() in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name.casefold())
        names[i] = name
        renamed.append(f"{f.name} -> overlay/{name}.png")
    if renamed:
        log.warning("frames share a file name but for the suffix; their overlays are %s", ", ".join(renamed))
    return {i: f"{n}.png" for i, n in names.items()}


Detections = dict[int, list[tuple[np.ndarray, float]]]     # image_id -> [(box (4,) xywh, score)]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> Optional[int]:
    """A JSON integer (or an integral float, or a string of one) -> int, else None (110001.7, [3])."""
    if isinstance(v, str) and v.strip().isdecimal():
        return int(v)
    if not _is_number(v) or not math.isfinite(v) or v != int(v):
        return None
    return int(v)


def load_detections(path: str | Path, meta: DeployMeta, min_score: float = 0.0) -> Detections:
    """A COCO detection-results file (or a COCO annotation file: its boxes) -> the boxes of the
    model's category scoring >= `min_score`, by image_id."""
    path = Path(path)
    spec = meta.joint_spec()
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise PredictError(f"{path}: detections file not found; give a COCO detection-results JSON or drop "
                           "--boxes") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise PredictError(f"{path}: not valid JSON ({e}); expected a COCO detection-results list") from None
    if isinstance(records, dict) and isinstance(records.get("annotations"), list):
        records = records["annotations"]          # a COCO annotation file: its boxes
    if not isinstance(records, list):
        raise PredictError(f"{path}: expected a list of {{image_id, category_id, bbox, score}} records, got "
                           f"{type(records).__name__}")
    if not records:
        raise PredictError(f"{path}: no detections in this file (an empty list); give the detector's results for "
                           "these frames, or drop --boxes to search each frame's box")
    out: Detections = {}
    categories = set()
    for i, r in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(r, dict) or "image_id" not in r or "bbox" not in r:
            raise PredictError(f"{where}: needs image_id and bbox [x, y, w, h]")
        cat = _integer(r.get("category_id", spec.category_id))
        if cat is None:
            raise PredictError(f"{where}: category_id must be an integer, got {r['category_id']!r}")
        categories.add(cat)
        if isinstance(r.get("keypoints"), list) and len(r["keypoints"]) != 3 * spec.num_joints:
            raise PredictError(f"{where}: has {len(r['keypoints']) // 3} keypoints, the model predicts "
                               f"{spec.num_joints} ({meta.joints}); these detections belong to another joint "
                               "layout: use a model trained for it or detections of the infant category")
        if cat != spec.category_id:
            continue
        bbox, score, image_id = r["bbox"], r.get("score", 1.0), _integer(r["image_id"])
        if image_id is None:
            raise PredictError(f"{where}: image_id must be an integer (a frame's file-name number or index), got "
                               f"{r['image_id']!r}")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise PredictError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
        if not _is_number(score) or not math.isfinite(score):
            raise PredictError(f"{where}: score must be a finite number, got {score!r}")
        box, score = np.asarray(bbox, dtype=np.float64), float(score)
        if not ((np.abs(box) <= MAX_PX).all() and box[2] > 0 and box[3] > 0):
            raise PredictError(f"{where}: bbox {box.tolist()} needs frame pixels (each within ±{MAX_PX:g}) and "
                               "w, h > 0")
        if score >= min_score:
            out.setdefault(image_id, []).append((box, score))
    if records and not any(c == spec.category_id for c in categories):
        raise PredictError(f"{path}: no boxes of category {spec.category_id} ({spec.category_name!r}, what the "
                           f"model predicts: {meta.joints}); the file has categories {sorted(categories, key=str)}")
    return out


# --------------------------------------------------------------------------- crops

def normalise(crop: np.ndarray, meta: DeployMeta) -> np.ndarray:
    """uint8 (h, w[, C]) crop -> float32 (3, h, w): (u8 / 255 - mean) / std on RGB, one channel
    replicated (PoseDataset's arithmetic, so the same crop gives the same input)."""
    w, h = meta.image_size
    mean, std = np.asarray(meta.mean, np.float32), np.asarray(meta.std, np.float32)
    c = np.asarray(crop).reshape(h, w, -1).astype(np.float32)
    x = c * (1.0 / (255.0 * std)).astype(np.float32) + (-mean / std).astype(np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# --------------------------------------------------------------------------- results

@dataclass
class FramePrediction:
    """The predictions of one frame (rows kept after NMS, best first)."""

    frame: Frame
    image_id: int
    boxes: np.ndarray          # (n, 4) xywh
    box_kind: str              # "frame" | "region" | "track" | "detections"
    keypoints: np.ndarray      # (n, J, 3) [x, y, maxval], smoothed for the best row with smoothing
    raw: np.ndarray            # (n, J, 3) as decoded
    scores: np.ndarray         # (n,)
    exit_stage: np.ndarray     # (n,)
    model_calls: int = 1       # crops the model ran for this frame (the box search: 1 .. iterations + 1)


@dataclass
class PredictResults:
    """Everything `predict_frames` found, with the views the output files are written from."""

    meta: DeployMeta
    model: str
    source: dict[str, Any]
    boxes: str
    region: Optional[list[float]] = None
    frames: list[FramePrediction] = field(default_factory=list)
    frames_without_box: list[int] = field(default_factory=list)
    seconds: float = 0.0
    smoothing: Optional[OneEuroParams] = None
    fps_used: Optional[float] = None
    anytime: bool = False
    refine: Optional[RefineParams] = None     # the box search, when it ran
    model_calls: int = 0                      # crops run, all frames
    searches: int = 0                         # box searches (a lost track searches twice)
    capped: int = 0                           # searches that reached the iteration cap unconverged

    @property
    def frames_done(self) -> int:
        return len(self.frames) + len(self.frames_without_box)

    def coco_results(self) -> list[dict]:
        """COCO keypoint results ({image_id, category_id, keypoints [x, y, maxval] * J, score})."""
        cat = self.meta.joint_spec().category_id
        return [{"image_id": int(fp.image_id), "category_id": cat,
                 "keypoints": [float(v) for v in kp.reshape(-1)], "score": float(s)}
                for fp in self.frames for kp, s in zip(fp.keypoints, fp.scores)]

    def csv_rows(self) -> list[dict]:
        """One row per frame, instance and joint (module docstring)."""
        names = self.meta.joint_names
        rows = []
        for fp in self.frames:
            for n, (kp, raw, ex) in enumerate(zip(fp.keypoints, fp.raw, fp.exit_stage)):
                for j, name in enumerate(names):
                    row: dict[str, Any] = {"frame": fp.frame.index, "name": fp.frame.name}
                    if self.boxes == "detections":
                        row["instance"] = n
                    row.update(joint=name, x=round(float(kp[j, 0]), 3), y=round(float(kp[j, 1]), 3),
                               score=round(float(kp[j, 2]), 5))
                    if self.anytime:
                        row["exit_stage"] = int(ex)
                    if self.smoothing is not None:
                        row["x_raw"], row["y_raw"] = round(float(raw[j, 0]), 3), round(float(raw[j, 1]), 3)
                    rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        kinds = [fp.box_kind for fp in self.frames]
        out: dict[str, Any] = {
            "model": self.model, "stage": self.meta.stage, "joints": self.meta.joints, "source": self.source,
            "boxes": self.boxes, "region": self.region, "frames_predicted": len(self.frames),
            "frames_without_box": len(self.frames_without_box), "predictions": sum(len(f.scores) for f in self.frames),
            "box_modes": {k: kinds.count(k) for k in sorted(set(kinds))},
            "model_calls": self.model_calls,
            "model_calls_per_frame": round(self.model_calls / len(self.frames), 3) if self.frames else None,
            "refine": None if self.refine is None else {**asdict(self.refine), "searches": self.searches,
                                                        "unconverged": self.capped},
            "seconds": round(self.seconds, 3),
            "frames_per_s": round(self.frames_done / self.seconds, 2) if self.seconds > 0 else None,
            "smoothing": None if self.smoothing is None else {**asdict(self.smoothing), "fps": self.fps_used},
        }
        if self.anytime:
            ex = np.concatenate([f.exit_stage for f in self.frames]) if self.frames else np.zeros(0, int)
            tau = self.meta.source.get("exit_threshold")
            # JSON has no inf: null is τ = inf, every frame runs to the last stage (README)
            out["exit_threshold"] = tau if tau is None or math.isfinite(tau) else None
            out["exit_share"] = {f"stage{k}": round(float(np.mean(ex == k)), 4) for k in sorted(set(ex.tolist()))}
        return out


# --------------------------------------------------------------------------- prediction

def predict_frames(runner: Runner, source: FrameSource, *, boxes: str | Path | Detections | None = None,
                   track: bool = False, region: Optional[Sequence[float]] = None,
                   track_params: TrackParams = TrackParams(), refine: Optional[RefineParams] = RefineParams(),
                   batch_size: int = 8, smooth: Optional[OneEuroParams] = None, fps: Optional[float] = None,
                   on_frame: Optional[Callable[[FramePrediction], None]] = None,
                   progress: bool = False) -> PredictResults:
    """Predict every frame of `source` with `runner` -> PredictResults.

    boxes: a COCO detection-results file (or its `load_detections` dict), used as given; track:
    boxes from the previous frame's keypoints (module docstring); neither: the whole frame, or
    `region` (x, y, w, h) frame px, which is also --track's fallback. refine: the box search of
    the frame, region and track boxes (None or 0 iterations: one crop). smooth: One Euro
    parameters, times from the frame index and `fps` (default: the video's, else 30). on_frame:
    called with each FramePrediction as soon as it is done (overlays; frames without a box too),
    in frame order.
    """
    meta = runner.meta
    if boxes is not None and track:
        raise PredictError("--boxes and --track exclude each other: boxes come from a detections file or from the "
                           "previous frame's keypoints")
    if batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {batch_size}")
    if fps is not None and not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        raise PredictError(f"--fps must be a frame rate from {FPS_RANGE[0]:g} to {FPS_RANGE[1]:g}, got {fps}")
    if region is not None:
        if boxes is not None:
            raise PredictError("--region and --boxes exclude each other: the boxes come from the detections file")
        r = np.asarray(region, np.float64).reshape(-1)
        if r.size != 4 or not (np.abs(r) <= MAX_PX).all() or r[2] <= 0 or r[3] <= 0:      # NaN fails too
            raise PredictError(f"--region must be X Y W H in frame pixels with W, H > 0 (each within ±{MAX_PX:g}), "
                               f"got {r.tolist()}")
    refine = RefineParams(iterations=0) if refine is None else refine
    refine.validate()
    track_params.validate()
    check_image_ids(source)
    dets = load_detections(boxes, meta) if isinstance(boxes, (str, Path)) else boxes
    mode = "detections" if dets is not None else "track" if track else "frame"
    spec = meta.joint_spec()
    codec = HeatmapCodec(meta.image_size, meta.heatmap_size, meta.sigma)
    aspect = meta.image_size[0] / meta.image_size[1]
    fps_used = fps or source.fps or 30.0
    smoother = OneEuroFilter(smooth) if smooth is not None else None
    res = PredictResults(meta, runner.describe(), source.summary(), mode,
                         region=None if region is None else [float(v) for v in region], smoothing=smooth,
                         fps_used=fps_used if smooth is not None else None,
                         anytime=runner.backend.endswith("anytime"),
                         refine=refine if dets is None and refine.iterations else None)
    pending: list[tuple[Frame, int, np.ndarray, np.ndarray, str]] = []   # frame, image_id, boxes, box scores, kind
    last: Optional[FramePrediction] = None
    matched_ids: set[int] = set()
    searching = dets is None and refine.iterations > 0

    def predict_boxes(images: Sequence[np.ndarray], bxs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One crop per (image, box) -> (keypoints (n, J, 3), exit_stage (n,)), batch_size crops a call."""
        center, scale = box_to_center_scale(bxs, aspect)
        crops = [normalise(crop_image(im, c, s, meta.image_size), meta) for im, c, s in zip(images, center, scale)]
        hms, stages = zip(*(runner(np.stack(crops[i:i + batch_size])) for i in range(0, len(crops), batch_size)))
        if not all(np.isfinite(h).all() for h in hms):        # NaN keypoints would only fail at writing
            raise ModelError(f"{runner.path}: its outputs are not finite (NaN or inf heatmaps): a checkpoint with "
                             "NaN/inf weights? Use an earlier checkpoint or retrain (and re-export) it")
        xy, maxvals = codec.decode(np.concatenate(hms), center, scale)
        res.model_calls += len(crops)
        return np.concatenate([xy, maxvals[..., None]], axis=-1).astype(np.float64), np.concatenate(stages)

    def finish(frame: Frame, image_id: int, bxs: np.ndarray, bscores: np.ndarray, kind: str,
               kp: np.ndarray, exit_stage: np.ndarray, calls: int) -> None:
        nonlocal last
        _, scale = box_to_center_scale(bxs, aspect)
        keep, scores = rescore_and_nms(np.full(len(kp), image_id), kp, bscores, scale_area(scale), spec.sigmas,
                                       IN_VIS_THRE, OKS_THRE)
        keep = keep[np.argsort(-scores[keep], kind="stable")]        # best first
        raw = kp[keep]
        out = raw.copy()
        if smoother is not None:
            best = out[0]
            best[:, :2] = smoother(frame.index / fps_used, best[:, :2], (best[:, 2] >= smooth.min_score)[:, None])
        fp = FramePrediction(frame, image_id, bxs[keep], kind, out, raw, scores[keep], exit_stage[keep], calls)
        res.frames.append(fp)
        last = fp
        if on_frame is not None:
            on_frame(fp)

    def search(frames: list[Frame], seeds: np.ndarray, kinds: list[str]) -> tuple[Search, list[str]]:
        found = refine_boxes(predict_boxes, [f.image for f in frames], seeds, refine)
        res.searches += len(frames)
        res.capped += int((~found.converged).sum())
        lost = [i for i, k in enumerate(kinds) if k == "track" and found.confidence[i] < track_params.min_confidence]
        if lost:        # the infant moved out of the tracked box: search this frame afresh
            for i in lost:
                log.info("frame %s: tracked box lost the infant (mean joint confidence %.3f < %s): searching from "
                         "the %s", frames[i].name, found.confidence[i], track_params.min_confidence, fallback)
            again = refine_boxes(predict_boxes, [frames[i].image for i in lost],
                                 np.stack([frame_box(frames[i].image, region) for i in lost]), refine)
            res.searches += len(lost)
            res.capped += int((~again.converged).sum())
            for j, i in enumerate(lost):
                found.calls[i] += again.calls[j]
                if again.confidence[j] > found.confidence[i]:
                    kinds[i] = fallback
                    for a in ("keypoints", "boxes", "exit_stage", "converged"):
                        getattr(found, a)[i] = getattr(again, a)[j]
        return found, kinds

    def flush() -> None:
        if not pending:
            return
        if searching:           # one seed box per frame
            found, kinds = search([p[0] for p in pending], np.stack([p[2][0] for p in pending]),
                                  [p[4] for p in pending])
            for i, (frame, image_id, _, bscores, _) in enumerate(pending):
                finish(frame, image_id, found.boxes[i:i + 1], bscores, kinds[i], found.keypoints[i:i + 1],
                       found.exit_stage[i:i + 1], int(found.calls[i]))
        else:
            bxs = np.concatenate([p[2] for p in pending])
            kp, exit_stage = predict_boxes([p[0].image for p in pending for _ in p[2]], bxs)
            start = 0
            for frame, image_id, fb, bscores, kind in pending:
                n = len(fb)
                finish(frame, image_id, fb, bscores, kind, kp[start:start + n], exit_stage[start:start + n], 1)
                start += n
        pending.clear()

    fallback = "frame" if region is None else "region"
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=source.count, desc="predict", unit="frame", disable=None)
    prev_index = None
    for frame in source:
        image_id = frame_image_id(source, frame)
        if dets is not None:
            found = dets.get(image_id, [])
            matched_ids.update([image_id] if found else [])
            bxs = np.array([b for b, _ in found]).reshape(-1, 4)
            bscores = np.array([s for _, s in found], dtype=np.float64)
            kind = "detections"
        else:           # tracking needs the frame just before: after a skipped one it starts afresh
            follow = track and last is not None and prev_index == frame.index - 1
            box = keypoint_box(last.raw[0], track_params) if follow else None
            if follow and box is None:
                log.info("frame %s: the previous frame lost the infant (mean joint confidence %.3f, %d joints >= %s): "
                         "searching from the %s", frame.name, last.raw[0][:, 2].mean(),
                         int((last.raw[0][:, 2] >= track_params.min_score).sum()), track_params.min_score, fallback)
            kind = "track" if box is not None else fallback
            bxs = (box if box is not None else frame_box(frame.image, region))[None]
            bscores = np.ones(1)
        prev_index = frame.index
        if bar is not None:
            bar.update(1)
        if not len(bxs):
            res.frames_without_box.append(frame.index)
            if on_frame is not None:          # the overlay video keeps its timeline
                on_frame(FramePrediction(frame, image_id, bxs, kind, *(np.zeros((0, spec.num_joints, 3)),) * 2,
                                         np.zeros(0), np.zeros(0, np.int64), 0))
            continue
        pending.append((frame, image_id, bxs, bscores, kind))
        if track or sum(len(p[2]) for p in pending) >= batch_size:
            flush()
    flush()
    if bar is not None:
        bar.close()
    if res.capped:
        log.info("%d of %d box searches stopped after --refine %d iterations without converging (IoU >= %s); each "
                 "kept its most confident box", res.capped, res.searches, refine.iterations, refine.min_iou)
    res.seconds = time.perf_counter() - t0
    res.source = source.summary()
    if dets is not None and dets and not matched_ids and res.frames_done:
        where = boxes if isinstance(boxes, (str, Path)) else "the detections"
        raise PredictError(f"{where}: no detection's image_id matches a frame (frames' image_ids: file names that "
                           "are numbers, else 0-based frame indices; the file has image_ids "
                           f"{sorted(dets)[:5]}...); see okdpose predict --help")
    if not res.frames_done:
        if source.skipped:
            raise FrameError(f"{source.path}: no frame could be read ({len(source.skipped)} skipped); see the "
                             "warnings above")
        raise FrameError(f"{source.path}: holds no frame OpenCV can read (an empty or unsupported video); check "
                         "it plays, or re-export it")
    return res


# --------------------------------------------------------------------------- outputs

class OverlayWriter:
    """Writes each FramePrediction as an overlay PNG (`overlay/<name>.png`; `names`: frame index ->
    name, default the frame's stem) and/or an MP4 frame."""

    MP4_SIDE = (2, 8191)      # px: what FFmpeg's MPEG-4 part 2 encoder takes

    def __init__(self, out: Path, meta: DeployMeta, *, png: bool, video: bool, fps: float,
                 names: Optional[dict[int, str]] = None) -> None:
        self.out, self.spec, self.png, self.video, self.fps = out, meta.joint_spec(), png, video, fps
        self.names = names or {}
        self.writer = None
        self.size: Optional[tuple[int, int]] = None
        if png:
            (out / "overlay").mkdir(parents=True, exist_ok=True)

    def __call__(self, fp: FramePrediction) -> None:
        import cv2

        from okdpose.viz import draw_skeleton, to_bgr, write_png

        image = fp.frame.image            # RGB or grey; OpenCV draws and writes BGR
        picture = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.shape[2] == 3 else to_bgr(image)
        for i, (kp, box, ex) in enumerate(zip(fp.keypoints, fp.boxes, fp.exit_stage)):
            joints = np.concatenate([kp[:, :2], np.where(kp[:, 2:] >= IN_VIS_THRE, 2.0, 0.0)], axis=1)
            label = f"{fp.frame.name}  stage {int(ex)}" if i == 0 else None
            picture = draw_skeleton(picture, joints, self.spec, box=box, label=label)
        if self.png:
            name = self.names.get(fp.frame.index, f"{Path(fp.frame.name).stem}.png")
            write_png(self.out / "overlay" / name, picture)
        if self.video:
            if self.writer is None:
                # the messages name the option, not self.out: a temporary folder, gone when they are read
                h, w = picture.shape[:2]
                self.size = (w, h)
                lo, hi = self.MP4_SIDE
                if not (lo <= w <= hi and lo <= h <= hi):
                    raise PredictError(f"--video-out: the frames are {w}x{h} px and mp4v takes {lo} to {hi} px a "
                                       "side; use --overlay for PNGs instead")
                self.writer = cv2.VideoWriter(str(self.out / "overlay.mp4"), cv2.VideoWriter_fourcc(*"mp4v"),
                                              self.fps, self.size)
                if not self.writer.isOpened():
                    raise OSError(f"--video-out: OpenCV cannot write mp4v video of {w}x{h} frames at {self.fps:g} "
                                  "fps here (its FFmpeg may lack the encoder); use --overlay for PNGs instead")
            if picture.shape[1::-1] != self.size:
                picture = cv2.resize(picture, self.size, interpolation=cv2.INTER_AREA)
            self.writer.write(picture)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


def write_outputs(res: PredictResults, out: Path) -> None:
    """keypoints.json, keypoints.csv and summary.json into the folder `out`."""
    from okdpose.files import write_csv, write_json

    write_json(out / "keypoints.json", res.coco_results(), indent=None)
    write_csv(out / "keypoints.csv", res.csv_rows())
    write_json(out / "summary.json", res.summary())


# --------------------------------------------------------------------------- command line

def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Keypoints of one infant on an image, a folder of frames "
                                 "or a video, with an exported model or a checkpoint's stage.",
                                 epilog="Without --boxes each frame's box is searched (--refine). "
                                        "Boxes, outputs and scores: see the module docstring of okdpose.predict. "
                                        "A --boxes file's image_id is a frame's file-name number (000000010001.png "
                                        "-> 10001), else its 0-based index (video: frame number).")
    ap.add_argument("input", type=Path, help="an image, a folder of frames (8-bit or 16-bit depth PNG) or a video")
    ap.add_argument("--model", required=True, type=Path, metavar="FILE",
                    help="models/export/stage{k}.onnx or .pt (TorchScript), or models/model.pt with --stage k")
    ap.add_argument("--stage", type=int, metavar="K", help="stage of an okdpose checkpoint to run (1-based)")
    ap.add_argument("--exit-threshold", type=float, metavar="TAU",
                    help="anytime early exit (checkpoint only): each frame leaves at the first stage whose mean joint "
                         "confidence reaches TAU (--stage: the deepest stage allowed)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), metavar="YAML",
                    help="params file describing a checkpoint's input (data section); default params.yaml")
    box = ap.add_mutually_exclusive_group()
    box.add_argument("--boxes", type=Path, metavar="DETS_JSON", help="COCO detection-results file")
    box.add_argument("--track", action="store_true", help="box from the previous frame's keypoints (one infant)")
    ap.add_argument("--region", type=float, nargs=4, metavar=("X", "Y", "W", "H"),
                    help="a fixed box (frame px) instead of the whole frame, also --track's fallback")
    ap.add_argument("--refine", type=int, metavar="N",
                    help="box search without a detector (whole frame, --region, --track): predict, re-crop to the "
                         "box of the predicted joints, up to N times until the box is stable; keeps the most "
                         f"confident (default {RefineParams.iterations}: 1 to {RefineParams.iterations + 1} model "
                         "calls a frame; 0: one crop). Not with --boxes")
    ap.add_argument("--track-min-confidence", type=float, default=TrackParams.min_confidence, metavar="C",
                    help="mean joint confidence below which --track falls back to the whole frame or --region "
                         "(default %(default)s)")
    ap.add_argument("--joints", metavar="SPEC",
                    help="joint layout you expect (e.g. babypose12); stops if the model predicts another")
    ap.add_argument("--out", type=Path, metavar="DIR",
                    help="output folder (default predictions/<input name without suffix>); replaced as a whole")
    ap.add_argument("--overlay", action="store_true", help="write overlay/<frame>.png with the skeleton")
    ap.add_argument("--video-out", action="store_true", help="write overlay.mp4 (mp4v) with the skeleton")
    ap.add_argument("--smooth", action="store_true", help="One Euro filter on the trajectories (okdpose.smoothing)")
    ap.add_argument("--min-cutoff", type=float, default=OneEuroParams.min_cutoff, metavar="HZ",
                    help="One Euro cutoff at rest: lower is smoother, lags more (default %(default)s)")
    ap.add_argument("--beta", type=float, default=OneEuroParams.beta, metavar="B",
                    help="One Euro cutoff rise per px/s of speed: higher lags less (default %(default)s)")
    ap.add_argument("--d-cutoff", type=float, default=OneEuroParams.d_cutoff, metavar="HZ",
                    help="One Euro cutoff of the speed estimate (default %(default)s)")
    ap.add_argument("--fps", type=float, metavar="F",
                    help="frame rate for smoothing and the MP4 (default: the video's, else 30)")
    ap.add_argument("--on-error", choices=ON_ERROR, default="stop",
                    help="an unreadable frame or truncated video: stop (default) or skip it with a warning")
    ap.add_argument("--batch-size", type=int, default=8, metavar="N", help="crops per model call (--track: 1)")
    ap.add_argument("--threads", type=int, metavar="N",
                    help="CPU threads of the model (torch and onnxruntime; default: theirs, one per core)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                    help="where torch models run (ONNX: the CPU)")
    return ap


def _out_dir(args: argparse.Namespace) -> Path:
    """--out, checked before any work: it is replaced as a whole at the end, so it must hold nothing
    but an earlier output, none of this run's inputs, and be replaceable."""
    from okdpose.files import replace_problem

    name = args.input.resolve()
    out = args.out if args.out is not None else Path("predictions") / (name.name if name.is_dir() else name.stem)
    problem = replace_problem(out)
    if problem is not None:
        raise PredictError(f"--out {out} cannot be replaced as a whole ({problem}); choose another folder")
    where = out.resolve()
    for option, given in (("the input", args.input), ("--model", args.model), ("--boxes", args.boxes),
                          ("--params", args.params)):
        if given is not None and given.exists() and (given.resolve() == where or where in given.resolve().parents):
            raise PredictError(f"--out {out} holds {option} {given}; it would be replaced (deleted) as a whole: "
                               "choose an --out outside it, e.g. predictions/<name>")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "summary.json").is_file())):
        raise PredictError(f"--out {out} exists and is not an earlier predict output (no summary.json); it would be "
                           "replaced as a whole, so choose a new folder")
    return out


def _check_options(args: argparse.Namespace) -> None:
    """Numbers the work would only trip over later (--fps and the rest: `predict_frames`)."""
    if args.threads is not None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if not 1 <= args.threads <= 4 * cores:       # more only slows; far more fails inside onnxruntime
            raise PredictError(f"--threads must be from 1 to {4 * cores} (4 per core of the {cores} here), "
                               f"got {args.threads}")


def run(args: argparse.Namespace) -> tuple[PredictResults, Path]:
    """The command's work: load, predict, write -> (results, output folder)."""
    from okdpose.files import atomic_dir

    _check_options(args)
    out = _out_dir(args)
    smooth = None
    if args.smooth:
        smooth = OneEuroParams(min_cutoff=args.min_cutoff, beta=args.beta, d_cutoff=args.d_cutoff)
        try:
            smooth.validate("--smooth")
        except ValueError as e:
            raise PredictError(str(e).replace("--smooth.", "--").replace("_", "-")) from None
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.boxes is not None and args.refine:
        raise PredictError("--refine searches for the infant without a detector; --boxes gives the boxes: drop one")
    refine = RefineParams() if args.refine is None else RefineParams(iterations=args.refine)
    refine.validate()
    runner = load_runner(args.model, stage=args.stage, exit_threshold=args.exit_threshold, device=args.device,
                         params=args.params, threads=args.threads)
    meta = runner.meta
    if args.joints is not None and args.joints != meta.joints:
        raise PredictError(f"{args.model} predicts {meta.joints!r} joints ({meta.num_joints}: "
                           f"{', '.join(meta.joint_names[:3])}, ...), --joints asks for {args.joints!r}; use a model "
                           "trained for that layout or drop --joints")
    source = open_source(args.input, depth_range=meta.depth_range, on_error=args.on_error)
    fps = args.fps or source.fps or 30.0
    with atomic_dir(out) as tmp:        # predict_frames checks its options before any frame; a failure removes tmp
        sink = OverlayWriter(tmp, meta, png=args.overlay, video=args.video_out, fps=fps,
                             names=overlay_names(source) if args.overlay else None) \
            if (args.overlay or args.video_out) else None
        try:
            res = predict_frames(runner, source, boxes=args.boxes, track=args.track, region=args.region,
                                 track_params=TrackParams(min_confidence=args.track_min_confidence), refine=refine,
                                 batch_size=args.batch_size, smooth=smooth, fps=args.fps, on_frame=sink,
                                 progress=True)
        finally:
            if sink is not None:
                sink.close()
        write_outputs(res, tmp)
    return res, out


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the temporary output folder is removed on the way out."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def _on_sigterm(handler: Any) -> Any:
    """Install `handler` for SIGTERM -> the previous one (None where signals cannot be set: not the main thread)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


USER_ERRORS = (PredictError, FrameError, ModelError, MetaError, OSError)   # OSError: unwritable --out, disk full


def main(argv: Optional[Sequence[str]] = None, prog: str = "okdpose predict") -> int:
    """The `okdpose predict` command -> exit status (0 done, 2 input the user must fix)."""
    import logging

    from okdpose.data.coco import DataError
    from okdpose.model.checkpoint import CheckpointError
    from okdpose.params import ParamsError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser(prog).parse_args(argv)
    previous = _on_sigterm(_terminate)
    try:
        res, out = run(args)
    except (*USER_ERRORS, DataError, CheckpointError, ParamsError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:      # Ctrl-C or SIGTERM: the temporary folder is gone, --out as it was
        print(f"{prog}: interrupted{' (SIGTERM)' if isinstance(e, Terminated) else ''}; the output folder was "
              "left as it was", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        _on_sigterm(previous)
    s = res.summary()
    skipped = res.source.get("skipped", 0)
    extra = f", {s['frames_without_box']} without a box" if s["frames_without_box"] else ""
    calls = f", {s['model_calls_per_frame']} model calls/frame" if res.refine is not None else ""
    print(f"{prog}: {res.frames_done} frames ({skipped} skipped{extra}) in {s['seconds']:.1f} s: "
          f"{s['frames_per_s']} frames/s{calls}; {res.model} -> {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
