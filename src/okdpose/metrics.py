"""Keypoint metrics: pure functions, numpy in, numbers out.

Legend: N instances (person boxes), J joints, H x W heatmap pixels; coordinates are (x, y) in
frame pixels unless a function says heatmap pixels; box sizes are (w, h). The evaluate stage and
the training loop's validation both call these functions (one code path).

- `coco_keypoint_ap`: COCO OKS AP/AR through pycocotools with our OKS sigmas.
- `heatmap_pck_from_coords`: the original HRNet `accuracy()` (PCK@0.5 in heatmap space, the
  paper's PCK) on argmax coordinates (`okdpose.codec.get_max_preds`).
- `pck`: standard PCK@t of the box size, per joint; `pixel_error`: mean/median error.
- `rescore`, `oks_nms`, `rescore_and_nms`: the original COCO evaluation with detection boxes.
- `to_coco_results`: predictions -> COCO results records.

Per-joint arrays hold NaN for a joint with no valid ground truth; means are taken over the
joints that have one (every joint weighs the same, as in HRNet and MMPose).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")

GroundTruth = Union[str, Path, dict]
Results = Union[str, Path, Sequence[dict]]


class PCKResult(NamedTuple):
    per_joint: np.ndarray   # (J,) fraction correct per joint; NaN where no joint was valid
    mean: float             # mean over joints with a valid ground truth (0.0 if none)
    count: int              # number of such joints


# --------------------------------------------------------------------------- COCO AP / AR

def coco_keypoint_ap(gt_annotation_json: GroundTruth, coco_results: Results, sigmas: Sequence[float]) -> dict[str, float]:
    """COCO keypoint AP/AR: `COCOeval(gt, dt, 'keypoints')` with `kpt_oks_sigmas = sigmas`.

    gt_annotation_json: path to a COCO keypoint annotation file or the loaded dict (not modified).
    coco_results: list of result dicts (`image_id`, `keypoints` [x, y, s]*J, `score`, optional
    `category_id`, which defaults to the gt's category) or a path to such a JSON list. Returns
    {AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl}; pycocotools' -1 means "no ground truth
    in that area range". An empty result list gives AP = AR = 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict = _load_json(gt_annotation_json, "ground truth") if isinstance(gt_annotation_json, (str, Path)) \
        else copy.deepcopy(gt_annotation_json)
    results = _load_json(coco_results, "results") if isinstance(coco_results, (str, Path)) \
        else copy.deepcopy(list(coco_results))
    sigmas = np.asarray(sigmas, dtype=np.float64)
    _check_results(gt_dict, results, len(sigmas))

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        if results:
            dt = gt.loadRes(results)
        else:  # pycocotools' loadRes cannot take an empty list
            dt = COCO()
            dt.dataset = {"images": list(gt_dict["images"]), "categories": copy.deepcopy(gt_dict["categories"]),
                          "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, "keypoints")
        ev.params.kpt_oks_sigmas = sigmas
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(COCO_STAT_NAMES, ev.stats)}


def _load_json(path: str | Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None


def _check_results(gt: dict, results: list, num_joints: int) -> None:
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"ground truth is not a COCO annotation dict: no {key!r}")
    cats = [c["id"] for c in gt["categories"]]
    image_ids = {img["id"] for img in gt["images"]}
    for ann in gt["annotations"]:
        if len(ann.get("keypoints", ())) != 3 * num_joints:
            raise ValueError(f"ground truth annotation {ann.get('id')} has {len(ann.get('keypoints', ())) // 3} "
                             f"keypoints but {num_joints} OKS sigmas were given")
    unknown = set()
    for r in results:
        if "category_id" not in r:
            if len(cats) != 1:
                raise ValueError(f"result without category_id, and the ground truth has categories {cats}")
            r["category_id"] = cats[0]
        elif r["category_id"] not in cats:
            raise ValueError(f"result category_id {r['category_id']} is not a ground-truth category {cats}")
        if r["image_id"] not in image_ids:
            unknown.add(r["image_id"])
        if len(r["keypoints"]) != 3 * num_joints:
            raise ValueError(f"result for image {r['image_id']} has {len(r['keypoints'])} keypoint values, "
                             f"expected 3 * {num_joints}")
    if unknown:
        shown = sorted(unknown)[:5]
        raise ValueError(f"{len(unknown)} result image id(s) not in the ground truth, e.g. {shown}: "
                         "results and annotations come from different splits?")


def to_coco_results(
    image_ids: Sequence[int],
    coords: np.ndarray,
    maxvals: np.ndarray,
    scores: np.ndarray,
    category_id: int,
) -> list[dict]:
    """COCO keypoint results: image_ids (N,), coords (N, J, 2) frame pixels, maxvals (N, J), scores (N,).

    Each record: {image_id, category_id, keypoints: [x, y, maxval] * J, score}.
    """
    coords = np.asarray(coords, dtype=np.float64)
    maxvals = np.asarray(maxvals, dtype=np.float64).reshape(coords.shape[:2])
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = coords.shape[0]
    if len(image_ids) != n or scores.shape[0] != n or coords.ndim != 3 or coords.shape[2] != 2:
        raise ValueError(f"expected image_ids (N,), coords (N, J, 2), maxvals (N, J), scores (N,); got "
                         f"{len(image_ids)}, {coords.shape}, {maxvals.shape}, {scores.shape}")
    flat = np.concatenate([coords, maxvals[..., None]], axis=2).reshape(n, -1)
    return [
        {"image_id": int(i), "category_id": int(category_id), "keypoints": [float(v) for v in k], "score": float(s)}
        for i, k, s in zip(image_ids, flat, scores)
    ]


# --------------------------------------------------------------------------- PCK and pixel error

def heatmap_pck_from_coords(pred_xy: np.ndarray, target_xy: np.ndarray, heatmap_size: Sequence[int],
                            thr: float = 0.5) -> PCKResult:
    """The original heatmap-space PCK from argmax coordinates (N, J, 2) and heatmap_size (w, h).

    Reproduces HRNet `accuracy()`: distances divided by (H/10, W/10) applied to (x, y) (sic: the
    original pairs x with H), a joint counts when its target peak has x > 1 and y > 1 (no peak
    gives (0, 0)), correct when the normalised distance < thr.
    """
    w, h = heatmap_size
    pred_xy = np.asarray(pred_xy, dtype=np.float64)
    target_xy = np.asarray(target_xy, dtype=np.float64)
    norm = np.array([h, w], dtype=np.float64) / 10.0
    valid = (target_xy[..., 0] > 1) & (target_xy[..., 1] > 1)          # (N, J)
    dists = np.linalg.norm((pred_xy - target_xy) / norm, axis=-1)       # (N, J)
    return _per_joint_rate(dists < thr, valid)


def pck(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, box_size: np.ndarray,
        thresholds: Sequence[float] = (0.2,)) -> dict[float, PCKResult]:
    """Standard PCK@t: a visible joint is correct when its error <= t * max(box w, box h).

    pred, gt: (N, J, 2) frame pixels; visible: (N, J) bool (or COCO v > 0); box_size: (N, 2) box
    (w, h), or (N, 4) COCO boxes [x, y, w, h]. Returns {t: PCKResult} for each threshold.
    """
    dists, valid = _errors(pred, gt, visible)
    box_size = np.asarray(box_size, dtype=np.float64)
    if box_size.ndim != 2 or box_size.shape[1] not in (2, 4) or box_size.shape[0] != dists.shape[0]:
        raise ValueError(f"box_size must be (N, 2) (w, h) or (N, 4) [x, y, w, h] with N = {dists.shape[0]}, got {box_size.shape}")
    size = box_size[:, -2:].max(axis=1, keepdims=True)                   # (N, 1)
    return {float(t): _per_joint_rate(dists <= t * size, valid) for t in thresholds}


def pixel_error(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray) -> dict[str, Any]:
    """Euclidean error in frame pixels over visible joints.

    Returns {mean, median, count} pooled over all visible joints and `per_joint_mean`,
    `per_joint_median` (J,) arrays (NaN for a joint never visible). Means are NaN with no
    visible joint at all.
    """
    dists, valid = _errors(pred, gt, visible)
    d = np.where(valid, dists, np.nan)
    with warnings.catch_warnings():     # all-NaN columns ("mean of empty slice") are expected
        warnings.simplefilter("ignore", RuntimeWarning)
        per_mean = np.nanmean(d, axis=0)
        per_median = np.nanmedian(d, axis=0)
    pooled = dists[valid]
    return {
        "mean": float(pooled.mean()) if pooled.size else float("nan"),
        "median": float(np.median(pooled)) if pooled.size else float("nan"),
        "count": int(pooled.size),
        "per_joint_mean": per_mean,
        "per_joint_median": per_median,
    }


def _errors(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    visible = np.asarray(visible)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[2] != 2 or visible.shape != pred.shape[:2]:
        raise ValueError(f"expected pred and gt (N, J, 2) and visible (N, J); got {pred.shape}, {gt.shape}, {visible.shape}")
    return np.linalg.norm(pred - gt, axis=-1), visible > 0


def _per_joint_rate(correct: np.ndarray, valid: np.ndarray) -> PCKResult:
    counts = valid.sum(axis=0)
    hits = (correct & valid).sum(axis=0)
    per_joint = np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
    has = counts > 0
    return PCKResult(per_joint, float(per_joint[has].mean()) if has.any() else 0.0, int(has.sum()))


# --------------------------------------------------------------------------- rescoring and OKS-NMS

def oks_iou(g: np.ndarray, d: np.ndarray, area_g: float, area_d: np.ndarray, sigmas: Sequence[float],
            in_vis_thre: Optional[float] = None) -> np.ndarray:
    """OKS between one instance g (J, 3) and instances d (M, J, 3), as the original `oks_iou`.

    e = dist^2 / (2 sigma)^2 / ((area_g + area_d) / 2 + eps) / 2, OKS = mean_j exp(-e). With
    `in_vis_thre`, only joints whose score exceeds it in both g and d count (the original meant
    this but its `list and list` kept d's mask only; its COCO evaluation never passes it).
    """
    g = np.asarray(g, dtype=np.float64).reshape(-1, 3)
    d = np.asarray(d, dtype=np.float64).reshape(-1, g.shape[0], 3)
    var = (2 * np.asarray(sigmas, dtype=np.float64)) ** 2
    area_d = np.asarray(area_d, dtype=np.float64).reshape(-1)
    sq = ((d[..., :2] - g[None, :, :2]) ** 2).sum(-1)                                   # (M, J)
    e = sq / var / ((area_g + area_d)[:, None] / 2 + np.spacing(1)) / 2
    if in_vis_thre is None:
        return np.exp(-e).mean(axis=1) if e.shape[1] else np.zeros(len(d))
    mask = (g[None, :, 2] > in_vis_thre) & (d[..., 2] > in_vis_thre)
    n = mask.sum(axis=1)
    return np.where(n > 0, (np.exp(-e) * mask).sum(axis=1) / np.maximum(n, 1), 0.0)


def oks_nms(keypoints: np.ndarray, scores: np.ndarray, areas: np.ndarray, thresh: float,
            sigmas: Sequence[float], in_vis_thre: Optional[float] = None) -> np.ndarray:
    """Greedy OKS-NMS: keep the best-scored instance, drop the others with OKS > thresh, repeat.

    keypoints (N, J, 3) [x, y, score], scores (N,), areas (N,) (the original: box scale area,
    prod(scale * 200)). Returns the kept indices, best score first.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    areas = np.asarray(areas, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        ovr = oks_iou(keypoints[i], keypoints[order[1:]], areas[i], areas[order[1:]], sigmas, in_vis_thre)
        order = order[1:][ovr <= thresh]
    return np.asarray(keep, dtype=np.int64)


def rescore(maxvals: np.ndarray, box_scores: np.ndarray, in_vis_thre: float) -> np.ndarray:
    """Original HRNet rescoring: box score x mean of the joint scores above in_vis_thre (0 if none).

    maxvals (N, J), box_scores (N,) -> (N,).
    """
    maxvals = np.asarray(maxvals, dtype=np.float64)
    above = maxvals > in_vis_thre
    n = above.sum(axis=1)
    kpt_score = np.where(n > 0, (maxvals * above).sum(axis=1) / np.maximum(n, 1), 0.0)
    return kpt_score * np.asarray(box_scores, dtype=np.float64).reshape(-1)


def rescore_and_nms(image_ids: Sequence[int], keypoints: np.ndarray, box_scores: np.ndarray, areas: np.ndarray,
                    sigmas: Sequence[float], in_vis_thre: float, oks_thre: float) -> tuple[np.ndarray, np.ndarray]:
    """The original COCO `evaluate()` post-processing: rescoring, then OKS-NMS per image.

    keypoints (N, J, 3) [x, y, maxval]; box_scores, areas (N,). Returns (kept indices in input
    order, new scores (N,)); build the results with `to_coco_results` on the kept rows.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    scores = rescore(keypoints[..., 2], box_scores, in_vis_thre)
    areas = np.asarray(areas, dtype=np.float64).reshape(-1)
    image_ids = np.asarray(image_ids)
    keep = []
    for img in np.unique(image_ids):
        rows = np.flatnonzero(image_ids == img)
        kept = oks_nms(keypoints[rows], scores[rows], areas[rows], oks_thre, sigmas)
        keep.extend(rows[kept])
    return np.sort(np.asarray(keep, dtype=np.int64)), scores
