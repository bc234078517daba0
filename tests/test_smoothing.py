"""One Euro filter: the formula of Casiez et al. 2012, noise at rest, lag in motion, low-confidence points."""
from __future__ import annotations

import math

import numpy as np
import pytest

from okdpose.smoothing import OneEuroFilter, OneEuroParams, smooth_keypoints, smoothing_factor

FPS = 30.0


def reference_one_euro(ts, xs, min_cutoff, beta, d_cutoff):
    """Scalar One Euro filter written from the paper's pseudo-code (Casiez et al. 2012, Fig. 2 / the
    authors' reference implementation): first sample passes, derivative of the filtered signal."""
    def alpha(cutoff, te):
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / te)

    out, x_prev, dx_prev, t_prev = [], None, 0.0, None
    for t, x in zip(ts, xs):
        if x_prev is None:
            x_hat = x
        else:
            te = t - t_prev
            dx = (x - x_prev) / te
            dx_prev = alpha(d_cutoff, te) * dx + (1 - alpha(d_cutoff, te)) * dx_prev
            cutoff = min_cutoff + beta * abs(dx_prev)
            a = alpha(cutoff, te)
            x_hat = a * x + (1 - a) * x_prev
        out.append(x_hat)
        x_prev, t_prev = x_hat, t
    return np.array(out)


def test_alpha_is_the_papers():
    te, fc = 1 / FPS, 2.0
    assert smoothing_factor(te, fc) == pytest.approx(1 / (1 + (1 / (2 * math.pi * fc)) / te), rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.05, 1.0])
def test_matches_the_formula_on_every_coordinate(beta):
    rng = np.random.default_rng(0)
    ts = np.cumsum(rng.uniform(0.02, 0.05, 80))            # irregular sampling
    signal = np.cumsum(rng.normal(0, 3, (80, 4, 2)), axis=0)
    p = OneEuroParams(min_cutoff=1.3, beta=beta, d_cutoff=0.7)
    f = OneEuroFilter(p)
    got = np.stack([f(t, x) for t, x in zip(ts, signal)])
    for j in range(4):
        for c in range(2):
            ref = reference_one_euro(ts, signal[:, j, c], p.min_cutoff, p.beta, p.d_cutoff)
            np.testing.assert_allclose(got[:, j, c], ref, rtol=1e-12, atol=1e-9)   # float64 both ways


@pytest.mark.parametrize("beta, bound", [(0.0, 0.36), (OneEuroParams.beta, 0.5)])
def test_noise_on_a_still_point_is_reduced(beta, bound):
    rng = np.random.default_rng(1)
    n = 600
    ts = np.arange(n) / FPS
    noisy = 100.0 + rng.normal(0, 2.0, n)                   # 2 px jitter of a still joint
    kp = np.zeros((n, 1, 3))
    kp[:, 0, 0], kp[:, 0, 1], kp[:, 0, 2] = noisy, 50.0, 0.9
    out = smooth_keypoints(ts, kp, OneEuroParams(beta=beta))[30:, 0, 0]     # after the start-up
    ratio = out.std() / noisy[30:].std()
    # an EMA of alpha(1 Hz at 30 fps) = 0.173 keeps sqrt(a / (2 - a)) = 0.31 of white noise
    # (measured 0.29-0.33 over seeds 0-5); the default beta's speed term, fed by the jitter itself,
    # raises the cutoff at rest (measured 0.41-0.46)
    assert ratio < bound
    assert abs(out.mean() - 100.0) < 0.5


def test_lag_on_a_moving_point_is_bounded():
    speed = 200.0                                           # px/s, a fast limb movement
    ts = np.arange(90) / FPS
    kp = np.zeros((90, 1, 3))
    kp[:, 0, 0], kp[:, 0, 2] = speed * ts, 0.9
    moving = smooth_keypoints(ts, kp)[:, 0, 0]
    lag = (speed * ts - moving)[-30:].mean()
    # steady state on a ramp: lag L = speed / (2 pi fc) (the EMA's), where the speed estimate
    # (x - previous filtered x) / Te = speed + L / Te, so fc = min_cutoff + beta (speed + L fps):
    # 2 pi (1 + beta speed + beta fps L) L = speed, a quadratic in L
    p = OneEuroParams()
    a, b, c = p.beta * FPS, p.min_cutoff + p.beta * speed, -speed / (2 * math.pi)
    expected = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    assert lag == pytest.approx(expected, rel=0.02)
    assert lag < 3.0
    still = smooth_keypoints(ts, kp, OneEuroParams(beta=0.0))[:, 0, 0]     # no speed term: 1 Hz everywhere
    assert (speed * ts - still)[-30:].mean() > 5 * lag


def test_low_confidence_points_pass_through_and_leave_the_state():
    p = OneEuroParams()
    ts = np.arange(6) / FPS
    kp = np.zeros((6, 2, 3))
    kp[:, :, 0] = 10.0
    kp[:, :, 2] = 0.9
    kp[3, 1] = (500.0, 500.0, 0.05)                         # one wild, unconfident detection
    out = smooth_keypoints(ts, kp, p)
    np.testing.assert_array_equal(out[3, 1], kp[3, 1])      # left as predicted
    np.testing.assert_allclose(out[4:, 1, :2], 10.0 * np.array([1.0, 0.0]) * np.ones((2, 2)), atol=1e-12)
    np.testing.assert_array_equal(out[..., 2], kp[..., 2])  # scores unchanged


def test_after_a_gap_the_filter_follows_at_once():
    f = OneEuroFilter(OneEuroParams(beta=0.0))
    f(0.0, np.array([0.0]))
    near = f(1 / FPS, np.array([100.0]))[0]                 # one frame later: heavily smoothed
    f2 = OneEuroFilter(OneEuroParams(beta=0.0))
    f2(0.0, np.array([0.0]))
    far = f2(10.0, np.array([100.0]))[0]                    # ten seconds of skipped frames later
    assert near < 20 and far > 98


def test_time_must_increase_and_params_are_checked():
    f = OneEuroFilter()
    f(1.0, np.zeros(2))
    with pytest.raises(ValueError, match="not after"):
        f(1.0, np.ones(2))
    with pytest.raises(ValueError, match="min_cutoff"):
        OneEuroFilter(OneEuroParams(min_cutoff=0.0))
    with pytest.raises(ValueError, match="beta"):
        OneEuroFilter(OneEuroParams(beta=-1.0))


@pytest.mark.parametrize("key", ["min_cutoff", "beta", "d_cutoff"])
def test_non_finite_params_are_refused(key):
    # inf passed the > 0 checks and turned every smoothed keypoint into NaN (alpha = inf / inf)
    with pytest.raises(ValueError, match=f"{key} must be a finite number"):
        OneEuroParams(**{key: math.inf}).validate()
