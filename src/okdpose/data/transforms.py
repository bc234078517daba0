"""Training augmentation of the person crop: flip, rotation/scale and half-body, sampled as the
original `JointsDataset`. Pure numpy; the crop affine itself is `okdpose.geometry`'s.

Legend: J joints; points are (x, y) frame pixels; `joints` is (J, 3) with the COCO visibility
flag in column 2 (0 absent, 1 occluded, 2 visible); sizes are (w, h); `scale` as in
`okdpose.geometry` (crop width / PIXEL_STD).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from okdpose.geometry import PIXEL_STD

HALF_BODY_PADDING = 1.5
ROTATION_PROB = 0.6             # the original applies rotation to 60% of the samples
FLIP_PROB = 0.5


def flip_joints(joints: np.ndarray, width: int, flip_perm: np.ndarray) -> np.ndarray:
    """Mirror (J, 3) joints of a `width`-pixel-wide frame: x -> width - 1 - x, left/right swapped.

    Absent joints (v = 0) keep coordinates 0, as the original (`joints * joints_vis`).
    """
    out = np.asarray(joints, dtype=np.float32)[flip_perm].copy()
    out[:, 0] = width - 1 - out[:, 0]
    out[:, :2] *= (out[:, 2:3] > 0)
    return out


def flip_center(center: np.ndarray, width: int) -> np.ndarray:
    c = np.asarray(center, dtype=np.float32).copy()
    c[0] = width - 1 - c[0]
    return c


def half_body_center_scale(joints: np.ndarray, upper_body: Sequence[int], aspect_ratio: float,
                           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """Center/scale of the upper or lower half of the labelled joints (original `half_body_transform`).

    Upper body is chosen with probability 1/2 when it has more than 2 labelled joints (the
    original's `randn() < 0.5` is a 69% bias we do not copy); None if fewer than 2 joints remain.
    """
    labelled = joints[:, 2] > 0
    is_upper = np.zeros(len(joints), dtype=bool)
    is_upper[list(upper_body)] = True
    upper, lower = joints[labelled & is_upper, :2], joints[labelled & ~is_upper, :2]
    if rng.random() < 0.5 and len(upper) > 2:
        sel = upper
    else:
        sel = lower if len(lower) > 2 else upper
    if len(sel) < 2:
        return None
    center = sel.mean(axis=0)
    w, h = sel.max(axis=0) - sel.min(axis=0)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    scale = np.array([w, h], dtype=np.float32) / PIXEL_STD * HALF_BODY_PADDING
    return center.astype(np.float32), scale


@dataclass(frozen=True)
class Augmentation:
    """One sampled augmentation: crop (center, scale, rot) and whether the frame is mirrored first."""

    center: np.ndarray
    scale: np.ndarray
    rot: float
    flip: bool


def sample_augmentation(rng: np.random.Generator, joints: np.ndarray, center: np.ndarray,
                        scale: np.ndarray, *, flip: bool, rotation: float, scale_factor: float,
                        half_body_prob: float, upper_body: Sequence[int], aspect_ratio: float,
                        frame_width: int, half_body_min_joints: int | None = None) -> Augmentation:
    """Sample half-body, scale, rotation and flip as the original `JointsDataset.__getitem__`.

    Scale: s * clip(N(1, sf), 1 - sf, 1 + sf); rotation: clip(N(0, rf), -2rf, 2rf) with
    probability ROTATION_PROB; flip with probability FLIP_PROB. When `flip` is drawn, the
    returned center is already mirrored (apply it to the mirrored frame and `flip_joints`).
    Half-body needs more than `half_body_min_joints` labelled joints (default J // 2: the
    original's 8 for COCO-17 and 6 for BabyPose-12).
    """
    c, s = np.asarray(center, np.float32), np.asarray(scale, np.float32)
    min_joints = len(joints) // 2 if half_body_min_joints is None else half_body_min_joints
    if half_body_prob > 0 and (joints[:, 2] > 0).sum() > min_joints and rng.random() < half_body_prob:
        hb = half_body_center_scale(joints, upper_body, aspect_ratio, rng)
        if hb is not None:
            c, s = hb
    if scale_factor > 0:
        s = s * float(np.clip(rng.normal() * scale_factor + 1, 1 - scale_factor, 1 + scale_factor))
    rot = 0.0
    if rotation > 0 and rng.random() <= ROTATION_PROB:
        rot = float(np.clip(rng.normal() * rotation, -2 * rotation, 2 * rotation))
    do_flip = bool(flip and rng.random() <= FLIP_PROB)
    if do_flip:
        c = flip_center(c, frame_width)
    return Augmentation(center=c.astype(np.float32), scale=np.asarray(s, np.float32), rot=rot, flip=do_flip)
