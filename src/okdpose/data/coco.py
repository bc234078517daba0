"""COCO-keypoint records: read the BabyPose layout, validate it, write `data/prepared/`.

Validation (per split): the annotation file parses and has the joint spec's category with J
keypoint names; image ids and annotation ids are unique; every image file exists, decodes,
has the declared width/height and a supported format (8-bit 1- or 3-channel, 16-bit
1-channel depth); each annotation has 3J finite keypoint values with v in {0, 1, 2}, labelled
joints (v > 0) inside the frame, a finite box with w, h > 0 inside the frame (1 px tolerance)
and a positive area; each detection names a known image and has a finite box (clipped to the
frame) and score. A bad record is reported as `file: image <id>: <field>: <problem>`; with
`skip_invalid` the record is skipped and counted instead: a bad image or annotation drops the
whole image (its annotations and detections, so ground truth and predictions stay
comparable), a bad detection only itself. Crowd annotations, other categories and annotations without labelled joints are
skipped as the original loader does (counted, not errors). A split with no valid record fails.

Prepared format (`data/prepared/`, written atomically as one folder):

    meta.json                  version, joints, num_joints, image_size [w, h], aspect_ratio,
                               pixel_std, padding, depth_range, raw_root (relative to this
                               folder), color ("RGB"), per split: counts, channels, frame_size
    {split}_gt.npz             records from the ground-truth boxes (one per annotation)
    {split}_det.npz            records from the detection boxes (one per detection)
    {split}_gt_crops.npy       (N, h, w, C) uint8 crops of `image_size`, row i = record i,
    {split}_det_crops.npy      warped with (center, scale, rot 0): the no-augmentation input
    {split}_gt.json            cleaned COCO ground truth (valid images/annotations only) that
                               pycocotools.COCO loads directly for evaluation

Record arrays (N records, J joints): image_id int64 (N,), ann_id int64 (N,) (-1 for
detections), image int32 (N,) index into `images` (str (M,), paths relative to raw_root),
bbox float32 (N, 4) xywh frame px, center float32 (N, 2), scale float32 (N, 2) (crop size in
units of 200 px, aspect image_size w/h, padding 1.25), joints float32 (N, J, 3) frame px + v
(zeros for detections), area float32 (N,) (COCO area; scale[0]*scale[1]*200^2 for
detections, as the original), score float32 (N,) (1 for ground truth).

Frames become uint8: 16-bit depth (mm) maps `depth_range` [near, far] linearly to 255..0
(near is bright), 0 (no reading) stays 0; 8-bit 3-channel frames are converted BGR -> RGB;
C = 1 when every frame of a split is single-channel (the dataset replicates it to 3).
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from okdpose.data.layout import SPLITS, annotation_file, detection_file, image_file, validate_layout
from okdpose.geometry import BOX_PADDING, PIXEL_STD, box_to_center_scale, crop_image, frame_to_crop
from okdpose.files import atomic_dir, write_json
from okdpose.joints import JointSpec

log = logging.getLogger(__name__)

PREPARED_VERSION = 1
BOX_TOLERANCE = 1.0     # px a ground-truth box may exceed the frame by (rounding in annotation tools)
RECORD_FIELDS = ("image_id", "ann_id", "image", "bbox", "center", "scale", "joints", "area", "score")


class DataError(ValueError):
    """Raw data that cannot be prepared; the message names file, image id and field."""


@dataclass(frozen=True)
class Issue:
    file: str
    image_id: int | None
    field: str
    problem: str

    def __str__(self) -> str:
        where = f"image {self.image_id}" if self.image_id is not None else "file"
        return f"{self.file}: {where}: {self.field}: {self.problem}"


# --------------------------------------------------------------------------- frames

def to_uint8(image: np.ndarray, depth_range: Sequence[float]) -> np.ndarray:
    """A decoded frame (as cv2.IMREAD_UNCHANGED gives it) -> uint8 (H, W, C), C = 1 or 3 (RGB)."""
    img = np.asarray(image)
    if img.dtype == np.uint16 and (img.ndim == 2 or img.shape[2] == 1):
        near, far = float(depth_range[0]), float(depth_range[1])
        d = img.reshape(img.shape[:2]).astype(np.float32)
        u8 = np.clip((far - d) * (255.0 / (far - near)), 0, 255)
        u8[d == 0] = 0
        return (u8 + 0.5).astype(np.uint8)[..., None]
    if img.dtype == np.uint8:
        if img.ndim == 2 or img.shape[2] == 1:
            return img.reshape(img.shape[:2] + (1,))
        if img.shape[2] in (3, 4):
            return cv2.cvtColor(img, cv2.COLOR_BGR2RGB if img.shape[2] == 3 else cv2.COLOR_BGRA2RGB)
    shape = "x".join(map(str, img.shape))
    raise DataError(f"unsupported frame format {img.dtype} {shape}: expected 8-bit with 1 or 3 channels "
                    "or 16-bit single-channel depth")


def read_frame(path: str | Path, depth_range: Sequence[float]) -> np.ndarray:
    """Read a frame file as uint8 (H, W, C); DataError naming the file when it cannot be used."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"{path}: {unreadable_image(Path(path))}")
    try:
        return to_uint8(img, depth_range)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def unreadable_image(path: Path) -> str:
    """Why OpenCV returned no image for `path`, and what to do about it."""
    if path.is_dir():
        return "is a folder, not an image file; put the frame's image file there or remove its entry"
    if not path.is_file():
        return f"image file not found (expected {path.name} in {path.parent}); add the frame or remove its entry"
    return (f"cannot be decoded as an image ({path.stat().st_size} bytes: corrupt or truncated); "
            "replace the file (re-export or re-download it)")


