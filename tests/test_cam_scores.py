import math

import numpy as np
import pytest

from okdpose.cam_scores import (box_mask, chance_scores, energy_in_box, joint_pointing, mean_scores,
                                pointing_chance, pointing_hit, pointing_radius, score_report, stage_table)
from okdpose.codec import HeatmapCodec
from okdpose.geometry import box_to_center_scale


def test_energy_in_box_on_hand_made_maps():
    cam = np.zeros((20, 10), np.float32)
    cam[5:8, 2:4] = 1.0
    assert energy_in_box(cam, (2, 5, 3, 7)) == 1.0          # box edges pass through pixel centres
    assert energy_in_box(cam, (2, 5, 2.9, 7)) == pytest.approx(0.5)
    assert energy_in_box(cam, (5, 0, 9, 19)) == 0.0
    assert math.isnan(energy_in_box(np.zeros((4, 4)), (0, 0, 3, 3)))
    assert box_mask((0, 0, 9, 19), (20, 10)).all()


def test_pointing_game_on_hand_made_maps():
    cam = np.zeros((40, 30), np.float32)
    cam[10, 20] = 1.0                                       # peak at (x, y) = (20, 10)
    joints = np.array([[21.0, 12.0, 2], [5.0, 5.0, 2], [20.0, 10.0, 1]])
    assert pointing_hit(cam, joints, radius=3.0) is True     # 2.24 px from the first joint
    assert pointing_hit(cam, joints, radius=2.0) is False
    assert pointing_hit(cam, joints[1:], radius=3.0) is False   # the occluded joint on the peak is not used
    assert pointing_hit(cam, joints[1:], radius=3.0, min_visibility=1) is True
    assert pointing_hit(cam, joints[2:], radius=3.0) is None    # no visible joint
    assert pointing_hit(np.zeros_like(cam), joints, radius=3.0) is None
    chance = pointing_chance((100, 100), np.array([[50.0, 50.0, 2]]), radius=10.0)
    assert chance == pytest.approx(math.pi * 100 / 100 ** 2, rel=0.02)


def test_pointing_radius_and_the_crop_geometry_the_scores_get():
    codec = HeatmapCodec((48, 64), (12, 16), sigma=2.0)
    box = np.array([[100.0, 50.0, 120.0, 160.0]])           # aspect w/h 0.75 = the crop's
    center, scale = box_to_center_scale(box, 0.75)
    crop_box = codec.box_to_crop(box, center, scale)[0]
    np.testing.assert_allclose(crop_box, [24 - 24 / 1.25, 32 - 32 / 1.25, 24 + 24 / 1.25, 32 + 32 / 1.25], atol=1e-3)
    r = pointing_radius(box, codec.crop_px_per_frame_px(scale), 0.1)   # 0.1 * 160 frame px * (48 / 150) crop px per frame px
    np.testing.assert_allclose(r, [0.1 * 160 * 48 / (scale[0, 0] * 200)], rtol=1e-5)
    hm = np.zeros((1, 2, 16, 12), np.float32)
    hm[0, 0, 7, 5] = 1.0                                    # flat neighbours: no quarter-pixel shift
    hm[0, 1, 3, 9] = 1.0
    coords, maxvals = codec.decode_crop(hm)
    np.testing.assert_allclose(coords[0], [[20, 28], [36, 12]], atol=1e-3)   # heatmap px * 4
    np.testing.assert_allclose(maxvals[0], [1, 1])
    frame, _ = codec.decode(hm, center, scale)              # the same points through the frame
    np.testing.assert_allclose(codec.frame_to_crop(frame, center, scale), coords, atol=1e-3)


def test_joint_pointing_game_and_its_chance_level():
    maps = np.zeros((1, 2, 40, 30), np.float32)
    maps[0, 0, 10, 20] = 1.0                                # joint 0's map peaks 2.24 px from joint 0
    maps[0, 1, 10, 20] = 1.0                                # joint 1's map peaks on joint 0, far from joint 1
    joints = np.array([[[21.0, 12.0, 2], [5.0, 5.0, 2]]])
    hits, chance = joint_pointing(maps, joints, np.array([3.0]))
    np.testing.assert_array_equal(hits, [[1.0, 0.0]])
    assert chance[0, 0] == pytest.approx(29 / 1200)         # 29 pixel centres within 3 px, off no edge
    joints[0, 1, 2] = 0                                     # unlabelled: not scored
    hits, chance = joint_pointing(maps, joints, np.array([3.0]))
    assert math.isnan(hits[0, 1]) and math.isnan(chance[0, 1])
    corner = np.array([[[0.0, 0.0, 2]]])                    # a disc at the corner is a quarter inside
    assert chance_scores((40, 30), np.array([[0, 0, 29, 39]]), corner, np.array([3.0]))["joint_pointing_game"][0, 0] \
        == pytest.approx(11 / 1200)


class Maps:                                               # what okdpose.keypoint_cam.MethodMaps holds
    def __init__(self, pose, joints=None, faith=None):
        self.pose, self.joints, self.faith = pose, joints, faith or {}


def test_score_report_per_stage_and_method_with_chance_and_a_stage_table():
    pose = np.zeros((2, 20, 10), np.float32)
    pose[:, 5, 5] = 1.0                                     # in the box, on joint 0
    joint_maps = np.zeros((2, 2, 20, 10), np.float32)
    joint_maps[:, 0, 5, 5] = joint_maps[:, 1, 5, 5] = 1.0   # joint 1's map misses joint 1
    boxes = np.array([[4, 4, 6, 6]] * 2, np.float32)
    joints = np.array([[[5, 5, 2], [9, 18, 2]]] * 2, np.float32)
    radius = np.array([1.5, 1.5])
    methods = {1: {"eigencam": Maps(pose, None, {"confidence_change": np.array([-0.5, -0.3])}),
                   "gradcam": Maps(pose, joint_maps, {"confidence_change": np.array([-0.1, np.nan]),
                                                      "joint_confidence_change": np.zeros((2, 2))})}}
    layers = {"stage1/feature": pose, "stage1/head": np.ones((2, 20, 10), np.float32), "extra/x.y": pose}
    summary, per_image = score_report(layers, methods, boxes, joints, radius)
    assert list(summary) == ["stage1", "extra", "chance", "images", "pointing_images"]
    assert list(summary["stage1"]) == ["eigencam", "gradcam", "eigencam_head"]
    assert summary["stage1"]["eigencam"] == {"energy_in_box": 1.0, "pointing_game": 1.0, "confidence_change": -0.4}
    g = summary["stage1"]["gradcam"]
    assert g["joint_pointing_game"] == 0.5 and g["confidence_change"] == -0.1 and g["joint_confidence_change"] == 0
    assert summary["stage1"]["eigencam_head"]["energy_in_box"] == pytest.approx(9 / 200, abs=1e-4)
    assert summary["extra"]["x.y"]["pointing_game"] == 1.0
    assert summary["chance"]["energy_in_box"] == pytest.approx(9 / 200, abs=1e-4)
    assert summary["images"] == 2 and summary["pointing_images"] == 2
    assert per_image["stage1"]["gradcam"]["confidence_change"] == [-0.1, None]
    assert per_image["stage1"]["gradcam"]["joint_pointing_game"] == [[1.0, 0.0], [1.0, 0.0]]
    rows = stage_table(summary)
    assert [(r["stage"], r["method"]) for r in rows] == [(1, "eigencam"), (1, "gradcam"), (1, "chance")]
    assert rows[0]["joint_pointing_game"] is None and rows[2]["confidence_change"] is None
    assert mean_scores({"a": np.array([np.nan, np.nan])}) == {"a": None}
