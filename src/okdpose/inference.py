"""Batched prediction over a split and per-stage evaluation: the one code path behind the evaluate
stage and the training loop's per-epoch validation.

Legend: S stage outputs, N samples (one per box), J joints, A ground-truth annotations, H x W
heatmap pixels; points are (x, y), in frame pixels unless named `hm_*` (heatmap pixels); sizes
are (w, h); stages are 1-based (`model.output_stages`).

    preds = predict(model, dataset)                                  # every stage output
    metrics = evaluate_predictions(preds, "data/prepared/test_gt.json", BABYPOSE12)
    metrics["stage4"]["AP"], metrics["stage3"]["hmPCK50"]
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
heatmap is built in the detection crop, with the dataset's codec). The original accumulated
`accuracy()` per batch; here it is computed over the whole split at once (batch-size independent;
same definition otherwise).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from okdpose.codec import decode_heatmaps, encode_heatmaps, flip_back, get_max_preds
from okdpose.data.transforms import PIXEL_STD, affine_points, get_affine_transform
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


# --------------------------------------------------------------------------- prediction

@dataclass
class Predictions:
    """Decoded keypoints of every stage output for N boxes (rows follow the dataset order)."""

    image_ids: np.ndarray      # (N,) int64
    ann_ids: np.ndarray        # (N,) int64 annotation id of a ground-truth box; -1 for detections / unknown
    indices: np.ndarray        # (N,) dataset index of each row
    scores: np.ndarray         # (N,) box scores (1 for ground-truth boxes)
    areas: np.ndarray          # (N,) prod(scale * 200), the original's OKS-NMS area
    centers: np.ndarray        # (N, 2) crop centre, frame px
    scales: np.ndarray         # (N, 2) crop size / 200
    stages: tuple[int, ...]    # (S,) 1-based stage of each output
    coords: np.ndarray         # (S, N, J, 2) frame px (argmax, quarter-pixel refinement, inverse affine)
    maxvals: np.ndarray        # (S, N, J) heatmap peak values
    hm_coords: np.ndarray      # (S, N, J, 2) integer argmax of the (flip-averaged) heatmaps, heatmap px
    hm_target: np.ndarray      # (N, J, 2) integer argmax of the target heatmaps (0, 0 when none)
    image_size: tuple[int, int]
    heatmap_size: tuple[int, int]
    sigma: Optional[float]     # of the targets (None when the dataset does not say)
    flip_test: bool

    def __len__(self) -> int:
        return len(self.image_ids)

    def stage_index(self, stage: int) -> int:
        """Position of 1-based `stage` among the outputs."""
        if stage not in self.stages:
            raise KeyError(f"stage {stage} is not an output of this model (outputs: {list(self.stages)})")
        return self.stages.index(stage)

    def keypoints(self, stage: int) -> np.ndarray:
        """(N, J, 3) [x, y, maxval] of one stage."""
        s = self.stage_index(stage)
        return np.concatenate([self.coords[s], self.maxvals[s][..., None]], axis=-1)


def _base_dataset(dataset: Dataset) -> Any:
    """The dataset under any `Subset`s (its samples' meta `index` refers to it)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _outputs(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _fast_copy(model: nn.Module, fold_bn: bool) -> nn.Module:
    """The folded inference copy of an HRNet (eval mode), else the model itself."""
    from okdpose.model.fuse import inference_copy
    from okdpose.model.hrnet import HRNetTrunk

    return inference_copy(model) if fold_bn and isinstance(model, HRNetTrunk) else model


def predict(model: nn.Module, dataset: Dataset, *, batch_size: int = 32, device: str | torch.device | None = None,
            flip_test: bool = False, flip_perm: Sequence[int] | np.ndarray | None = None, workers: int = 0,
            progress: bool = False, fold_bn: bool = True) -> Predictions:
    """Run `model` on every sample of `dataset` (PoseDataset samples) and decode every stage output.

    Eval mode and no_grad (the model's train/eval mode is restored afterwards). An HRNet runs as
    `okdpose.model.fuse.inference_copy` (BN folded into the convs, channels-last on CPU: 1.2-1.5x
    faster by `python -m okdpose.bench`, same outputs up to float rounding as tests/test_fuse.py
    checks; `fold_bn=False` runs the model itself); CPU inputs go channels-last. `device`: where
    the model is (default: where its parameters are; inputs are moved there). Flip test averages
    each output with `flip_back` of the mirrored input's output (flip pairs swapped, one-column
    shift); `flip_perm` defaults to the dataset's `JointSpec.flip_permutation()`.
    """
    base = _base_dataset(dataset)
    dev = _model_device(model) if device is None else torch.device(device)
    if device is not None and dev.type != _model_device(model).type:
        raise ValueError(f"predict: device={device!r} but the model is on {_model_device(model)}; move the model "
                         "first (model.to(device)) or leave device unset")
    if flip_test:
        flip_perm = flip_perm if flip_perm is not None else getattr(base, "flip_perm", None)
        if flip_perm is None:
            raise ValueError("predict: flip_test needs flip_perm (JointSpec.flip_permutation())")
    if batch_size < 1:
        raise ValueError(f"predict: batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("predict: the dataset is empty")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=dev.type == "cuda")
    stages = tuple(getattr(model, "output_stages", ()))
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("image_id", "index", "score", "center", "scale", "tgt")}
    coords: list[list[np.ndarray]] = []
    maxvals: list[list[np.ndarray]] = []
    hm_coords: list[list[np.ndarray]] = []
    hm_size = None
    was_training = model.training
    model.eval()
    net = _fast_copy(model, fold_bn)
    try:
        with torch.no_grad():
            batches: Iterable = loader
            if progress:
                from tqdm import tqdm
                batches = tqdm(loader, desc="predict", unit="batch")
            for images, target, _, meta in batches:
                x = images.to(dev, non_blocking=True)
                if dev.type == "cpu":     # HRNet's convolutions run 2-5x faster channels-last on CPU
                    x = x.contiguous(memory_format=torch.channels_last)
                outs = _outputs(net(x))
                if flip_test:
                    flipped = _outputs(net(torch.flip(x, dims=[3])))
                    outs = [(o + flip_back(f, flip_perm)) * 0.5 for o, f in zip(outs, flipped)]
                if not stages:
                    stages = tuple(range(1, len(outs) + 1))
                if len(outs) != len(stages):
                    raise ValueError(f"predict: the model returned {len(outs)} outputs, its output_stages are {stages}")
                if not coords:
                    coords, maxvals, hm_coords = ([[] for _ in stages] for _ in range(3))
                center, scale = meta["center"].numpy(), meta["scale"].numpy()
                for s, out in enumerate(outs):
                    hm = out.detach().float().cpu().numpy()
                    xy, mv = decode_heatmaps(hm, center, scale)
                    coords[s].append(xy)
                    maxvals[s].append(mv)
                    hm_coords[s].append(get_max_preds(hm)[0])
                hm_size = (int(outs[0].shape[-1]), int(outs[0].shape[-2]))
                cols["tgt"].append(get_max_preds(target.numpy())[0])
                cols["image_id"].append(meta["image_id"].numpy())
                cols["index"].append(meta["index"].numpy())
                cols["score"].append(meta["score"].numpy())
                cols["center"].append(center)
                cols["scale"].append(scale)
    finally:
        model.train(was_training)
    c = {k: np.concatenate(v) for k, v in cols.items()}
    scales = c["scale"].astype(np.float64)
    records = getattr(base, "records", None)
    ann_ids = (np.asarray(records.ann_id)[c["index"]].astype(np.int64) if records is not None
               else np.full(len(c["index"]), -1, np.int64))
    image_size = tuple(getattr(base, "image_size", (int(images.shape[-1]), int(images.shape[-2]))))
    sigma = getattr(base, "sigma", None)
    return Predictions(
        image_ids=c["image_id"].astype(np.int64), ann_ids=ann_ids, indices=c["index"].astype(np.int64),
        scores=c["score"].astype(np.float64), areas=np.prod(scales * PIXEL_STD, axis=1),
        centers=c["center"].astype(np.float64), scales=scales, stages=stages,
        coords=np.stack([np.concatenate(a) for a in coords]), maxvals=np.stack([np.concatenate(a) for a in maxvals]),
        hm_coords=np.stack([np.concatenate(a) for a in hm_coords]), hm_target=c["tgt"],
        image_size=(int(image_size[0]), int(image_size[1])), heatmap_size=hm_size,
        sigma=float(sigma) if sigma is not None else None, flip_test=flip_test,
    )


# --------------------------------------------------------------------------- evaluation

@dataclass
class EvalReport:
    """Everything `evaluate_report` computed, keyed "stage{k}"."""

    metrics: dict[str, dict[str, float]]            # the flat metric keys (see the module docstring)
    per_joint: dict[str, dict[str, list[float]]]    # hmPCK50 / PCK{t} / err_*_px per joint (NaN: no ground truth)
    results: dict[str, list[dict]]                  # the COCO results that were evaluated (after rescoring / NMS)
    matches: dict[str, np.ndarray]                  # (A,) prediction row of each annotation, -1 when unmatched
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
                      sigmas: Sequence[float], by_id: bool) -> np.ndarray:
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


