"""Temporal smoothing of keypoint trajectories with the One Euro filter (Casiez, Roussel and Vogel,
"1€ Filter: A Simple Speed-based Low-pass Filter for Noisy Input in Interactive Systems", CHI 2012).

Legend: T frames, J joints; points (x, y) in frame pixels, times in seconds.

An exponential low-pass filter whose cutoff rises with the speed of the signal: at rest it
removes jitter (cutoff `min_cutoff`), in fast movements it follows with little lag (cutoff
`min_cutoff + beta * |speed|`). Per coordinate, with Te the time since the last sample:

    alpha(fc) = 1 / (1 + tau / Te),  tau = 1 / (2 pi fc)
    dx  = (x - x_prev_hat) / Te;   dx_hat = alpha(d_cutoff) * dx + (1 - alpha(d_cutoff)) * dx_hat_prev
    fc  = min_cutoff + beta * |dx_hat|
    x_hat = alpha(fc) * x + (1 - alpha(fc)) * x_prev_hat

Parameters (`OneEuroParams`): `min_cutoff` Hz, lower = smoother at rest, more lag; `beta` per
pixel (fc in Hz per px/s of speed), higher = less lag when moving; `d_cutoff` Hz of the speed
estimate (1 Hz as the paper). Tuning as Casiez et al.: with beta = 0, lower min_cutoff until a
still infant's keypoints stop jittering, then raise beta until fast limb movements no longer lag.
Time comes from the frame index and the frame rate (the video's, or `--fps` for frame folders),
so frames skipped as unreadable are gaps of the right length.

Low-confidence points (score < `min_score`) are left as predicted and do not update the filter:
a wrong detection would pull the trajectory away. The next confident point is filtered against
the last confident one with Te spanning the gap, so after a long gap alpha is near 1 and the
filter follows at once instead of gliding from a stale position. Scores are kept unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OneEuroParams:
    min_cutoff: float = 1.0     # Hz: cutoff at rest
    beta: float = 0.05          # Hz per px/s: how fast the cutoff rises with speed
    d_cutoff: float = 1.0       # Hz: cutoff of the speed estimate
    min_score: float = 0.2      # points below this score are not filtered (nor fed to the filter)

    def validate(self, where: str = "smoothing") -> None:
        # finite too: an inf cutoff makes alpha inf / inf = NaN, and NaN keypoints fail only at writing
        for key in ("min_cutoff", "d_cutoff"):
            if not 0 < getattr(self, key) < math.inf:
                raise ValueError(f"{where}.{key} must be a finite number > 0 Hz, got {getattr(self, key)}")
        if not 0 <= self.beta < math.inf:
            raise ValueError(f"{where}.beta must be a finite number >= 0, got {self.beta}")
        if not 0 <= self.min_score <= 1:
            raise ValueError(f"{where}.min_score must be in [0, 1], got {self.min_score}")


def smoothing_factor(te: np.ndarray | float, cutoff: np.ndarray | float) -> np.ndarray:
    """alpha = 1 / (1 + tau / Te) with tau = 1 / (2 pi cutoff) (equivalently r / (r + 1), r = 2 pi fc Te)."""
    r = 2.0 * math.pi * np.asarray(cutoff, np.float64) * np.asarray(te, np.float64)
    return r / (r + 1.0)


class OneEuroFilter:
    """A One Euro filter over arrays of any fixed shape (e.g. (J, 2)), fed one sample at a time."""

    def __init__(self, params: OneEuroParams = OneEuroParams()) -> None:
        params.validate()
        self.params = params
        self.x_hat: np.ndarray | None = None     # last filtered value per element
        self.dx_hat: np.ndarray | None = None    # last filtered speed per element
        self.t_last: np.ndarray | None = None    # time of the last sample each element took

    def __call__(self, t: float, x: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Filter sample `x` at time `t` (s, increasing); elements where `valid` is False pass through
        unfiltered and leave the state alone -> the filtered array (float64, x's shape)."""
        x = np.asarray(x, np.float64)
        ok = np.ones(x.shape, bool) if valid is None else np.broadcast_to(np.asarray(valid, bool), x.shape)
        if self.x_hat is None:
            self.x_hat, self.dx_hat = x.copy(), np.zeros_like(x)
            self.t_last = np.full(x.shape, np.nan)
        p = self.params
        first = np.isnan(self.t_last)
        te = np.where(first, 1.0, t - np.where(first, t, self.t_last))
        if np.any(ok & ~first & ~(te > 0)):
            raise ValueError(f"One Euro filter: time {t} s is not after the previous sample")
        te = np.where(te > 0, te, 1.0)
        dx = np.where(first, 0.0, (x - self.x_hat) / te)
        dx_hat = smoothing_factor(te, p.d_cutoff) * dx + (1 - smoothing_factor(te, p.d_cutoff)) * self.dx_hat
        a = smoothing_factor(te, p.min_cutoff + p.beta * np.abs(dx_hat))
        x_hat = np.where(first, x, a * x + (1 - a) * self.x_hat)
        out = np.where(ok, x_hat, x)
        self.x_hat = np.where(ok, x_hat, self.x_hat)
        self.dx_hat = np.where(ok, np.where(first, 0.0, dx_hat), self.dx_hat)
        self.t_last = np.where(ok, t, self.t_last)
        return out


def smooth_keypoints(times: np.ndarray, keypoints: np.ndarray, params: OneEuroParams = OneEuroParams()) -> np.ndarray:
    """One trajectory of keypoints (T, J, 3) [x, y, score] at `times` (T,) s -> smoothed (T, J, 3)
    (x and y filtered per joint; scores unchanged; points below params.min_score as they were)."""
    kp = np.asarray(keypoints, np.float64)
    f = OneEuroFilter(params)
    out = kp.copy()
    for i, t in enumerate(np.asarray(times, np.float64)):
        out[i, :, :2] = f(float(t), kp[i, :, :2], (kp[i, :, 2] >= params.min_score)[:, None])
    return out
