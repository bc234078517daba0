import numpy as np
import pytest
import torch

from okdpose.codec import HeatmapCodec, decode_heatmaps, encode_heatmaps, flip_back, get_max_preds, refine_quarter_pixel
from okdpose.geometry import affine_points, get_affine_transform
from okdpose.joints import BABYPOSE12


def design_heatmap():
    hm = np.zeros((1, 1, 64, 48), np.float32)
    hm[0, 0, 20, 10] = 1.0
    hm[0, 0, 20, 11], hm[0, 0, 20, 9] = 0.5, 0.2     # right > left
    hm[0, 0, 19, 10], hm[0, 0, 21, 10] = 0.3, 0.1    # up > down
    return hm


def test_design_decoding_vector():
    hm = design_heatmap()
    coords, maxvals = get_max_preds(hm)
    assert coords[0, 0].tolist() == [10.0, 20.0] and maxvals[0, 0] == 1.0
    assert refine_quarter_pixel(coords, hm)[0, 0].tolist() == [10.25, 19.75]
    frame, _ = decode_heatmaps(hm, np.array([[300.0, 200.0]]), np.array([[1.5, 2.0]]))
    np.testing.assert_allclose(frame[0, 0], [214.0625, 123.4375], atol=1e-4)


def test_no_refinement_at_the_border_and_zero_maps():
    hm = np.zeros((2, 2, 8, 8), np.float32)
    hm[0, 0, 1, 1], hm[0, 0, 1, 2] = 1.0, 0.5        # x = 1 is not > 1: no shift
    coords, maxvals = get_max_preds(hm)
    assert refine_quarter_pixel(coords, hm)[0, 0].tolist() == [1.0, 1.0]
    assert coords[1, 1].tolist() == [0.0, 0.0] and maxvals[1, 1] == 0.0     # empty map -> 0, as the original


def test_argmax_zeroes_non_positive_maps():
    hm = np.full((1, 2, 4, 5), -1.0)
    hm[0, 0, 3, 2] = 2.0
    xy, mx = get_max_preds(hm)
    np.testing.assert_array_equal(xy, [[[2, 3], [0, 0]]])
    np.testing.assert_array_equal(mx, [[2.0, -1.0]])


