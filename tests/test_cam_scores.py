import math

import numpy as np
import pytest

from okdpose.cam_scores import box_mask, cam_scores, energy_in_box, pointing_chance, pointing_hit, pointing_radius
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


def test_cam_scores_average_over_images_with_baselines():
    maps = np.zeros((2, 20, 10), np.float32)
    maps[0, 5, 5] = 1.0                                     # in the box, on the joint
    maps[1, 15, 2] = 1.0                                    # outside the box, far from the joint
    boxes = np.array([[4, 4, 6, 6], [4, 4, 6, 6]], np.float32)
    joints = np.array([[[5, 5, 2]], [[5, 5, 2]]], np.float32)
    s = cam_scores({"stage1/feature": maps}, boxes, joints, np.array([1.5, 1.5]))
    assert s["stage1"]["feature"] == {"energy_in_box": 0.5, "pointing_game": 0.5}
    assert s["baseline"]["energy_in_box"] == pytest.approx(9 / 200, abs=1e-4)
    assert s["baseline"]["pointing_game"] == pytest.approx(9 / 200, abs=1e-4)   # 3x3 pixels within 1.5 px
    assert s["images"] == 2 and s["pointing_images"] == 2


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