# --------------------------------------------------------------------------- records

@dataclass
class Records:
    """Column arrays of one record set (see the module docstring)."""

    image_id: np.ndarray
    ann_id: np.ndarray
    image: np.ndarray
    bbox: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    joints: np.ndarray
    area: np.ndarray
    score: np.ndarray
    images: np.ndarray

    def __len__(self) -> int:
        return len(self.image_id)

    def take(self, idx: np.ndarray) -> "Records":
        cols = {f: getattr(self, f)[idx] for f in RECORD_FIELDS}
        return Records(**cols, images=self.images)

    def save(self, path: Path) -> None:
        np.savez(path, images=self.images, **{f: getattr(self, f) for f in RECORD_FIELDS})


def load_records(prepared: str | Path, split: str, kind: str = "gt") -> Records:
    """Read `{split}_{kind}.npz` (kind 'gt' or 'det')."""
    path = Path(prepared) / f"{split}_{kind}.npz"
    if not path.is_file():
        raise DataError(f"{path}: not found; run the preprocess stage (dvc repro preprocess)")
    with np.load(path, allow_pickle=False) as z:
        return Records(**{k: z[k] for k in (*RECORD_FIELDS, "images")})


def load_meta(prepared: str | Path) -> dict:
    path = Path(prepared) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; run the preprocess stage (dvc repro preprocess)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-run the preprocess stage (dvc repro -f preprocess)") from None
    if not isinstance(meta, dict) or meta.get("version") != PREPARED_VERSION:
        raise DataError(f"{path}: prepared format version {meta.get('version')} != {PREPARED_VERSION}; re-run preprocess")
    return meta


def crops_path(prepared: str | Path, split: str, kind: str = "gt") -> Path:
    return Path(prepared) / f"{split}_{kind}_crops.npy"


# --------------------------------------------------------------------------- validation

@dataclass
class SplitScan:
    """What validation of one split found (before any pixels are cropped)."""

    images: dict[int, dict] = field(default_factory=dict)        # id -> image entry
    anns: list[dict] = field(default_factory=list)
    dets: list[dict] = field(default_factory=list)
    category: dict = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)
    bad_images: set[int] = field(default_factory=set)
    skipped: Counter = field(default_factory=Counter)
    name_mismatch: list[tuple[int, str, str]] = field(default_factory=list)    # (index, file's, spec's)


def _finite(values: Iterable[Any]) -> bool:
    try:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    except TypeError:
        return False


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found (expected by the BabyPose layout)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-export or re-download the file") from None


