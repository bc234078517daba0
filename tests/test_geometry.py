"""okdpose.geometry: the official crop similarity, its inverse, rotation, batched application."""
import numpy as np
import pytest

from okdpose.geometry import (affine_points, box_to_center_scale, crop_image, crop_to_frame, crop_transforms,
                              frame_to_crop, get_affine_transform, scale_area)


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
    out = crop_image(img, [300.0, 200.0], [24 / 200, 32 / 200], (24, 32))   # 1:1 pixel scale
    assert np.unravel_index(out.argmax(), out.shape) == (16, 12)


def test_frame_crop_round_trip_single_and_batched_agree():
    rng = np.random.default_rng(1)
    center, scale = rng.random((3, 2)) * 300 + 100, rng.random((3, 2)) + 0.5
    pts = rng.random((3, 5, 2)) * 400
    crop = frame_to_crop(pts, center, scale, (48, 64))
    for b in range(3):                  # a single crop takes the 2-D path, a batch the stacked one
        np.testing.assert_allclose(frame_to_crop(pts[b], center[b], scale[b], (48, 64)), crop[b], rtol=1e-12)
    np.testing.assert_allclose(crop_to_frame(crop, center, scale, (48, 64)), pts, atol=1e-3)
    assert crop_transforms(center, scale, (48, 64)).shape == (3, 2, 3)


def test_scale_area_is_the_source_box_area():
    np.testing.assert_allclose(scale_area(np.array([[1.5, 2.0]])), [1.5 * 200 * 2.0 * 200])


@pytest.mark.parametrize("shape", [(480, 640), (480, 640, 1), (480, 640, 3)])
def test_warp_keeps_channels(shape):
    img = np.full(shape, 7, np.uint8)
    out = crop_image(img, [320, 240], [1.0, 1.0], (24, 32))
    assert out.shape[:2] == (32, 24) and out.reshape(32, 24, -1).shape[2] == (shape[2] if len(shape) == 3 else 1)
