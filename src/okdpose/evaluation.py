"""Per-stage evaluation of `Predictions` against a split's COCO ground truth: the one code path
behind the evaluate stage and the training loop's per-epoch validation.

Legend: S stage outputs, N prediction rows, J joints, A ground-truth annotations; points are
(x, y) frame pixels unless named `hm_*` (heatmap pixels); stages are 1-based ints (the JSON and
MLflow writers name them "stage{k}").

    preds = predict(model, dataset)                                  # okdpose.inference
    metrics = evaluate_predictions(preds, "data/prepared/test_gt.json", BABYPOSE12)
    metrics[4]["AP"], metrics[3]["hmPCK50"]
    metrics, preds = evaluate_model(model, dataset, gt_json, spec)   # both at once

Metric keys per stage (`METRIC_KEYS`): COCO `AP AP50 AP75 APm APl AR` (pycocotools, the spec's
OKS sigmas; -1 means no ground truth in that area range), `hmPCK50` (the paper's PCK@0.5: HRNet
`accuracy()` in heatmap space), `PCK{round(100 t)}` per `pck_thresholds` (standard PCK: error <=
t * max(box w, h) of the ground-truth box), `err_mean_px`/`err_median_px` (frame pixels). PCK and
pixel error count labelled joints (v > 0), as COCO's OKS does.

As the original BabyPose/HRNet `evaluate()`, every prediction is rescored (box score x mean of its
joint maxvals above `in_vis_thre`) and OKS-NMS runs per image, with ground-truth boxes too (one
box per image: a no-op there), so AP compares with the paper; `oks_nms=False` keeps every
prediction with its box score. Detection boxes scoring below `image_thre` are dropped first (the
original drops them when loading). The NMS areas are the boxes' scale areas prod(scale * 200), as
the original's.

Ground truth for PCK and pixel error is the annotation file (what COCOeval sees). With
ground-truth boxes each prediction is its annotation's (by annotation id) and `hmPCK50` uses the
crops' own target heatmaps, exactly as the original validation. With detection boxes each
annotation is matched to the kept prediction of its image with the highest OKS (greedy, one
prediction per annotation); an unmatched annotation's joints count as wrong in PCK and are left
out of the pixel error and of `hmPCK50` (which needs a crop: the matched annotation's target
heatmap is built in the detection crop, with the predictions' codec). The original accumulated
`accuracy()` per batch; here it is computed over the whole split at once (batch-size independent;
same definition otherwise).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np

from okdpose.codec import HeatmapCodec, get_max_preds
from okdpose.inference import Predictions, base_dataset, predict
from okdpose.joints import JointSpec
from okdpose.metrics import (
    coco_keypoint_ap,
    heatmap_pck_from_coords,
    oks_iou,
    pck,
    pixel_error,
    rescore_and_nms,
    to_coco_results,
)

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

COCO_KEYS = ("AP", "AP50", "AP75", "APm", "APl", "AR")
HEATMAP_PCK_KEY = "hmPCK50"
HEATMAP_PCK_THR = 0.5

GroundTruth = Union[str, Path, Mapping[str, Any]]


def pck_key(threshold: float) -> str:
    """Metric name of standard PCK at `threshold` (fraction of the box size): 0.2 -> 'PCK20'."""
    return f"PCK{round(threshold * 100)}"


def metric_keys(pck_thresholds: Sequence[float] = (0.1, 0.2)) -> tuple[str, ...]:
    """The flat metric names of each stage, in table order."""
    return (*COCO_KEYS, HEATMAP_PCK_KEY, *(pck_key(t) for t in pck_thresholds), "err_mean_px", "err_median_px")


METRIC_KEYS = metric_keys()


@dataclass
class EvalReport:
    """Everything `evaluate_report` computed, keyed by 1-based stage."""

    metrics: dict[int, dict[str, float]]            # the flat metric keys (see the module docstring)
    per_joint: dict[int, dict[str, list[float]]]    # hmPCK50 / PCK{t} / err_*_px per joint (NaN: no ground truth)
    results: dict[int, list[dict]]                  # the COCO results that were evaluated (after rescoring / NMS)
    matches: dict[int, np.ndarray]                  # (A,) prediction row of each annotation, -1 when unmatched
    annotations: list[dict]                         # the A ground-truth annotations, in file order


def _load_ground_truth(gt_json: GroundTruth, ground_truth: Optional[Mapping[str, Any]]) -> dict:
    if ground_truth is not None:
        return dict(ground_truth)
    if isinstance(gt_json, Mapping):
        return dict(gt_json)
    path = Path(gt_json)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ground truth not found; run the preprocess stage (dvc repro preprocess)")
    return json.loads(path.read_text())


def _annotations(gt: Mapping[str, Any], spec: JointSpec, source: str) -> list[dict]:
    anns = [a for a in gt.get("annotations", ()) if not a.get("iscrowd", 0)]
    for a in anns:
        if len(a.get("keypoints", ())) != 3 * spec.num_joints:
            raise ValueError(f"{source}: annotation {a.get('id')} has {len(a.get('keypoints', ())) // 3} keypoints, "
                             f"the joint spec {spec.name!r} has {spec.num_joints}; evaluate with the data.joints "
                             "the data was prepared with")
    return anns


def match_annotations(preds: Predictions, stage: int, annotations: Sequence[dict], rows: np.ndarray,
                      sigmas: Sequence[float], *, by_id: bool) -> np.ndarray:
    """Prediction row (among `rows`) for each annotation, -1 when none -> (A,) int64.

    `by_id`: the row whose `ann_ids` is the annotation's id (ground-truth boxes). Otherwise the
    greedy highest-OKS pairing within each image (COCO's OKS: labelled joints, annotation area).
    """
    out = np.full(len(annotations), -1, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    if by_id:
        row_of = {int(preds.ann_ids[r]): int(r) for r in rows}
        for a, ann in enumerate(annotations):
            out[a] = row_of.get(int(ann["id"]), -1)
        return out
    kp = preds.keypoints(stage)
    kp[..., 2] = 1.0                      # every predicted joint takes part; the annotation's v masks
    by_image: dict[int, list[int]] = {}
    for a, ann in enumerate(annotations):
        by_image.setdefault(int(ann["image_id"]), []).append(a)
    for image_id, anns in by_image.items():
        cand = rows[preds.image_ids[rows] == image_id]
        if not cand.size:
            continue
        oks = np.stack([oks_iou(np.asarray(annotations[a]["keypoints"], np.float64).reshape(-1, 3), kp[cand],
                                float(annotations[a]["area"]), np.full(len(cand), float(annotations[a]["area"])),
                                sigmas, in_vis_thre=0.0) for a in anns])            # (A_i, P_i)
        while oks.size and oks.max() >= 0:
            i, j = np.unravel_index(np.argmax(oks), oks.shape)
            out[anns[i]] = cand[j]
            oks[i, :] = -1.0
            oks[:, j] = -1.0
    return out


def _target_argmax(codec: HeatmapCodec, joints: np.ndarray, centers: np.ndarray, scales: np.ndarray,
                   chunk: int = 256) -> np.ndarray:
    """Argmax (M, J, 2) of the target heatmaps a data set builds for frame joints (M, J, 3) in the
    crops (center, scale) (M, 2); in chunks, to bound the (chunk, J, H, W) targets' memory."""
    out = np.zeros(joints.shape[:2] + (2,), np.float32)
    for i in range(0, len(joints), chunk):
        sl = slice(i, i + chunk)
        target, _ = codec.encode_frame(joints[sl], centers[sl], scales[sl])
        out[sl] = get_max_preds(target)[0]
    return out


def evaluate_report(preds: Predictions, gt_json: GroundTruth, spec: JointSpec, *, use_gt_bbox: bool = True,
                    pck_thresholds: Sequence[float] = (0.1, 0.2), oks_nms: bool = True, oks_thre: float = 0.9,
                    in_vis_thre: float = 0.2, image_thre: float = 0.0,
                    ground_truth: Optional[Mapping[str, Any]] = None) -> EvalReport:
    """Metrics, per-joint values, evaluated COCO results and matches of every stage output.

    gt_json: the split's COCO ground truth (`data/prepared/{split}_gt.json`, path or loaded dict);
    `ground_truth` may pass it already loaded (e.g. once per training run) and then wins.
    """
    source = str(gt_json) if not isinstance(gt_json, Mapping) else "ground truth"
    gt = _load_ground_truth(gt_json, ground_truth)
    anns = _annotations(gt, spec, source)
    sigmas = spec.sigmas
    gt_kp = np.array([a["keypoints"] for a in anns], dtype=np.float64).reshape(len(anns), spec.num_joints, 3)
    gt_box = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(len(anns), 4)
    by_id = use_gt_bbox and bool((preds.ann_ids >= 0).all())
    considered = np.arange(len(preds)) if use_gt_bbox else np.flatnonzero(preds.scores >= image_thre)
    hm_size = preds.codec.heatmap_size
    report = EvalReport({}, {}, {}, {}, anns)
    for si, stage in enumerate(preds.stages):
        kp = preds.keypoints(stage)
        if oks_nms and considered.size:
            kept, new_scores = rescore_and_nms(preds.image_ids[considered], kp[considered], preds.scores[considered],
                                               preds.areas[considered], sigmas, in_vis_thre, oks_thre)
            rows, scores = considered[kept], new_scores[kept]
        else:
            rows, scores = considered, preds.scores[considered]
        results = to_coco_results(preds.image_ids[rows], preds.coords[si][rows], preds.maxvals[si][rows], scores,
                                  spec.category_id) if rows.size else []
        coco = coco_keypoint_ap(gt, results, sigmas)
        match = match_annotations(preds, stage, anns, considered if by_id else rows, sigmas, by_id=by_id)
        ok = match >= 0
        pred_xy = np.full(gt_kp.shape[:2] + (2,), np.nan)
        pred_xy[ok] = preds.coords[si][match[ok]]
        pcks = pck(pred_xy, gt_kp[..., :2], gt_kp[..., 2], gt_box, pck_thresholds)   # unmatched: NaN -> wrong
        err = pixel_error(pred_xy[ok], gt_kp[ok, :, :2], gt_kp[ok, :, 2])
        if by_id:        # the original validation: every crop against its own target heatmaps
            hm = heatmap_pck_from_coords(preds.hm_coords[si], preds.hm_target, hm_size, HEATMAP_PCK_THR)
        else:
            r = match[ok]
            tgt = _target_argmax(preds.codec, gt_kp[ok], preds.centers[r], preds.scales[r])
            hm = heatmap_pck_from_coords(preds.hm_coords[si][r], tgt, hm_size, HEATMAP_PCK_THR)
        metrics = {k: coco[k] for k in COCO_KEYS}
        metrics[HEATMAP_PCK_KEY] = hm.mean
        metrics.update({pck_key(t): pcks[float(t)].mean for t in pck_thresholds})
        metrics["err_mean_px"], metrics["err_median_px"] = err["mean"], err["median"]
        report.metrics[stage] = metrics
        report.per_joint[stage] = {
            HEATMAP_PCK_KEY: hm.per_joint.tolist(),
            **{pck_key(t): pcks[float(t)].per_joint.tolist() for t in pck_thresholds},
            "err_mean_px": err["per_joint_mean"].tolist(), "err_median_px": err["per_joint_median"].tolist(),
        }
        report.results[stage] = results
        report.matches[stage] = match
    return report


def evaluate_predictions(preds: Predictions, gt_json: GroundTruth, spec: JointSpec, *, use_gt_bbox: bool = True,
                         pck_thresholds: Sequence[float] = (0.1, 0.2), oks_nms: bool = True, oks_thre: float = 0.9,
                         in_vis_thre: float = 0.2, image_thre: float = 0.0,
                         ground_truth: Optional[Mapping[str, Any]] = None) -> dict[int, dict[str, float]]:
    """{stage: {AP, AP50, AP75, APm, APl, AR, hmPCK50, PCK10, PCK20, err_mean_px, err_median_px}}.

    Per-joint values, the evaluated COCO results and the matches: `evaluate_report`.
    """
    return evaluate_report(preds, gt_json, spec, use_gt_bbox=use_gt_bbox, pck_thresholds=pck_thresholds,
                           oks_nms=oks_nms, oks_thre=oks_thre, in_vis_thre=in_vis_thre, image_thre=image_thre,
                           ground_truth=ground_truth).metrics


def evaluate_model(model: nn.Module, dataset: Dataset, gt_json: GroundTruth, spec: JointSpec, *,
                   batch_size: int = 32, device: str | torch.device | None = None, flip_test: bool = False,
                   workers: int = 0, progress: bool = False,
                   **eval_kw: Any) -> tuple[dict[int, dict[str, float]], Predictions]:
    """`predict` then `evaluate_predictions` (keyword arguments go to the one that takes them);
    `use_gt_bbox` defaults to the dataset's boxes."""
    preds = predict(model, dataset, batch_size=batch_size, device=device, flip_test=flip_test,
                    flip_perm=spec.flip_permutation(), workers=workers, progress=progress)
    use_gt_bbox = eval_kw.pop("use_gt_bbox", base_dataset(dataset).gt_boxes)
    return evaluate_predictions(preds, gt_json, spec, use_gt_bbox=use_gt_bbox, **eval_kw), preds


def per_joint_rows(report: EvalReport, spec: JointSpec) -> list[dict[str, Any]]:
    """Long table of the per-joint values: one row per (stage, joint), NaN where no ground truth."""
    return [{"stage": stage, "joint": joint, "stage_joint": f"s{stage} {joint}", **{k: v[j] for k, v in values.items()}}
            for stage, values in report.per_joint.items() for j, joint in enumerate(spec.names)]