def scan_split(root: Path, split: str, spec: JointSpec) -> SplitScan:
    """Validate the annotation and detection files of a split (not the pixels)."""
    J = spec.num_joints
    scan = SplitScan()
    ann_path = annotation_file(root, split)
    rel_ann = str(ann_path)
    data = _load_json(ann_path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise DataError(f"{rel_ann}: expected a COCO object with 'images', 'annotations' and 'categories' lists")
    cats = [c for c in data["categories"] if isinstance(c, dict) and c.get("id") == spec.category_id]
    if not cats:
        raise DataError(f"{rel_ann}: no category with id {spec.category_id} ({spec.category_name!r}) for joint spec "
                        f"{spec.name}; check data.joints")
    names = cats[0].get("keypoints", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{rel_ann}: categories[id={spec.category_id}].keypoints must be a list of joint names, got "
                        f"{str(names)[:80]}; write the {J} names of joint spec {spec.name} in order")
    if len(names) != J:
        raise DataError(f"{rel_ann}: category {spec.category_id} has {len(names)} keypoint names, joint spec "
                        f"{spec.name} has {J}; set data.joints to the data's spec")
    _check_joint_names(names, spec, rel_ann, scan)
    scan.category = {**spec.coco_category(), **{k: v for k, v in cats[0].items() if k in ("name", "supercategory")}}

    def bad(image_id, fld, problem, file=rel_ann):
        scan.issues.append(Issue(file, image_id, fld, problem))
        if image_id is not None:
            scan.bad_images.add(image_id)

    for im in data["images"]:
        iid = im.get("id") if isinstance(im, dict) else None
        if not isinstance(iid, int) or isinstance(iid, bool):
            bad(None, "images[].id", f"missing or not an integer: {str(im)[:80]}")
            continue
        if iid in scan.images:
            bad(iid, "id", "duplicate image id (image ids must be unique in the file)")
            continue
        w, h = im.get("width"), im.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            bad(iid, "width/height", f"must be positive integers, got {w}x{h}")
            continue
        scan.images[iid] = im

    seen_ann: set[int] = set()
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            bad(None, "annotations[]", "not an object")
            continue
        iid = ann.get("image_id")
        aid = ann.get("id")
        if not isinstance(iid, int) or iid not in scan.images:
            bad(None, "image_id", f"annotation {aid} refers to unknown image {iid!r}")
            continue
        if not isinstance(aid, int) or isinstance(aid, bool):
            bad(iid, "id", f"annotation id {aid!r} is missing or not an integer")
            continue
        if aid in seen_ann:
            bad(iid, "id", f"duplicate annotation id {aid} (annotation ids must be unique in the file)")
            continue
        seen_ann.add(aid)
        if ann.get("category_id") != spec.category_id:
            scan.skipped["other_category"] += 1
            continue
        if ann.get("iscrowd", 0):
            scan.skipped["crowd"] += 1
            continue
        problem = _check_annotation(ann, scan.images[iid], J)
        if problem:
            bad(iid, *problem)
            continue
        if max(ann["keypoints"][2::3]) == 0:
            scan.skipped["no_keypoints"] += 1
            continue
        scan.anns.append(ann)

    det_path = detection_file(root, split)
    dets = _load_json(det_path)
    if not isinstance(dets, list):
        raise DataError(f"{det_path}: expected a COCO results list of {{image_id, category_id, bbox, score}}")
    for d in dets:
        if not isinstance(d, dict) or not isinstance(d.get("image_id"), int) or d["image_id"] not in scan.images:
            scan.issues.append(Issue(str(det_path), d.get("image_id") if isinstance(d, dict) else None,
                                     "image_id", "detection for an unknown image"))
            continue
        if d.get("category_id", spec.category_id) != spec.category_id:
            scan.skipped["other_category_det"] += 1
            continue
        iid = d["image_id"]
        im = scan.images[iid]
        box, score = d.get("bbox"), d.get("score")
        if not (isinstance(box, list) and len(box) == 4 and _finite(box)):
            scan.issues.append(Issue(str(det_path), iid, "bbox", f"must be 4 finite numbers, got {box!r}"))
            continue
        if not _finite([score]):
            scan.issues.append(Issue(str(det_path), iid, "score", f"must be a finite number, got {score!r}"))
            continue
        clipped = _clip_box(box, im["width"], im["height"])
        if clipped[2] < 1 or clipped[3] < 1:
            scan.issues.append(Issue(str(det_path), iid, "bbox", f"{box} has no area inside the {im['width']}x{im['height']} frame"))
            continue
        scan.dets.append({"image_id": iid, "bbox": clipped, "score": float(score)})
    return scan


def _check_annotation(ann: dict, im: dict, J: int) -> tuple[str, str] | None:
    """(field, problem) of the first thing wrong with an annotation, or None."""
    w, h = im["width"], im["height"]
    kps = ann.get("keypoints")
    if not isinstance(kps, list) or len(kps) != 3 * J:
        n = len(kps) // 3 if isinstance(kps, list) else "no"
        return "keypoints", f"{n} joints ({len(kps) if isinstance(kps, list) else 0} values), expected {J} (3 values each)"
    if not _finite(kps):
        return "keypoints", "non-finite or non-numeric value"
    k = np.asarray(kps, dtype=np.float64).reshape(J, 3)
    if not np.isin(k[:, 2], (0, 1, 2)).all():
        return "keypoints", f"visibility flags must be 0, 1 or 2, got {sorted(set(k[:, 2].tolist()))}"
    lab = k[:, 2] > 0
    out = lab & ((k[:, 0] < 0) | (k[:, 0] >= w) | (k[:, 1] < 0) | (k[:, 1] >= h))
    if out.any():
        j = int(np.flatnonzero(out)[0])
        return f"keypoints[{j}]", f"labelled joint at ({k[j, 0]:g}, {k[j, 1]:g}) is outside the {w}x{h} frame"
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and _finite(box)):
        return "bbox", f"must be 4 finite numbers [x, y, w, h], got {box!r}"
    x, y, bw, bh = box
    if bw <= 0 or bh <= 0:
        return "bbox", f"width and height must be > 0, got {box}"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + bw > w + t or y + bh > h + t:
        return "bbox", f"{box} is not inside the {w}x{h} frame"
    area = ann.get("area", bw * bh)
    if not _finite([area]) or area <= 0:
        return "area", f"must be a positive number, got {area!r}"
    return None