def _target_argmax(joints: np.ndarray, centers: np.ndarray, scales: np.ndarray, image_size: Sequence[int],
                   heatmap_size: Sequence[int], sigma: float, chunk: int = 256) -> np.ndarray:
    """Argmax (M, J, 2) of the target heatmaps the dataset would build for frame joints (M, J, 3) in the
    crops (center, scale): the same transform and codec as `PoseDataset`."""
    out = np.zeros(joints.shape[:2] + (2,), np.float32)
    for i in range(0, len(joints), chunk):
        sl = slice(i, i + chunk)
        trans = np.stack([get_affine_transform(c, s, 0.0, image_size) for c, s in zip(centers[sl], scales[sl])])
        kp = affine_points(joints[sl, :, :2], trans)
        target, _ = encode_heatmaps(kp, joints[sl, :, 2], image_size, heatmap_size, sigma)
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
    report = EvalReport({}, {}, {}, {}, anns)
    for si, stage in enumerate(preds.stages):
        name = f"stage{stage}"
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
        match = match_annotations(preds, stage, anns, considered if by_id else rows, sigmas, by_id)
        ok = match >= 0
        pred_xy = np.full(gt_kp.shape[:2] + (2,), np.nan)
        pred_xy[ok] = preds.coords[si][match[ok]]
        pcks = pck(pred_xy, gt_kp[..., :2], gt_kp[..., 2], gt_box, pck_thresholds)   # unmatched: NaN -> wrong
        err = pixel_error(pred_xy[ok], gt_kp[ok, :, :2], gt_kp[ok, :, 2])
        if by_id:        # the original validation: every crop against its own target heatmaps
            hm = heatmap_pck_from_coords(preds.hm_coords[si], preds.hm_target, preds.heatmap_size, HEATMAP_PCK_THR)
        else:
            if preds.sigma is None:
                raise ValueError("hmPCK50 with detection boxes needs the targets' sigma: predict on a PoseDataset")
            r = match[ok]
            tgt = _target_argmax(gt_kp[ok], preds.centers[r], preds.scales[r], preds.image_size,
                                 preds.heatmap_size, preds.sigma)
            hm = heatmap_pck_from_coords(preds.hm_coords[si][r], tgt, preds.heatmap_size, HEATMAP_PCK_THR)
        metrics = {k: coco[k] for k in COCO_KEYS}
        metrics[HEATMAP_PCK_KEY] = hm.mean
        metrics.update({pck_key(t): pcks[float(t)].mean for t in pck_thresholds})
        metrics["err_mean_px"], metrics["err_median_px"] = err["mean"], err["median"]
        report.metrics[name] = metrics
        report.per_joint[name] = {
            HEATMAP_PCK_KEY: hm.per_joint.tolist(),
            **{pck_key(t): pcks[float(t)].per_joint.tolist() for t in pck_thresholds},
            "err_mean_px": err["per_joint_mean"].tolist(), "err_median_px": err["per_joint_median"].tolist(),
        }
        report.results[name] = results
        report.matches[name] = match
    return report