def _official_target(joints, vis, image_size, heatmap_size, sigma):
    """The official per-joint loop (JointsDataset.generate_target), for comparison."""
    J = len(joints)
    target = np.zeros((J, heatmap_size[1], heatmap_size[0]), np.float32)
    weight = (vis > 0).astype(np.float32)
    tmp = sigma * 3
    stride = np.array(image_size) / np.array(heatmap_size)
    for j in range(J):
        mu_x, mu_y = int(joints[j][0] / stride[0] + 0.5), int(joints[j][1] / stride[1] + 0.5)
        ul, br = [int(mu_x - tmp), int(mu_y - tmp)], [int(mu_x + tmp + 1), int(mu_y + tmp + 1)]
        if ul[0] >= heatmap_size[0] or ul[1] >= heatmap_size[1] or br[0] < 0 or br[1] < 0:
            weight[j] = 0
            continue
        size = 2 * tmp + 1
        x = np.arange(0, size, 1, np.float32)
        y = x[:, None]
        g = np.exp(-((x - size // 2) ** 2 + (y - size // 2) ** 2) / (2 * sigma ** 2))
        gx = max(0, -ul[0]), min(br[0], heatmap_size[0]) - ul[0]
        gy = max(0, -ul[1]), min(br[1], heatmap_size[1]) - ul[1]
        ix = max(0, ul[0]), min(br[0], heatmap_size[0])
        iy = max(0, ul[1]), min(br[1], heatmap_size[1])
        if weight[j] > 0.5:
            target[j, iy[0]:iy[1], ix[0]:ix[1]] = g[gy[0]:gy[1], gx[0]:gx[1]]
    return target, weight


@pytest.mark.parametrize("sigma", [1, 2])
def test_encode_matches_the_official_loop(sigma):
    rng = np.random.default_rng(0)
    # non-negative: the official int(x + 0.5) truncates toward 0 for negative x, we round (floor(x + 0.5))
    joints = rng.uniform([0, 0], [240, 310], (40, 2)).astype(np.float32)     # some partly or fully off the map
    vis = rng.integers(0, 3, 40)
    target, weight = encode_heatmaps(joints, vis, (192, 256), (48, 64), sigma)
    ref_t, ref_w = _official_target(joints, vis, (192, 256), (48, 64), sigma)
    assert 0 < ref_w.sum() < (vis > 0).sum()          # the draw covers joints that fall off the map
    np.testing.assert_array_equal(weight, ref_w)
    np.testing.assert_allclose(target, ref_t, atol=1e-6)
    assert target.dtype == np.float32 and target.shape == (40, 64, 48)


def test_encode_weights():
    kp = np.array([[40.0, 60.0], [40.0, 60.0], [-100.0, 60.0], [-6.0, 60.0]], np.float32)
    target, weight = encode_heatmaps(kp, np.array([2, 0, 1, 1]), (96, 128), (24, 32), 1.0)
    assert weight.tolist() == [1.0, 0.0, 0.0, 1.0]           # v = 0, far off-map -> 0; partly on the map -> 1
    assert target[0].max() == 1.0 and target[0, 15, 10] == 1.0
    assert target[1].max() == 0.0 and target[2].max() == 0.0
    assert 0 < target[3].max() < 1.0                          # only the Gaussian's tail lands on the map


def test_encode_decode_round_trip():
    rng = np.random.default_rng(1)
    center, scale = np.array([[320.0, 240.0]]), np.array([[1.2, 1.6]])
    image_size, heatmap_size = (96, 128), (24, 32)
    frame_pts = rng.uniform([220, 110], [420, 370], (12, 2))
    trans = get_affine_transform(center[0], scale[0], 0.0, image_size)
    target, weight = encode_heatmaps(affine_points(frame_pts, trans), np.full(12, 2), image_size, heatmap_size, 2.0)
    assert weight.all()
    coords, maxvals = decode_heatmaps(target[None], center, scale)
    hm_px = scale[0, 0] * 200 / heatmap_size[0]              # frame pixels per heatmap pixel
    assert np.abs(coords[0] - frame_pts).max() <= 0.5 * hm_px + 1e-3
    np.testing.assert_allclose(maxvals, 1.0)


def test_codec_round_trip_through_the_crop_and_its_checks():
    codec = HeatmapCodec((96, 128), (24, 32), 2.0)
    assert codec.stride == 4
    rng = np.random.default_rng(2)
    center, scale = np.array([[320.0, 240.0], [300.0, 260.0]]), np.array([[1.2, 1.6], [1.0, 4 / 3]])
    joints = np.concatenate([rng.uniform([240, 150], [400, 330], (2, 12, 2)), np.full((2, 12, 1), 2.0)], axis=-1)
    target, weight = codec.encode_frame(joints, center, scale)          # what a data set builds
    assert target.shape == (2, 12, 32, 24) and weight.all()
    frame, _ = codec.decode(target, center, scale)
    hm_px = scale[:, :1, None] * 200 / 24                               # frame px per heatmap px
    assert (np.abs(frame - joints[..., :2]) <= 0.5 * hm_px + 1e-3).all()
    crop, _ = codec.decode_crop(target)                                 # heatmap px * stride
    np.testing.assert_allclose(codec.crop_to_frame(crop, center, scale), frame, atol=1e-3)
    kept = codec.joints_to_crop(joints, center, scale)
    assert kept.shape == (2, 12, 3) and (kept[..., 2] == 2).all()
    np.testing.assert_allclose(kept[..., :2], codec.frame_to_crop(joints[..., :2], center, scale), atol=1e-4)
    np.testing.assert_allclose(codec.crop_px_per_frame_px(scale), 96 / (scale[:, 0] * 200))
    for image, heatmap in (((96, 128), (25, 32)), ((96, 128), (24, 16))):
        with pytest.raises(ValueError, match="same whole number"):
            HeatmapCodec(image, heatmap, 2.0)
    with pytest.raises(ValueError, match="sigma"):
        HeatmapCodec((96, 128), (24, 32), 0.0)


def test_flip_back_numpy_and_torch():
    rng = np.random.default_rng(2)
    hm = rng.random((2, 12, 8, 6)).astype(np.float32)
    perm = BABYPOSE12.flip_permutation()
    out = flip_back(hm, perm, shift=False)
    np.testing.assert_array_equal(out[:, 0], hm[:, 5, :, ::-1])           # right_hand <- mirrored left_hand
    np.testing.assert_array_equal(flip_back(out, perm, shift=False), hm)  # an involution
    shifted = flip_back(hm, perm)
    np.testing.assert_array_equal(shifted[..., 1:], out[..., :-1])
    np.testing.assert_array_equal(shifted[..., 0], out[..., 0])
    t = flip_back(torch.from_numpy(hm), perm)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), shifted)