def _clip_box(box: Sequence[float], w: int, h: int) -> list[float]:
    x0, y0 = max(float(box[0]), 0.0), max(float(box[1]), 0.0)
    x1, y1 = min(float(box[0]) + float(box[2]), float(w)), min(float(box[1]) + float(box[3]), float(h))
    return [x0, y0, x1 - x0, y1 - y0]


# --------------------------------------------------------------------------- preparing

def prepare_dataset(raw_root: str | Path, out_dir: str | Path, spec: JointSpec, image_size: Sequence[int],
                    depth_range: Sequence[float], skip_invalid: bool = False, splits: Sequence[str] = SPLITS,
                    progress: bool = True) -> dict:
    """Validate `raw_root` and write the prepared folder `out_dir` atomically; return the data report."""
    raw_root, out_dir = Path(raw_root), Path(out_dir)
    validate_layout(raw_root, tuple(splits), what=f"raw data {raw_root}")
    aspect = image_size[0] / image_size[1]
    scans = {s: scan_split(raw_root, s, spec) for s in splits}
    report: dict = {"splits": {}}
    meta = {"version": PREPARED_VERSION, "joints": spec.name, "num_joints": spec.num_joints,
            "image_size": list(image_size), "aspect_ratio": aspect, "pixel_std": PIXEL_STD,
            "padding": BOX_PADDING, "depth_range": list(depth_range),
            "raw_root": os.path.relpath(raw_root.resolve(), out_dir.resolve()),
            "color": "RGB", "splits": {}}
    with atomic_dir(out_dir) as tmp:
        for split in splits:
            scan = scans[split]
            if not skip_invalid:            # fail before decoding anything when the JSON is already wrong
                _raise_issues(scan, split)
            info = _prepare_split(raw_root, tmp, split, scan, spec, image_size, aspect, depth_range, progress)
            if not skip_invalid:
                _raise_issues(scan, split)
            elif scan.issues:
                log.warning("split %r: skipped %d invalid record(s) (data.skip_invalid; the first 50 are listed "
                            "under 'invalid' in the data report), first: %s", split, len(scan.issues), scan.issues[0])
            if info["records_gt"] == 0:
                raise DataError(f"{annotation_file(raw_root, split)}: split {split!r} has no valid annotated record "
                                f"({len(scan.issues)} invalid, skipped: {dict(scan.skipped)}); it cannot be used: "
                                "add annotated frames to it (every split needs at least one)")
            meta["splits"][split] = {k: info.pop(k) for k in ("channels", "frame_size")} | {
                "gt": info["records_gt"], "det": info["records_det"]}
            report["splits"][split] = info
        report["total"] = _sum_reports(report["splits"].values())
        write_json(tmp / "meta.json", meta)
    return report


