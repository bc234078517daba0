import contextlib
import io
import json

import numpy as np
import pytest

from okdpose.codec import get_max_preds
from okdpose.joints import BABYPOSE12
from okdpose.metrics import (
    COCO_STAT_NAMES,
    coco_keypoint_ap,
    heatmap_pck_from_coords,
    oks_iou,
    oks_nms,
    pck,
    pixel_error,
    rescore,
    rescore_and_nms,
    to_coco_results,
)

SIGMAS = BABYPOSE12.sigmas
J = BABYPOSE12.num_joints


def make_gt(n_images=8, seed=0):
    """A tiny BabyPose-like COCO keypoint file: one infant per 640x480 frame."""
    rng = np.random.default_rng(seed)
    images, anns, points = [], [], []
    for i in range(1, n_images + 1):
        x0, y0, w, h = rng.uniform(100, 250), rng.uniform(60, 150), 200.0, 250.0
        xy = np.stack([x0 + rng.uniform(0, w, J), y0 + rng.uniform(0, h, J)], axis=1)
        v = np.full(J, 2)
        if i == 2:
            v[4] = 0          # one unlabelled joint
        kp = np.concatenate([xy, v[:, None]], axis=1)
        images.append({"id": i, "file_name": f"{i:012d}.png", "width": 640, "height": 480})
        anns.append({"id": i, "image_id": i, "category_id": 3, "keypoints": kp.reshape(-1).tolist(),
                     "num_keypoints": int((v > 0).sum()), "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0})
        points.append(xy)
    gt = {"images": images, "annotations": anns, "categories": [BABYPOSE12.coco_category()]}
    return gt, np.stack(points)


def results_from(points, image_ids, noise=None):
    coords = points if noise is None else points + noise
    return to_coco_results(image_ids, coords, np.ones(points.shape[:2]), np.ones(len(points)), category_id=3)


# ------------------------------------------------------------------ COCO AP

def test_ap_is_one_when_predictions_equal_ground_truth():
    gt, points = make_gt()
    before = json.dumps(gt)
    stats = coco_keypoint_ap(gt, results_from(points, range(1, 9)), SIGMAS)
    assert list(stats) == list(COCO_STAT_NAMES)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR"] == pytest.approx(1.0)
    assert stats["AP50"] == pytest.approx(1.0) and stats["APl"] == pytest.approx(1.0)
    assert stats["APm"] == -1.0   # no medium-sized infants in this file
    assert json.dumps(gt) == before, "the ground-truth dict must not be modified"


def test_ap_drops_monotonically_with_noise():
    gt, points = make_gt()
    unit = np.random.default_rng(1).normal(size=points.shape)
    aps = [coco_keypoint_ap(gt, results_from(points, range(1, 9), s * unit), SIGMAS)["AP"] for s in (0, 2, 5, 10, 20, 40)]
    assert all(a >= b for a, b in zip(aps, aps[1:])), aps
    assert aps[0] == pytest.approx(1.0) and aps[-1] < 0.5 * aps[0]


def test_ap_equals_a_direct_pycocotools_run(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, points = make_gt(seed=3)
    noise = np.random.default_rng(2).normal(scale=20.0, size=points.shape)
    results = results_from(points, range(1, 9), noise)
    for r, s in zip(results, np.linspace(0.3, 0.9, len(results))):
        r["score"] = float(s)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(coco, coco.loadRes(str(tmp_path / "res.json")), "keypoints")
        ev.params.kpt_oks_sigmas = np.array(SIGMAS)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    direct = dict(zip(COCO_STAT_NAMES, ev.stats))
    ours = coco_keypoint_ap(tmp_path / "gt.json", tmp_path / "res.json", SIGMAS)
    assert ours == pytest.approx(direct, abs=1e-12)
    assert 0.05 < ours["AP"] < 0.99
    assert coco_keypoint_ap(gt, results, SIGMAS) == pytest.approx(direct, abs=1e-12)


def test_ap_prints_nothing(capsys):
    gt, points = make_gt(n_images=2)
    coco_keypoint_ap(gt, results_from(points, [1, 2]), SIGMAS)
    assert capsys.readouterr().out == ""


def test_ap_empty_results_and_bad_inputs():
    gt, points = make_gt(n_images=3)
    empty = coco_keypoint_ap(gt, [], SIGMAS)
    assert empty["AP"] == 0.0 and empty["AR"] == 0.0

    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_keypoint_ap(gt, results_from(points, [1, 2, 99]), SIGMAS)
    wrong_cat = results_from(points, [1, 2, 3])
    wrong_cat[0]["category_id"] = 1
    with pytest.raises(ValueError, match="category"):
        coco_keypoint_ap(gt, wrong_cat, SIGMAS)
    with pytest.raises(ValueError, match="sigmas"):
        coco_keypoint_ap(gt, results_from(points, [1, 2, 3]), SIGMAS[:-1])
    # the category comes from the ground truth when results have none
    no_cat = [{k: v for k, v in r.items() if k != "category_id"} for r in results_from(points, [1, 2, 3])]
    assert coco_keypoint_ap(gt, no_cat, SIGMAS)["AP"] == pytest.approx(1.0)


def test_to_coco_results_layout():
    coords = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2)
    maxvals = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    res = to_coco_results(np.array([7, 9]), coords, maxvals, np.array([0.8, 0.9]), category_id=3)
    assert res[0] == {"image_id": 7, "category_id": 3, "keypoints": [0, 1, 0.1, 2, 3, 0.2, 4, 5, 0.3], "score": 0.8}
    assert res[1]["keypoints"][-3:] == [10, 11, 0.6]
    json.dumps(res)   # plain Python types
    with pytest.raises(ValueError):
        to_coco_results([1], coords, maxvals, [0.8, 0.9], 3)


# ------------------------------------------------------------------ heatmap PCK (the original accuracy())

def original_accuracy(output, target, thr=0.5):
    """HRNet lib/core/evaluate.py accuracy(), written as its loops."""
    def max_preds(hm):
        n, j, h, w = hm.shape
        flat = hm.reshape(n, j, -1)
        idx, mx = flat.argmax(2), flat.max(2)
        p = np.stack([idx % w, idx // w], 2).astype(np.float32)
        return p * (mx > 0)[..., None]

    pred, tgt = max_preds(output), max_preds(target)
    h, w = output.shape[2:]
    norm = np.array([h, w]) / 10
    dists = np.zeros((pred.shape[1], pred.shape[0]))
    for n in range(pred.shape[0]):
        for c in range(pred.shape[1]):
            if tgt[n, c, 0] > 1 and tgt[n, c, 1] > 1:
                dists[c, n] = np.linalg.norm(pred[n, c] / norm - tgt[n, c] / norm)
            else:
                dists[c, n] = -1
    accs = []
    for c in range(pred.shape[1]):
        d = dists[c][dists[c] != -1]
        accs.append((d < thr).mean() if d.size else -1)
    valid = [a for a in accs if a >= 0]
    return accs, (sum(valid) / len(valid) if valid else 0), len(valid)


def peak_maps(points, h=64, w=48):
    """(N, J, H, W) maps with a single 1.0 at each (x, y); None -> an all-zero map (no peak)."""
    out = np.zeros((len(points), len(points[0]), h, w))
    for n, row in enumerate(points):
        for j, p in enumerate(row):
            if p is not None:
                out[n, j, p[1], p[0]] = 1.0
    return out


def heatmap_pck(pred, target):
    """The paper's PCK@0.5 on (N, J, H, W) heatmaps, as evaluation computes it: argmax, then HRNet `accuracy()`."""
    h, w = np.shape(pred)[2:]
    return heatmap_pck_from_coords(get_max_preds(pred)[0], get_max_preds(target)[0], (w, h))


def test_heatmap_pck_hand_made():
    target = peak_maps([[(10, 20), (10, 20), None, (1, 30)]])
    pred = peak_maps([[(13, 20), (10, 23), (5, 5), (1, 30)]])
    res = heatmap_pck(pred, target)
    # x offset 3: 3 / (H/10 = 6.4) = 0.47 < 0.5 correct; y offset 3: 3 / (W/10 = 4.8) = 0.625 wrong
    # joint 2 has no target peak and joint 3's target has x = 1 <= 1: both excluded
    np.testing.assert_array_equal(res.per_joint[:2], [1.0, 0.0])
    assert np.isnan(res.per_joint[2:]).all()
    assert res.mean == 0.5 and res.count == 2


def test_heatmap_pck_equals_original_loop():
    rng = np.random.default_rng(0)
    target = np.zeros((6, 5, 16, 12))
    target[:, :4] = rng.random((6, 4, 16, 12))           # joint 4: no peak anywhere
    pred = target + rng.normal(scale=0.4, size=target.shape)
    accs, avg, cnt = original_accuracy(pred, target)
    res = heatmap_pck(pred, target)
    np.testing.assert_allclose(np.where(np.isnan(res.per_joint), -1, res.per_joint), accs)
    assert res.mean == pytest.approx(avg) and res.count == cnt == 4


# ------------------------------------------------------------------ box PCK and pixel error

def _two_instances():
    gt = np.array([[[100.0, 100.0], [200.0, 200.0]], [[50.0, 50.0], [80.0, 80.0]]])
    # errors: inst0 joint0 10 px (6, 8), joint1 20 px; inst1 joint0 30 px, joint1 invisible (500 px)
    pred = gt + np.array([[[6.0, 8.0], [0.0, 20.0]], [[30.0, 0.0], [300.0, 400.0]]])
    visible = np.array([[2, 1], [2, 0]])
    return pred, gt, visible


def test_box_pck_hand_made():
    pred, gt, visible = _two_instances()
    boxes = np.array([[0, 0, 100, 50], [10, 10, 60, 100]])   # max side 100 for both
    res = pck(pred, gt, visible, boxes, thresholds=(0.1, 0.2))
    # t = 0.2 (20 px): joint0 10 ok, 30 no -> 0.5; joint1 20 <= 20 ok -> 1.0
    np.testing.assert_allclose(res[0.2].per_joint, [0.5, 1.0])
    assert res[0.2].mean == 0.75 and res[0.2].count == 2
    # t = 0.1 (10 px): joint0 10 <= 10 ok, 30 no -> 0.5; joint1 20 no -> 0.0
    np.testing.assert_allclose(res[0.1].per_joint, [0.5, 0.0])
    assert res[0.1].mean == 0.25
    # (w, h) sizes give the same result
    assert pck(pred, gt, visible, boxes[:, 2:], (0.2,))[0.2].mean == 0.75
    # a joint never visible is NaN and not averaged
    res = pck(pred, gt, np.array([[1, 0], [1, 0]]), boxes, (0.2,))[0.2]
    assert np.isnan(res.per_joint[1]) and res.mean == 0.5 and res.count == 1


def test_pixel_error_hand_made():
    pred, gt, visible = _two_instances()
    err = pixel_error(pred, gt, visible)
    assert err["mean"] == pytest.approx(20.0) and err["median"] == pytest.approx(20.0) and err["count"] == 3
    np.testing.assert_allclose(err["per_joint_mean"], [20.0, 20.0])
    np.testing.assert_allclose(err["per_joint_median"], [20.0, 20.0])
    err = pixel_error(pred[:1], gt[:1], np.array([[1, 1]]))
    assert err["mean"] == pytest.approx(15.0) and err["median"] == pytest.approx(15.0)
    none = pixel_error(pred, gt, np.zeros((2, 2)))
    assert none["count"] == 0 and np.isnan(none["mean"]) and np.isnan(none["per_joint_mean"]).all()


# ------------------------------------------------------------------ rescoring and OKS-NMS

def original_oks_iou(g, d, a_g, a_d, sigmas):
    """nms.py oks_iou (in_vis_thre None), as its loop."""
    var = (np.asarray(sigmas) * 2) ** 2
    out = np.zeros(d.shape[0])
    for n in range(d.shape[0]):
        dx, dy = d[n, 0::3] - g[0::3], d[n, 1::3] - g[1::3]
        e = (dx**2 + dy**2) / var / ((a_g + a_d[n]) / 2 + np.spacing(1)) / 2
        out[n] = np.sum(np.exp(-e)) / e.shape[0]
    return out


def _instance(rng, x0, y0):
    return np.concatenate([np.stack([x0 + rng.uniform(0, 150, J), y0 + rng.uniform(0, 200, J)], 1),
                           rng.uniform(0.3, 1.0, (J, 1))], axis=1)


def test_oks_iou_equals_original_loop():
    rng = np.random.default_rng(0)
    g = _instance(rng, 100, 100)
    d = np.stack([g + rng.normal(scale=s, size=g.shape) * [1, 1, 0] for s in (0.5, 5, 20, 80)])
    ours = oks_iou(g, d, 30000.0, np.array([30000.0, 25000, 40000, 10000]), SIGMAS)
    ref = original_oks_iou(g.reshape(-1), d.reshape(4, -1), 30000.0, np.array([30000.0, 25000, 40000, 10000]), SIGMAS)
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert ours[0] > 0.99 and np.all(np.diff(ours) < 0)


def test_oks_nms_removes_duplicate_keeps_distinct():
    rng = np.random.default_rng(1)
    a = _instance(rng, 100, 100)
    dup = a + np.r_[1.0, -1.0, 0.0]                 # 1 px away: OKS ~ 1
    b = _instance(rng, 400, 200)                    # another infant
    kpts = np.stack([dup, b, a])
    keep = oks_nms(kpts, np.array([0.8, 0.7, 0.9]), np.full(3, 150 * 200.0), thresh=0.9, sigmas=SIGMAS)
    np.testing.assert_array_equal(keep, [2, 1])     # best first; the duplicate of `a` is gone
    assert oks_nms(kpts[:0], np.zeros(0), np.zeros(0), 0.9, SIGMAS).size == 0


def test_rescore_and_nms_per_image():
    maxvals = np.array([[0.1, 0.5, 0.9], [0.1, 0.1, 0.15]])
    # mean of the joint scores above 0.2 times the box score; none above -> 0
    np.testing.assert_allclose(rescore(maxvals, np.array([0.5, 1.0]), 0.2), [0.35, 0.0])

    rng = np.random.default_rng(2)
    a = _instance(rng, 100, 100)
    kpts = np.stack([a, a + np.r_[0.5, 0.5, 0.0], a])    # rows 0, 1 in image 1; row 2 (same pose) in image 2
    keep, scores = rescore_and_nms([1, 1, 2], kpts, np.array([0.9, 1.0, 0.5]), np.full(3, 30000.0),
                                   SIGMAS, in_vis_thre=0.2, oks_thre=0.9)
    np.testing.assert_array_equal(keep, [1, 2])          # row 1 scores higher; NMS never crosses images
    kpt_score = kpts[0, :, 2][kpts[0, :, 2] > 0.2].mean()
    np.testing.assert_allclose(scores, np.array([0.9, 1.0, 0.5]) * kpt_score)
