import json

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from okdpose.codec import HeatmapCodec, get_max_preds
from okdpose.data.coco import load_records
from okdpose.data.dataset import PoseDataset
from okdpose.evaluation import (
    METRIC_KEYS,
    evaluate_model,
    evaluate_predictions,
    evaluate_report,
    per_joint_rows,
)
from okdpose.inference import Predictions
from okdpose.joints import BABYPOSE12
from okdpose.model import MultiOutHRNet

from conftest import TINY_IMAGE_SIZE

SPEC = BABYPOSE12
J = SPEC.num_joints
CODEC = HeatmapCodec(TINY_IMAGE_SIZE, (TINY_IMAGE_SIZE[0] // 4, TINY_IMAGE_SIZE[1] // 4), 1.0)


# ------------------------------------------------------------------ ground truth of the tiny split

def gt_predictions(prepared, split="test", noise=None):
    """Predictions equal to the ground truth of `split` (plus `noise` (N, J, 2) px), one stage."""
    r = load_records(prepared, split, "gt")
    n = len(r)
    ds = PoseDataset(prepared, split, SPEC, CODEC)
    targets = np.stack([ds[i][1].numpy() for i in range(n)])
    hm_target = get_max_preds(targets)[0]
    coords = r.joints[None, :, :, :2].astype(np.float64) + (0 if noise is None else noise[None])
    return Predictions(
        image_ids=r.image_id, ann_ids=r.ann_id, indices=np.arange(n), scores=np.ones(n), areas=np.prod(r.scale * 200, 1),
        centers=r.center.astype(np.float64), scales=r.scale.astype(np.float64), stages=(4,), coords=coords,
        maxvals=np.ones((1, n, J)), hm_coords=hm_target[None].copy(), hm_target=hm_target,
        codec=ds.codec, flip_test=False)


def test_metrics_are_perfect_when_predictions_equal_ground_truth(tiny_prepared):
    preds = gt_predictions(tiny_prepared)
    metrics = evaluate_predictions(preds, tiny_prepared / "test_gt.json", SPEC)
    assert list(metrics) == [4]
    m = metrics[4]
    assert tuple(m) == METRIC_KEYS
    for key in ("AP", "AP50", "AP75", "AR", "hmPCK50", "PCK10", "PCK20"):
        assert m[key] == pytest.approx(1.0), key
    assert m["err_mean_px"] == pytest.approx(0.0, abs=1e-4) and m["err_median_px"] == pytest.approx(0.0, abs=1e-4)


def test_ap_and_pck_drop_monotonically_with_noise(tiny_prepared):
    n = len(load_records(tiny_prepared, "test", "gt"))
    direction = np.random.default_rng(0).normal(size=(n, J, 2))
    gt = json.loads((tiny_prepared / "test_gt.json").read_text())
    rows = [evaluate_predictions(gt_predictions(tiny_prepared, noise=direction * s), None, SPEC, ground_truth=gt)[4]
            for s in (0.0, 2.0, 6.0, 20.0, 60.0)]
    for key in ("AP", "AR", "PCK10", "PCK20"):
        values = [r[key] for r in rows]
        assert all(a >= b for a, b in zip(values, values[1:])), (key, values)
        assert values[0] == pytest.approx(1.0) and values[-1] < 0.5, (key, values)
    errors = [r["err_mean_px"] for r in rows]
    assert errors == sorted(errors) and errors[-1] > errors[1] > 0


def test_detection_boxes_rescoring_nms_and_matching(tiny_prepared):
    """Every detection box (true and false positives) predicts its frame's ground truth: OKS-NMS
    keeps one per frame, so AP is 1; a low image_thre-filtered frame loses its predictions."""
    gt = json.loads((tiny_prepared / "test_gt.json").read_text())
    det = load_records(tiny_prepared, "test", "det")
    ds = PoseDataset(tiny_prepared, "test", SPEC, CODEC, use_gt_bbox=False)
    joints = {a["image_id"]: np.reshape(a["keypoints"], (J, 3))[:, :2] for a in gt["annotations"]}
    n = len(det)
    preds = Predictions(
        image_ids=det.image_id, ann_ids=det.ann_id, indices=np.arange(n), scores=det.score.astype(np.float64),
        areas=np.prod(det.scale * 200, 1), centers=det.center.astype(np.float64), scales=det.scale.astype(np.float64),
        stages=(2,), coords=np.stack([joints[i] for i in det.image_id])[None], maxvals=np.ones((1, n, J)),
        hm_coords=np.zeros((1, n, J, 2)), hm_target=np.zeros((n, J, 2)), codec=ds.codec, flip_test=False)
    report = evaluate_report(preds, gt, SPEC, use_gt_bbox=False)
    m = report.metrics[2]
    assert m["AP"] == pytest.approx(1.0) and m["PCK20"] == pytest.approx(1.0) and m["err_mean_px"] == pytest.approx(0.0)
    assert len(report.results[2]) == len(gt["images"]) <= n       # one kept per frame
    assert (report.matches[2] >= 0).all()
    # no detection above image_thre: nothing predicted, nothing matched
    none = evaluate_predictions(preds, gt, SPEC, use_gt_bbox=False, image_thre=2.0)[2]
    assert none["AP"] == 0.0 and none["PCK20"] == 0.0


# ------------------------------------------------------------------ PCK definitions, hand-made

def one_instance_gt(box=(100.0, 50.0, 100.0, 200.0)):
    xy = np.stack([np.linspace(120, 180, J), np.linspace(80, 220, J)], 1)
    v = np.full(J, 2.0)
    v[3] = 0.0                                   # unlabelled: ignored by PCK and error
    kp = np.concatenate([xy * (v[:, None] > 0), v[:, None]], 1)
    gt = {"images": [{"id": 7, "width": 640, "height": 480, "file_name": "7.png"}],
          "annotations": [{"id": 70, "image_id": 7, "category_id": SPEC.category_id, "iscrowd": 0,
                           "keypoints": kp.reshape(-1).tolist(), "num_keypoints": J - 1, "bbox": list(box),
                           "area": box[2] * box[3]}],
          "categories": [SPEC.coco_category()]}
    return gt, kp


def test_pck_and_pixel_error_hand_made():
    gt, kp = one_instance_gt()                   # box 100 x 200: PCK@0.1 radius 20 px, @0.2 40 px
    coords = kp[None, None, :, :2].copy()
    coords[0, 0, 0, 0] += 15                     # correct at 0.1 and 0.2
    coords[0, 0, 1, 1] += 25                     # wrong at 0.1, correct at 0.2
    coords[0, 0, 2] += (30, 40)                  # 50 px: wrong at both
    coords[0, 0, 3] += 1000                      # unlabelled joint: not counted
    hm_target = np.full((1, J, 2), 10.0)
    hm_coords = hm_target[None].copy()           # 48x64 heatmaps: x is normalised by H/10 = 6.4, y by W/10 = 4.8 (sic)
    hm_coords[0, 0, 0, 0] += 3.0                 # 0.47 < 0.5: correct
    hm_coords[0, 0, 1, 0] += 3.3                 # 0.52: wrong
    hm_coords[0, 0, 2, 1] += 2.3                 # 0.48: correct
    hm_coords[0, 0, 4, 1] += 2.5                 # 0.52: wrong
    preds = Predictions(
        image_ids=np.array([7]), ann_ids=np.array([70]), indices=np.array([0]), scores=np.ones(1),
        areas=np.ones(1) * 40000, centers=np.array([[150.0, 150.0]]), scales=np.array([[1.0, 1.33]]), stages=(3,),
        coords=coords, maxvals=np.ones((1, 1, J)), hm_coords=hm_coords, hm_target=hm_target,
        codec=HeatmapCodec((192, 256), (48, 64), 2.0), flip_test=False)
    report = evaluate_report(preds, gt, SPEC, pck_thresholds=(0.1, 0.2, 0.24))
    m = report.metrics[3]
    assert m["PCK10"] == pytest.approx(9 / 11) and m["PCK20"] == pytest.approx(10 / 11)
    assert m["PCK24"] == pytest.approx(10 / 11)      # 50 px > 0.24 * 200
    assert m["hmPCK50"] == pytest.approx(10 / 12)    # heatmap PCK counts every joint whose target peak exists
    assert m["err_mean_px"] == pytest.approx((15 + 25 + 50) / 11)
    assert m["err_median_px"] == pytest.approx(0.0)
    per = report.per_joint[3]
    assert per["PCK10"][:3] == [1.0, 0.0, 0.0] and np.isnan(per["PCK10"][3])
    assert per["hmPCK50"][:5] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert per["err_mean_px"][2] == pytest.approx(50.0)
    rows = per_joint_rows(report, SPEC)                # the long table: one row per (stage, joint)
    assert len(rows) == J and rows[0]["stage"] == 3 and rows[0]["stage_joint"] == f"s3 {SPEC.names[0]}"
    assert rows[2]["err_mean_px"] == pytest.approx(50.0) and np.isnan(rows[3]["PCK10"])


def test_ground_truth_of_another_joint_spec_is_refused(tiny_prepared):
    from okdpose.joints import COCO17
    preds = gt_predictions(tiny_prepared)
    with pytest.raises(ValueError, match="data.joints"):
        evaluate_predictions(preds, tiny_prepared / "test_gt.json", COCO17)
    with pytest.raises(FileNotFoundError, match="preprocess"):
        evaluate_predictions(preds, tiny_prepared / "nope.json", SPEC)


# ------------------------------------------------------------------ a real (tiny) model

def test_evaluate_model_every_stage_and_subsets(tiny_prepared):
    torch.manual_seed(0)
    model = MultiOutHRNet(J, width=2, n_stage=2, multi=True)
    ds = PoseDataset(tiny_prepared, "test", SPEC, CODEC)
    metrics, preds = evaluate_model(model, ds, tiny_prepared / "test_gt.json", SPEC, batch_size=2, flip_test=True)
    assert list(metrics) == [1, 2]
    assert all(tuple(m) == METRIC_KEYS for m in metrics.values())
    assert preds.coords.shape == (2, len(ds), J, 2) and preds.flip_test
    assert (preds.ann_ids >= 0).all()
    assert model.training                       # a fresh model trains; predict restored that
    # a Subset: its rows are matched to their annotations by id (the boxes of the PoseDataset under it)
    sub, sub_preds = evaluate_model(model, Subset(ds, [2, 0]), tiny_prepared / "test_gt.json", SPEC, flip_test=True)
    assert list(sub) == [1, 2] and sub_preds.ann_ids.tolist() == [int(ds.records.ann_id[2]), int(ds.records.ann_id[0])]