def _raise_issues(scan: SplitScan, split: str) -> None:
    if scan.issues:
        shown = "\n  ".join(str(i) for i in scan.issues[:20])
        more = f"\n  ... and {len(scan.issues) - 20} more" if len(scan.issues) > 20 else ""
        raise DataError(f"{len(scan.issues)} invalid record(s) in split {split!r}:\n  {shown}{more}\n"
                        "Fix the data, or set data.skip_invalid: true to skip (and count) them.")


def _prepare_split(raw_root: Path, out: Path, split: str, scan: SplitScan, spec: JointSpec,
                   image_size: Sequence[int], aspect: float, depth_range: Sequence[float], progress: bool) -> dict:
    J = spec.num_joints
    ids = sorted(scan.images)
    anns = sorted(scan.anns, key=lambda a: (a["image_id"], a["id"]))
    dets = sorted(scan.dets, key=lambda d: (d["image_id"], -d["score"]))
    gt = _records_from(anns, ids, split, J, aspect, det=False)
    det = _records_from(dets, ids, split, J, aspect, det=True)
    iw, ih = int(image_size[0]), int(image_size[1])
    gt_rows = _rows_by_image(gt)
    det_rows = _rows_by_image(det)

    # decode each frame once: check it, then crop every record of it. The kind of frame the split
    # holds is the first one's, unless most frames turn out to be of the other kind (the stray file
    # came first): then, and only then, the split is decoded a second time with that kind expected
    issues, bad = list(scan.issues), set(scan.bad_images)
    channels, gt_crops, det_crops, frame_sizes, kinds = _crop_frames(
        raw_root, split, ids, scan, gt, det, gt_rows, det_rows, (iw, ih), depth_range, None, progress)
    (most, n_most), *others = kinds.most_common() or [(None, 0)]
    if others and n_most > others[0][1] and most != next(iter(kinds)):
        scan.issues, scan.bad_images = issues, bad
        channels, gt_crops, det_crops, frame_sizes, _ = _crop_frames(
            raw_root, split, ids, scan, gt, det, gt_rows, det_rows, (iw, ih), depth_range, most, progress)

    for iid in scan.bad_images:          # drop bad frames' annotations everywhere
        gt_rows.pop(iid, None)
        det_rows.pop(iid, None)
    keep_gt = np.array(sorted(i for rows in gt_rows.values() for i in rows), dtype=np.int64)
    keep_det = np.array(sorted(i for rows in det_rows.values() for i in rows), dtype=np.int64)
    gt, det = gt.take(keep_gt), det.take(keep_det)
    channels = channels or 1
    gt.save(out / f"{split}_gt.npz")
    det.save(out / f"{split}_det.npz")
    np.save(out / f"{split}_gt_crops.npy", gt_crops[keep_gt] if gt_crops is not None else np.zeros((0, ih, iw, 1), np.uint8))
    np.save(out / f"{split}_det_crops.npy", det_crops[keep_det] if det_crops is not None else np.zeros((0, ih, iw, 1), np.uint8))

    valid_ids = set(ids) - scan.bad_images
    clean = {"info": {"description": f"okdpose cleaned ground truth, split {split}"}, "licenses": [],
             "images": [scan.images[i] for i in ids if i in valid_ids],
             "annotations": [_clean_ann(a) for a in anns if a["image_id"] in valid_ids],
             "categories": [scan.category]}
    write_json(out / f"{split}_gt.json", clean, indent=None)

    info = _split_report(gt, det, scan)
    info["channels"] = int(channels)
    info["frame_size"] = list(frame_sizes.pop()) if len(frame_sizes) == 1 else None
    return info


