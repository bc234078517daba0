"""Geometry of the person crop: box -> (center, scale), the crop affine and its application to
points and images. Pure numpy + OpenCV, no other okdpose module: the codec, the data loaders and
the pictures all build on it.

Legend: B crops, J joints; points are (x, y) frame pixels; sizes are (w, h). `scale` is the crop
size in units of PIXEL_STD pixels, as the official HRNet: the source width of the crop is
scale[0] * 200 and the transform is a similarity (scale[1] only records the box aspect).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

PIXEL_STD = 200.0
BOX_PADDING = 1.25


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


def scale_area(scale: np.ndarray) -> np.ndarray:
    """(.., 2) scale -> (..,) area of the crop's source box in frame px^2 (the original OKS-NMS area)."""
    return np.prod(np.asarray(scale, np.float64) * PIXEL_STD, axis=-1)


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


def crop_transforms(center: np.ndarray, scale: np.ndarray, output_size: Sequence[int],
                    inv: bool = False) -> np.ndarray:
    """Unrotated crop transform(s): center, scale (2,) -> (2, 3), or (B, 2) -> (B, 2, 3)."""
    c, s = np.asarray(center, dtype=np.float32), np.asarray(scale, dtype=np.float32)
    if c.ndim == 1:
        return get_affine_transform(c, s, 0.0, output_size, inv=inv)
    return np.stack([get_affine_transform(ci, si, 0.0, output_size, inv=inv)
                     for ci, si in zip(c.reshape(-1, 2), s.reshape(-1, 2))])


def frame_to_crop(points: np.ndarray, center: np.ndarray, scale: np.ndarray, output_size: Sequence[int]) -> np.ndarray:
    """Frame points -> crop px (float64): (J, 2) with center, scale (2,), or (B, J, 2) with (B, 2)."""
    return affine_points(points, crop_transforms(center, scale, output_size))


def crop_to_frame(points: np.ndarray, center: np.ndarray, scale: np.ndarray, output_size: Sequence[int]) -> np.ndarray:
    """Crop px -> frame points (float64), the inverse of `frame_to_crop` (same shapes)."""
    return affine_points(points, crop_transforms(center, scale, output_size, inv=True))


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


def crop_image(image: np.ndarray, center: np.ndarray, scale: np.ndarray, output_size: Sequence[int]) -> np.ndarray:
    """The unrotated crop (center, scale) (2,) of `image` (H, W[, C]) at `output_size` (w, h)."""
    return warp_image(image, crop_transforms(center, scale, output_size), output_size)
