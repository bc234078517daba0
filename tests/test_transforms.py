import numpy as np

from okdpose.data.transforms import flip_joints, half_body_center_scale, sample_augmentation
from okdpose.joints import BABYPOSE12


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