def _crop_frames(raw_root: Path, split: str, ids: list[int], scan: SplitScan, gt: Records, det: Records,
                 gt_rows: dict, det_rows: dict, crop_size: tuple[int, int], depth_range: Sequence[float],
                 expected: str | None, progress: bool):
    """Decode, check and crop every frame of a split; frames that fail a check join `scan`.

    Returns (channels, gt_crops (N, h, w, C) uint8, det_crops, frame sizes, Counter of frame kinds in
    decoding order). `expected` is the kind of frame the split holds; None: the first decoded one's.
    """
    iw, ih = crop_size
    channels = gt_crops = det_crops = None
    frame_sizes, kinds, why = set(), Counter(), None
    for iid in tqdm(ids, desc=f"preprocess {split}", unit="frame", disable=not progress):
        if iid in scan.bad_images or (iid not in gt_rows and iid not in det_rows):
            continue
        path = image_file(raw_root, split, iid)
        im = scan.images[iid]
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            scan.issues.append(Issue(str(path), iid, "file", unreadable_image(path)))
            scan.bad_images.add(iid)
            continue
        if raw.shape[:2] != (im["height"], im["width"]):
            scan.issues.append(Issue(str(path), iid, "width/height",
                                     f"file is {raw.shape[1]}x{raw.shape[0]}, annotation says {im['width']}x{im['height']} "
                                     f"(in {annotation_file(raw_root, split)}); fix the JSON or replace the frame"))
            scan.bad_images.add(iid)
            continue
        try:
            frame = to_uint8(raw, depth_range)
        except DataError as e:
            scan.issues.append(Issue(str(path), iid, "format", str(e)))
            scan.bad_images.add(iid)
            continue
        # 8-bit frames are taken as already mapped to grey levels and 16-bit ones as depth in mm: one
        # of the other kind in a split is a stray file (a visualisation, an RGB still), not a frame
        kind = "16-bit depth" if raw.dtype == np.uint16 else "8-bit"
        kinds[kind] += 1
        if expected is None:
            expected, why = kind, f"the first frame, {path}, is {kind}"
        elif why is None:
            why = f"most frames of this split are {expected}"
        if kind != expected:
            scan.issues.append(Issue(str(path), iid, "format",
                                     f"{'a' if kind.startswith('16') else 'an'} {kind} frame among {expected} ones "
                                     f"({why}); one split holds one kind of frame: convert this frame "
                                     "or remove it and its annotations"))
            scan.bad_images.add(iid)
            continue
        if channels is None:
            channels = frame.shape[2]
            gt_crops = np.zeros((len(gt), ih, iw, channels), np.uint8)
            det_crops = np.zeros((len(det), ih, iw, channels), np.uint8)
        if frame.shape[2] != channels:
            if channels == 3:
                frame = np.repeat(frame, 3, axis=2)
            else:
                scan.issues.append(Issue(str(path), iid, "channels", "a 3-channel frame among single-channel ones"))
                scan.bad_images.add(iid)
                continue
        frame_sizes.add((im["width"], im["height"]))
        for recs, crops, rows in ((gt, gt_crops, gt_rows), (det, det_crops, det_rows)):
            for i in rows.get(iid, ()):
                crops[i] = crop_image(frame, recs.center[i], recs.scale[i], (iw, ih)).reshape(ih, iw, channels)
    return channels, gt_crops, det_crops, frame_sizes, kinds


