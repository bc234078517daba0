import numpy as np
import pytest

from okdpose.data.transforms import (affine_points, box_to_center_scale, crop, flip_joints, get_affine_transform,
                                     half_body_center_scale, sample_augmentation)
from okdpose.joints import BABYPOSE12


def test_box_to_center_scale_matches_the_original():
    c, s = box_to_center_scale([10, 20, 30, 80], 0.75)      # tall: widened to 60
    np.testing.assert_allclose(c, [25, 60])
    np.testing.assert_allclose(s, [60 / 200 * 1.25, 80 / 200 * 1.25])
    c, s = box_to_center_scale(np.array([[0, 0, 90, 40], [10, 20, 30, 80]]), 0.75)   # wide: heightened to 120
    np.testing.assert_allclose(s[0], [90 / 200 * 1.25, 120 / 200 * 1.25])
    assert c.shape == s.shape == (2, 2) and c.dtype == np.float32


def test_affine_is_the_official_similarity():
    center, scale, size = np.array([300.0, 200.0]), np.array([1.5, 2.0]), (48, 64)
    t = get_affine_transform(center, scale, 0.0, size)
    k = 48 / 300.0                                           # source width = scale[0] * 200
    np.testing.assert_allclose(t, [[k, 0, 24 - k * 300], [0, k, 32 - k * 200]], atol=1e-4)
    inv = get_affine_transform(center, scale, 0.0, size, inv=True)
    pts = np.array([[1.0, 2.0], [47.0, 63.0]])
    np.testing.assert_allclose(affine_points(affine_points(pts, inv), t), pts, atol=1e-4)


def test_rotation_turns_about_the_center():
    t = get_affine_transform([100.0, 100.0], [1.0, 1.0], 90.0, (200, 200))
    np.testing.assert_allclose(affine_points(np.array([[100.0, 100.0]]), t), [[100, 100]], atol=1e-4)
    # source point 50 px right of the centre ends up 50 px above it (rotation by +90 degrees)
    np.testing.assert_allclose(affine_points(np.array([[150.0, 100.0]]), t), [[100, 50]], atol=1e-4)


def test_affine_points_batched():
    ts = np.stack([get_affine_transform([50, 50], [1, 1], 0, (100, 100)), get_affine_transform([60, 40], [0.5, 0.5], 0, (100, 100))])
    pts = np.random.default_rng(0).random((2, 5, 2)) * 100
    out = affine_points(pts, ts)
    for b in range(2):
        np.testing.assert_allclose(out[b], affine_points(pts[b], ts[b]))


def test_crop_puts_the_center_pixel_at_the_output_center():
    img = np.zeros((480, 640), np.uint8)
    img[200, 300] = 255
    out = crop(img, [300.0, 200.0], [24 / 200, 32 / 200], (24, 32))   # 1:1 pixel scale
    assert np.unravel_index(out.argmax(), out.shape) == (16, 12)


def test_flip_joints_swaps_sides_and_keeps_absent_at_zero():
    j = np.zeros((12, 3), np.float32)
    j[0] = [10, 20, 2]       # right_hand
    j[5] = [100, 30, 1]      # left_hand
    f = flip_joints(j, 640, BABYPOSE12.flip_permutation())
    np.testing.assert_array_equal(f[5], [629, 20, 2])
    np.testing.assert_array_equal(f[0], [539, 30, 1])
    np.testing.assert_array_equal(f[1], [0, 0, 0])
    np.testing.assert_array_equal(flip_joints(f, 640, BABYPOSE12.flip_permutation()), j)


def test_half_body_uses_one_half_with_the_aspect():
    j = np.zeros((12, 3), np.float32)
    j[:6] = [[0, 0, 2], [10, 0, 2], [20, 0, 2], [30, 40, 2], [40, 40, 2], [50, 40, 2]]   # upper body
    j[6:, 2] = 0                                                                       # no lower body
    c, s = half_body_center_scale(j, BABYPOSE12.upper_body, 0.75, np.random.default_rng(0))
    np.testing.assert_allclose(c, [25, 20])
    np.testing.assert_allclose(s, [50 / 200 * 1.5, 50 / 0.75 / 200 * 1.5], rtol=1e-6)
    j[1:, 2] = 0                                                                       # one joint left
    assert half_body_center_scale(j, BABYPOSE12.upper_body, 0.75, np.random.default_rng(0)) is None


def test_augmentation_off_is_identity_and_flip_mirrors_the_center():
    j = np.ones((12, 3), np.float32) * 2
    c, s = np.array([100.0, 50.0], np.float32), np.array([1.0, 1.3], np.float32)
    kw = dict(upper_body=BABYPOSE12.upper_body, aspect_ratio=0.75, frame_width=640)
    a = sample_augmentation(np.random.default_rng(0), j, c, s, flip=False, rotation=0, scale_factor=0,
                            half_body_prob=0, **kw)
    assert a.rot == 0 and not a.flip
    np.testing.assert_array_equal(a.center, c)
    np.testing.assert_array_equal(a.scale, s)
    flips = [sample_augmentation(np.random.default_rng(i), j, c, s, flip=True, rotation=30, scale_factor=0.25,
                                 half_body_prob=0, **kw) for i in range(40)]
    flipped = [a for a in flips if a.flip]
    assert 0 < len(flipped) < 40
    np.testing.assert_allclose(flipped[0].center, [539.0, 50.0])
    assert all(0.75 <= a.scale[0] / s[0] <= 1.25 and abs(a.rot) <= 60 for a in flips)
    assert any(a.rot != 0 for a in flips) and any(a.rot == 0 for a in flips)


@pytest.mark.parametrize("shape", [(480, 640), (480, 640, 1), (480, 640, 3)])
def test_warp_keeps_channels(shape):
    img = np.full(shape, 7, np.uint8)
    out = crop(img, [320, 240], [1.0, 1.0], (24, 32))
    assert out.shape[:2] == (32, 24) and out.reshape(32, 24, -1).shape[2] == (shape[2] if len(shape) == 3 else 1)