def evaluate_predictions(preds: Predictions, gt_json: GroundTruth, spec: JointSpec, *, use_gt_bbox: bool = True,
                         pck_thresholds: Sequence[float] = (0.1, 0.2), oks_nms: bool = True, oks_thre: float = 0.9,
                         in_vis_thre: float = 0.2, image_thre: float = 0.0,
                         ground_truth: Optional[Mapping[str, Any]] = None) -> dict[str, dict[str, float]]:
    """{"stage{k}": {AP, AP50, AP75, APm, APl, AR, hmPCK50, PCK10, PCK20, err_mean_px, err_median_px}}.

    Per-joint values, the evaluated COCO results and the matches: `evaluate_report`.
    """
    return evaluate_report(preds, gt_json, spec, use_gt_bbox=use_gt_bbox, pck_thresholds=pck_thresholds,
                           oks_nms=oks_nms, oks_thre=oks_thre, in_vis_thre=in_vis_thre, image_thre=image_thre,
                           ground_truth=ground_truth).metrics


def evaluate_model(model: nn.Module, dataset: Dataset, gt_json: GroundTruth, spec: JointSpec, *,
                   batch_size: int = 32, device: str | torch.device | None = None, flip_test: bool = False,
                   workers: int = 0, progress: bool = False, **eval_kw: Any) -> tuple[dict[str, dict[str, float]], Predictions]:
    """`predict` then `evaluate_predictions` (keyword arguments go to the one that takes them)."""
    preds = predict(model, dataset, batch_size=batch_size, device=device, flip_test=flip_test,
                    flip_perm=spec.flip_permutation(), workers=workers, progress=progress)
    return evaluate_predictions(preds, gt_json, spec, use_gt_bbox=eval_kw.pop("use_gt_bbox", _uses_gt(dataset)),
                                **eval_kw), preds


def _uses_gt(dataset: Dataset) -> bool:
    return getattr(_base_dataset(dataset), "kind", "gt") == "gt"


# --------------------------------------------------------------------------- cost