def _records_from(items: list[dict], ids: list[int], split: str, J: int, aspect: float, det: bool) -> Records:
    n = len(items)
    image_index = {iid: k for k, iid in enumerate(ids)}
    bbox = np.array([it["bbox"] for it in items], dtype=np.float32).reshape(n, 4)
    center, scale = box_to_center_scale(bbox, aspect)
    if det:
        joints = np.zeros((n, J, 3), np.float32)
        area = (scale[:, 0] * scale[:, 1] * PIXEL_STD ** 2).astype(np.float32)
        score = np.array([it["score"] for it in items], dtype=np.float32)
        ann_id = np.full(n, -1, dtype=np.int64)
    else:
        joints = np.array([it["keypoints"] for it in items], dtype=np.float32).reshape(n, J, 3)
        joints[..., :2] *= joints[..., 2:3] > 0          # absent joints: coordinates 0
        area = np.array([it.get("area", it["bbox"][2] * it["bbox"][3]) for it in items], dtype=np.float32)
        score = np.ones(n, dtype=np.float32)
        ann_id = np.array([it["id"] for it in items], dtype=np.int64)
    return Records(
        image_id=np.array([it["image_id"] for it in items], dtype=np.int64), ann_id=ann_id,
        image=np.array([image_index[it["image_id"]] for it in items], dtype=np.int32),
        bbox=bbox, center=center.reshape(n, 2), scale=scale.reshape(n, 2), joints=joints, area=area, score=score,
        images=np.array([f"images/{split}/{iid:012d}.png" for iid in ids]),
    )


def _rows_by_image(recs: Records) -> dict[int, list[int]]:
    rows: dict[int, list[int]] = {}
    for i, iid in enumerate(recs.image_id.tolist()):
        rows.setdefault(iid, []).append(i)
    return rows


def _clean_ann(a: dict) -> dict:
    kps = [float(v) for v in a["keypoints"]]
    return {"id": a["id"], "image_id": a["image_id"], "category_id": a["category_id"], "iscrowd": 0,
            "keypoints": kps, "num_keypoints": sum(1 for v in kps[2::3] if v > 0),
            "bbox": [float(v) for v in a["bbox"]], "area": float(a.get("area", a["bbox"][2] * a["bbox"][3]))}


# --------------------------------------------------------------------------- report

def _check_joint_names(names: list[str], spec: JointSpec, where: str, scan: "SplitScan") -> None:
    """The spec's joints in another order would label every heatmap wrongly: refused. Other names
    (another naming of the same joints) are only warned about and recorded: the order is the contract."""
    if names == list(spec.names):
        return
    if sorted(names) == sorted(spec.names):
        j = next(i for i, (a, b) in enumerate(zip(names, spec.names)) if a != b)
        raise DataError(f"{where}: categories[id={spec.category_id}].keypoints lists the joints of {spec.name} in "
                        f"another order (position {j} is {names[j]!r}, the spec has {spec.names[j]!r}): the "
                        f"keypoint triples would be read as the wrong joints; write the file in the spec's order "
                        f"{list(spec.names)}")
    scan.name_mismatch = [(j, a, b) for j, (a, b) in enumerate(zip(names, spec.names)) if a != b]
    log.warning("%s: %d of the %d keypoint names differ from joint spec %s (first: position %d %r, spec %r); "
                "the keypoints are read in the spec's order", where, len(scan.name_mismatch), len(names),
                spec.name, *scan.name_mismatch[0])


