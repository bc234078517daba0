"""Geometry of the person crop: box -> (center, scale), the crop affine, flip, rotation/scale and
half-body augmentation. Pure numpy + OpenCV; no torch, no config objects.

Legend: J joints; points are (x, y) frame pixels; `joints` is (J, 3) with the COCO visibility
flag in column 2 (0 absent, 1 occluded, 2 visible); sizes are (w, h). `scale` is the crop size
in units of PIXEL_STD pixels, as the official HRNet: the source width of the crop is
scale[0] * 200 and the transform is a similarity (scale[1] only records the box aspect).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

PIXEL_STD = 200.0
BOX_PADDING = 1.25
HALF_BODY_PADDING = 1.5
ROTATION_PROB = 0.6             # the original applies rotation to 60% of the samples
FLIP_PROB = 0.5


def box_to_center_scale(box: np.ndarray | Sequence[float], aspect_ratio: float,
                        padding: float = BOX_PADDING) -> tuple[np.ndarray, np.ndarray]:
    """(x, y, w, h) box(es) -> center (.., 2), scale (.., 2) float32.

    The box is widened or heightened to `aspect_ratio` (= image_size w / h), divided by
    PIXEL_STD and enlarged by `padding`, exactly as the original `_xywh2cs`.
    """
    b = np.asarray(box, dtype=np.float64)
    x, y, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    center = np.stack([x + w * 0.5, y + h * 0.5], axis=-1)
    w2 = np.where(w > aspect_ratio * h, w, h * aspect_ratio)
    h2 = np.where(w > aspect_ratio * h, w / aspect_ratio, h)
    scale = np.stack([w2, h2], axis=-1) / PIXEL_STD * padding
    return center.astype(np.float32), scale.astype(np.float32)


def get_affine_transform(center: Sequence[float], scale: Sequence[float], rot: float,
                         output_size: Sequence[int], shift: Sequence[float] = (0.0, 0.0),
                         inv: bool = False) -> np.ndarray:
    """The official HRNet crop transform (2, 3): frame -> output (or output -> frame if `inv`).

    A similarity: the source square of width scale[0] * 200 centred on `center`, rotated by
    `rot` degrees, maps onto an output of `output_size` (w, h) whose centre is the box centre.
    """
    center = np.asarray(center, dtype=np.float32)
    scale_px = np.asarray(scale, dtype=np.float32) * PIXEL_STD
    shift = np.asarray(shift, dtype=np.float32)
    src_w = scale_px[0]
    dst_w, dst_h = float(output_size[0]), float(output_size[1])

    rot_rad = np.pi * rot / 180.0
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    src_dir = np.array([src_w * 0.5 * sn, -src_w * 0.5 * cs], dtype=np.float32)   # (0, -w/2) rotated
    dst_dir = np.array([0.0, -dst_w * 0.5], dtype=np.float32)

    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center + scale_px * shift
    src[1] = src[0] + src_dir
    dst[0] = (dst_w * 0.5, dst_h * 0.5)
    dst[1] = dst[0] + dst_dir
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    if inv:
        return cv2.getAffineTransform(dst, src)
    return cv2.getAffineTransform(src, dst)


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return b + np.array([-d[1], d[0]], dtype=np.float32)


def affine_points(points: np.ndarray, trans: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine (or a (B, 2, 3) stack, broadcast over (B, J, 2)) to (..., 2) points."""
    pts = np.asarray(points, dtype=np.float64)
    t = np.asarray(trans, dtype=np.float64)
    if t.ndim == 2:
        return pts @ t[:, :2].T + t[:, 2]
    return np.einsum("bij,bkj->bki", t[:, :, :2], pts) + t[:, None, :, 2]


def warp_image(image: np.ndarray, trans: np.ndarray, output_size: Sequence[int]) -> np.ndarray:
    """Crop `image` (H, W[, C]) through `trans` to `output_size` (w, h); bilinear, zero border."""
    return cv2.warpAffine(image, trans, (int(output_size[0]), int(output_size[1])),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def crop(image: np.ndarray, center: Sequence[float], scale: Sequence[float],
         output_size: Sequence[int], rot: float = 0.0) -> np.ndarray:
    return warp_image(image, get_affine_transform(center, scale, rot, output_size), output_size)


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