def cpu_latency_ms(model: nn.Module, image_size: Sequence[int], repeats: int = 5, warmup: int = 1,
                   threads: int = 1) -> float:
    """Median wall time (ms) of a batch-1 eval forward pass on CPU with `threads` intra-op threads
    (restored afterwards), BN folded and channels-last as in `predict`; image_size (w, h).

    One thread by default: at batch 1 HRNet's many small ops make multi-thread timings depend on
    what else runs on the machine (10x swings on a shared 2-core box); one thread is reproducible.
    """
    x = torch.zeros(1, 3, int(image_size[1]), int(image_size[0])).contiguous(memory_format=torch.channels_last)
    was_training, old_threads = model.training, torch.get_num_threads()
    model.eval()
    torch.set_num_threads(threads)
    times = []
    try:
        net = _fast_copy(model, fold_bn=True)        # as `predict` runs it
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


def stage_latencies_ms(num_joints: int, width: int, n_stage: int, image_size: Sequence[int],
                       stages: Sequence[int] | None = None, repeats: int = 5, warmup: int = 1) -> dict[int, float]:
    """CPU batch-1 single-thread latency (`cpu_latency_ms`) of the model truncated after each stage
    (one head, random weights: the cost does not depend on them) -> {stage: ms}."""
    from okdpose.model import MultiOutHRNet

    out = {}
    for k in stages or range(1, n_stage + 1):
        out[int(k)] = cpu_latency_ms(MultiOutHRNet(num_joints, width, int(k), multi=False), image_size, repeats, warmup)
    return out


def stage_costs_table(model: nn.Module, image_size: Sequence[int], repeats: int = 5) -> dict[str, dict[str, float]]:
    """{"stage{k}": {params_M, gflops, latency_ms}} for each output of a MultiOutHRNet: the model
    truncated after stage k with one head (what deploying that output alone costs); FLOPs of a
    forward pass at image_size (w, h), CPU batch-1 single-thread median latency of `repeats` runs."""
    from okdpose.model import stage_costs

    cfg = model.config()
    costs = {c["stage"]: c for c in stage_costs(cfg["num_joints"], cfg["width"], cfg["n_stage"], tuple(image_size))}
    latency = stage_latencies_ms(cfg["num_joints"], cfg["width"], cfg["n_stage"], image_size,
                                 stages=model.output_stages, repeats=repeats)
    return {f"stage{k}": {"params_M": round(costs[k]["params"] / 1e6, 4), "gflops": round(costs[k]["flops"] / 1e9, 4),
                          "latency_ms": round(latency[k], 2)} for k in model.output_stages}


# --------------------------------------------------------------------------- tables and pictures

def per_joint_rows(report: EvalReport, spec: JointSpec) -> list[dict[str, Any]]:
    """Long table of the per-joint values: one row per (stage, joint), NaN where no ground truth."""
    return [{"stage": int(name[len("stage"):]), "joint": joint, "stage_joint": f"s{name[len('stage'):]} {joint}",
             **{k: v[j] for k, v in values.items()}}
            for name, values in report.per_joint.items() for j, joint in enumerate(spec.names)]


def pose_examples(dataset: Any, preds: Predictions, report: EvalReport, num: int) -> list[np.ndarray]:
    """Pictures (BGR uint8) of `num` evenly spaced annotations matched in the last stage: the model
    input crop with the ground truth under each stage's prediction, one tile per stage."""
    from okdpose.data.dataset import denormalize
    from okdpose.viz import compare_poses

    base = _base_dataset(dataset)
    last = report.matches[f"stage{preds.stages[-1]}"]
    anns = np.flatnonzero(last >= 0)
    if not num or not anns.size:
        return []
    pictures = []
    for a in anns[np.unique(np.linspace(0, len(anns) - 1, num).round().astype(int))]:
        row = int(last[a])
        gt = np.asarray(report.annotations[a]["keypoints"], np.float64).reshape(-1, 3)
        err = np.linalg.norm(preds.coords[:, row] - gt[None, :, :2], axis=-1)[:, gt[:, 2] > 0]      # (S, visible)
        trans = get_affine_transform(preds.centers[row], preds.scales[row], 0.0, preds.image_size)
        crop_gt = np.concatenate([affine_points(gt[:, :2], trans), gt[:, 2:]], axis=1)
        image = denormalize(base[int(preds.indices[row])][0])[..., ::-1]          # RGB -> BGR
        labels = [f"stage{k} {e.mean():.1f}px" if e.size else f"stage{k}" for k, e in zip(preds.stages, err)]
        pictures.append(compare_poses(image, crop_gt, [affine_points(c, trans) for c in preds.coords[:, row]],
                                      base.spec, labels, upscale=max(1, round(256 / preds.image_size[1]))))
    return pictures