def _split_report(gt: Records, det: Records, scan: SplitScan) -> dict:
    v = gt.joints[..., 2]
    n_joints = max(v.size, 1)
    bw, bh = gt.bbox[:, 2], gt.bbox[:, 3]
    by_field = Counter(i.field.split("[")[0] for i in scan.issues)
    rep = {
        "images": int(len(np.unique(gt.image_id))),
        "records_gt": len(gt), "records_det": len(det),
        "joints": {"visible": int((v == 2).sum()), "occluded": int((v == 1).sum()), "absent": int((v == 0).sum()),
                   "visible_frac": round(float((v == 2).sum()) / n_joints, 4),
                   "occluded_frac": round(float((v == 1).sum()) / n_joints, 4),
                   "absent_frac": round(float((v == 0).sum()) / n_joints, 4)},
        "box": {"w_mean": _r(bw.mean()), "h_mean": _r(bh.mean()), "w_min": _r(bw.min()), "w_max": _r(bw.max()),
                "h_min": _r(bh.min()), "h_max": _r(bh.max()), "area_mean": _r(gt.area.mean())} if len(gt) else {},
        "det": _det_report(gt, det),
        "skipped": {"invalid_records": len(scan.issues), "invalid_images": len(scan.bad_images),
                    **{k: int(c) for k, c in sorted(scan.skipped.items())},
                    **{f"invalid_{k}": int(c) for k, c in sorted(by_field.items())}},
    }
    if scan.issues:                          # which records were skipped, not only how many (data.skip_invalid)
        rep["invalid"] = [str(i) for i in scan.issues[:50]]
    if scan.name_mismatch:
        rep["keypoint_names_differ"] = [{"index": j, "file": a, "spec": b} for j, a, b in scan.name_mismatch]
    return rep


def _det_report(gt: Records, det: Records) -> dict:
    if not len(det):
        return {"boxes": 0}
    best = np.zeros(len(det))
    gt_rows = _rows_by_image(gt)
    for i in range(len(det)):             # one IoU per detection against the boxes of its frame
        rows = gt_rows.get(int(det.image_id[i]), [])
        if rows:
            best[i] = _iou(det.bbox[i], gt.bbox[rows]).max()
    covered = {int(det.image_id[i]) for i in np.flatnonzero(best >= 0.5)}
    return {"boxes": len(det), "score_mean": _r(det.score.mean()), "iou_mean": round(float(best.mean()), 4),
            "false_positives": int((best < 0.5).sum()),
            "missed_images": int(len(set(gt.image_id.tolist()) - covered))}


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2])
    y1 = np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return inter / (box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter)


def _r(x: float) -> float:
    return round(float(x), 2)


def _sum_reports(reports: Iterable[dict]) -> dict:
    tot: Counter = Counter()
    for r in reports:
        tot.update({"images": r["images"], "records_gt": r["records_gt"], "records_det": r["records_det"],
                    "visible": r["joints"]["visible"], "occluded": r["joints"]["occluded"],
                    "absent": r["joints"]["absent"], "skipped_invalid": r["skipped"]["invalid_records"]})
    return dict(tot)


# --------------------------------------------------------------------------- previews

def preview(prepared: str | Path, split: str, spec: JointSpec, num: int = 6, crops: bool = False) -> np.ndarray:
    """A grid of `num` evenly spaced ground-truth records with their skeletons (full frames or cached crops)."""
    from okdpose.viz import draw_skeleton, image_grid

    prepared = Path(prepared)
    meta = load_meta(prepared)
    recs = load_records(prepared, split, "gt")
    idx = np.unique(np.linspace(0, len(recs) - 1, num).round().astype(int))
    tiles = []
    if crops:
        cache = np.load(crops_path(prepared, split, "gt"), mmap_mode="r")
        size = meta["image_size"]
        for i in idx:
            j = recs.joints[i].copy()
            j[:, :2] = frame_to_crop(j[:, :2], recs.center[i], recs.scale[i], size)
            tiles.append(draw_skeleton(_bgr(np.asarray(cache[i])), j, spec, radius=2, thickness=1))
        return image_grid(tiles, cols=min(len(tiles), 8))
    raw_root = (prepared / meta["raw_root"]).resolve()
    for i in idx:
        frame = read_frame(raw_root / str(recs.images[recs.image[i]]), meta["depth_range"])
        tile = draw_skeleton(_bgr(frame), recs.joints[i], spec, box=recs.bbox[i], label=f"{split} {int(recs.image_id[i])}")
        # half size keeps the committed preview small (plots/ is versioned in git)
        tiles.append(cv2.resize(tile, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA))
    return image_grid(tiles, cols=3)


def _bgr(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 and image.shape[2] == 3 else image
