import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from okdpose.data.coco import load_records
from okdpose.data.dataset import PoseDataset
from okdpose.inference import (
    METRIC_KEYS,
    Predictions,
    evaluate_model,
    evaluate_predictions,
    evaluate_report,
    predict,
    stage_latencies_ms,
)
from okdpose.joints import BABYPOSE12
from okdpose.model import MultiOutHRNet

from conftest import TINY_IMAGE_SIZE

SPEC = BABYPOSE12
J = SPEC.num_joints
HM_SIZE = (TINY_IMAGE_SIZE[0] // 4, TINY_IMAGE_SIZE[1] // 4)


# ------------------------------------------------------------------ stubs

class StubDataset(Dataset):
    """PoseDataset-shaped samples with chosen images, boxes and ids (targets all zero)."""

    def __init__(self, images, centers, scales, hm_size, image_ids=None):
        self.images, self.centers, self.scales, self.hm_size = images, centers, scales, hm_size
        self.image_ids = image_ids if image_ids is not None else list(range(1, len(images) + 1))
        self.flip_perm = SPEC.flip_permutation()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        w, h = self.hm_size
        meta = {"image_id": self.image_ids[i], "index": i, "center": np.asarray(self.centers[i], np.float32),
                "scale": np.asarray(self.scales[i], np.float32), "score": 1.0}
        return torch.as_tensor(self.images[i]), torch.zeros(J, h, w), torch.ones(J), meta


class FixedModel(nn.Module):
    """Returns the same heatmaps for every input, for `n` stage outputs."""

    def __init__(self, heatmaps, n=1):
        super().__init__()
        self.hm = torch.as_tensor(heatmaps, dtype=torch.float32)
        self.output_stages = tuple(range(1, n + 1))
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return [self.hm.expand(x.shape[0], -1, -1, -1).clone() for _ in self.output_stages]


class MirrorModel(nn.Module):
    """Heatmaps = 4x average pool of channel 0, right joints see the image's left half, left joints
    the right half: model(flip(x)) = flip(model(x)) with left/right joints swapped."""

    output_stages = (4,)

    def forward(self, x):
        pooled = nn.functional.avg_pool2d(x[:, :1], 4)                  # (B, 1, H/4, W/4)
        w = pooled.shape[-1]
        left_half = torch.arange(w) < w // 2
        mask = torch.stack([left_half if SPEC.names[j].startswith("right") else ~left_half for j in range(J)])
        return [pooled * mask[None, :, None, :].float()]


# ------------------------------------------------------------------ decoding and flip test

def test_decoding_vector_through_predict():
    """DESIGN §4: peak (10, 20), right .5 > left .2, up .3 > down .1 -> (10.25, 19.75) heatmap px ->
    (214.0625, 123.4375) with center (300, 200), scale (1.5, 2.0) on 48x64 heatmaps."""
    hm = np.zeros((J, 64, 48), np.float32)
    hm[:, 20, 10], hm[:, 20, 11], hm[:, 20, 9], hm[:, 19, 10], hm[:, 21, 10] = 1.0, 0.5, 0.2, 0.3, 0.1
    ds = StubDataset([np.zeros((3, 256, 192), np.float32)] * 3, [(300, 200)] * 3, [(1.5, 2.0)] * 3, (48, 64))
    model = FixedModel(hm, n=2)
    model.train()
    preds = predict(model, ds, batch_size=2)
    assert model.training                       # mode restored
    assert preds.stages == (1, 2) and preds.coords.shape == (2, 3, J, 2)
    np.testing.assert_allclose(preds.coords, np.broadcast_to([214.0625, 123.4375], (2, 3, J, 2)), atol=1e-4)
    np.testing.assert_allclose(preds.maxvals, 1.0)
    np.testing.assert_array_equal(preds.hm_coords[..., 0], 10)
    np.testing.assert_array_equal(preds.hm_coords[..., 1], 20)
    np.testing.assert_allclose(preds.areas, 1.5 * 2.0 * 200 * 200)
    assert preds.image_ids.tolist() == [1, 2, 3] and preds.ann_ids.tolist() == [-1, -1, -1]


def symmetric_image(h=64, w=32, col=8, row=28):
    """A left-right symmetric image: two bright 4x4 blocks on the pooling grid, mirrored."""
    img = np.zeros((3, h, w), np.float32)
    img[:, row:row + 4, col:col + 4] = 1.0
    img[:, row:row + 4, w - col - 4:w - col] = 1.0
    assert np.array_equal(img, img[:, :, ::-1])
    return img


def test_flip_test_on_a_symmetric_input_gives_the_known_quarter_pixel_shift():
    center, scale = (300.0, 200.0), (0.8, 1.6)
    ds = StubDataset([symmetric_image()], [center], [scale], (8, 16))
    model = MirrorModel()
    plain = predict(model, ds)
    flipped = predict(model, ds, flip_test=True)
    # plain: right joints peak at heatmap column 2, left ones at 5, row 7, no refinement (zero neighbours)
    right = np.array([n.startswith("right") for n in SPEC.names])
    np.testing.assert_array_equal(plain.hm_coords[0, 0, right, 0], 2)
    np.testing.assert_array_equal(plain.hm_coords[0, 0, ~right, 0], 5)
    # flip test: flip_back (mirror, swap pairs, shift one column) puts each joint's peak one column
    # right of the plain one; the average (0.5 | 0.5) decodes a quarter pixel right of the plain peak
    frame_px_per_hm_px = scale[0] * 200 / 8
    np.testing.assert_allclose(flipped.coords - plain.coords,
                               np.broadcast_to([0.25 * frame_px_per_hm_px, 0.0], plain.coords.shape), atol=1e-4)
    np.testing.assert_allclose(flipped.maxvals, plain.maxvals * 0.5)
    # without swapping the flip pairs, each joint would average with its mirror image's peak
    wrong = predict(model, ds, flip_test=True, flip_perm=np.arange(J))
    assert not np.allclose(wrong.coords, flipped.coords)


def test_flip_test_needs_a_permutation():
    ds = StubDataset([symmetric_image()], [(300, 200)], [(0.8, 1.6)], (8, 16))
    ds.flip_perm = None
    with pytest.raises(ValueError, match="flip_perm"):
        predict(MirrorModel(), ds, flip_test=True)


# ------------------------------------------------------------------ ground truth of the tiny split

def gt_predictions(prepared, split="test", noise=None):
    """Predictions equal to the ground truth of `split` (plus `noise` (N, J, 2) px), one stage."""
    r = load_records(prepared, split, "gt")
    n = len(r)
    ds = PoseDataset(prepared, split, SPEC, TINY_IMAGE_SIZE, HM_SIZE, 1.0)
    targets = np.stack([ds[i][1].numpy() for i in range(n)])
    from okdpose.codec import get_max_preds
    hm_target = get_max_preds(targets)[0]
    coords = r.joints[None, :, :, :2].astype(np.float64) + (0 if noise is None else noise[None])
    return Predictions(
        image_ids=r.image_id, ann_ids=r.ann_id, indices=np.arange(n), scores=np.ones(n), areas=np.prod(r.scale * 200, 1),
        centers=r.center.astype(np.float64), scales=r.scale.astype(np.float64), stages=(4,), coords=coords,
        maxvals=np.ones((1, n, J)), hm_coords=hm_target[None].copy(), hm_target=hm_target,
        image_size=TINY_IMAGE_SIZE, heatmap_size=HM_SIZE, sigma=1.0, flip_test=False)


def test_metrics_are_perfect_when_predictions_equal_ground_truth(tiny_prepared):
    preds = gt_predictions(tiny_prepared)
    metrics = evaluate_predictions(preds, tiny_prepared / "test_gt.json", SPEC)
    assert list(metrics) == ["stage4"]
    m = metrics["stage4"]
    assert tuple(m) == METRIC_KEYS
    for key in ("AP", "AP50", "AP75", "AR", "hmPCK50", "PCK10", "PCK20"):
        assert m[key] == pytest.approx(1.0), key
    assert m["err_mean_px"] == pytest.approx(0.0, abs=1e-4) and m["err_median_px"] == pytest.approx(0.0, abs=1e-4)


def test_ap_and_pck_drop_monotonically_with_noise(tiny_prepared):
    n = len(load_records(tiny_prepared, "test", "gt"))
    direction = np.random.default_rng(0).normal(size=(n, J, 2))
    gt = json.loads((tiny_prepared / "test_gt.json").read_text())
    rows = [evaluate_predictions(gt_predictions(tiny_prepared, noise=direction * s), None, SPEC, ground_truth=gt)["stage4"]
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
    ds = PoseDataset(tiny_prepared, "test", SPEC, TINY_IMAGE_SIZE, HM_SIZE, 1.0, use_gt_bbox=False)
    joints = {a["image_id"]: np.reshape(a["keypoints"], (J, 3))[:, :2] for a in gt["annotations"]}
    n = len(det)
    preds = Predictions(
        image_ids=det.image_id, ann_ids=det.ann_id, indices=np.arange(n), scores=det.score.astype(np.float64),
        areas=np.prod(det.scale * 200, 1), centers=det.center.astype(np.float64), scales=det.scale.astype(np.float64),
        stages=(2,), coords=np.stack([joints[i] for i in det.image_id])[None], maxvals=np.ones((1, n, J)),
        hm_coords=np.zeros((1, n, J, 2)), hm_target=np.zeros((n, J, 2)), image_size=ds.image_size,
        heatmap_size=ds.heatmap_size, sigma=ds.sigma, flip_test=False)
    report = evaluate_report(preds, gt, SPEC, use_gt_bbox=False)
    m = report.metrics["stage2"]
    assert m["AP"] == pytest.approx(1.0) and m["PCK20"] == pytest.approx(1.0) and m["err_mean_px"] == pytest.approx(0.0)
    assert len(report.results["stage2"]) == len(gt["images"]) <= n       # one kept per frame
    assert (report.matches["stage2"] >= 0).all()
    # no detection above image_thre: nothing predicted, nothing matched
    none = evaluate_predictions(preds, gt, SPEC, use_gt_bbox=False, image_thre=2.0)["stage2"]
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
        image_size=(192, 256), heatmap_size=(48, 64), sigma=2.0, flip_test=False)
    report = evaluate_report(preds, gt, SPEC, pck_thresholds=(0.1, 0.2, 0.24))
    m = report.metrics["stage3"]
    assert m["PCK10"] == pytest.approx(9 / 11) and m["PCK20"] == pytest.approx(10 / 11)
    assert m["PCK24"] == pytest.approx(10 / 11)      # 50 px > 0.24 * 200
    assert m["hmPCK50"] == pytest.approx(10 / 12)    # heatmap PCK counts every joint whose target peak exists
    assert m["err_mean_px"] == pytest.approx((15 + 25 + 50) / 11)
    assert m["err_median_px"] == pytest.approx(0.0)
    per = report.per_joint["stage3"]
    assert per["PCK10"][:3] == [1.0, 0.0, 0.0] and np.isnan(per["PCK10"][3])
    assert per["hmPCK50"][:5] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert per["err_mean_px"][2] == pytest.approx(50.0)


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
    ds = PoseDataset(tiny_prepared, "test", SPEC, TINY_IMAGE_SIZE, HM_SIZE, 1.0)
    metrics, preds = evaluate_model(model, ds, tiny_prepared / "test_gt.json", SPEC, batch_size=2, flip_test=True)
    assert list(metrics) == ["stage1", "stage2"]
    assert all(tuple(m) == METRIC_KEYS for m in metrics.values())
    assert preds.coords.shape == (2, len(ds), J, 2) and preds.flip_test
    assert (preds.ann_ids >= 0).all()
    assert model.training                       # a fresh model trains; predict restored that
    # a Subset keeps the annotation ids (rows map back to the records)
    sub = predict(model, Subset(ds, [2, 0]), flip_test=True)
    assert sub.ann_ids.tolist() == [int(ds.records.ann_id[2]), int(ds.records.ann_id[0])]
    np.testing.assert_allclose(sub.coords, preds.coords[:, [2, 0]], atol=1e-3)


def test_stage_latencies_cover_each_stage():
    lat = stage_latencies_ms(J, 2, 2, (32, 64), repeats=1, warmup=0)
    assert list(lat) == [1, 2] and all(v > 0 for v in lat.values())


def test_predict_runs_the_folded_copy_and_matches_the_model_itself(tiny_prepared, monkeypatch):
    torch.manual_seed(0)
    model = MultiOutHRNet(J, width=2, n_stage=2, multi=True)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):   # BNs that fold into something
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.running_var, 0.5, 2.0)
        nn.init.uniform_(bn.running_mean, -0.1, 0.1)
    ds = PoseDataset(tiny_prepared, "test", SPEC, TINY_IMAGE_SIZE, HM_SIZE, 1.0)
    import okdpose.model.fuse as fuse

    made = []
    real = fuse.inference_copy
    monkeypatch.setattr(fuse, "inference_copy", lambda m, **kw: made.append(m) or real(m, **kw))
    fast = predict(model, ds, batch_size=2)
    exact = predict(model, ds, batch_size=2, fold_bn=False)
    assert made == [model]                      # one copy per call, only with fold_bn
    assert not any(isinstance(m, nn.Identity) and n.endswith("bn1") for n, m in model.named_modules())
    np.testing.assert_allclose(fast.maxvals, exact.maxvals, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fast.coords, exact.coords, atol=1e-3)
