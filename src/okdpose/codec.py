"""Heatmap codec: Gaussian targets from keypoints, and keypoints back from heatmaps.

Legend: B batch, J joints, H x W heatmap (h, w), points (x, y). Keypoints given to `encode`
are in input-crop pixels (the model input of `image_size`); `decode_heatmaps` returns frame
pixels, undoing the crop affine of `okdpose.data.transforms` (source width scale[0] * 200).
The stride between input and heatmap lives here only.

Targets follow the official HRNet `generate_target`: an unnormalised Gaussian (peak 1) of std
`sigma` heatmap pixels centred on the joint rounded to the nearest heatmap pixel, truncated to a
(2*floor(3 sigma) + 1)^2 window; weight = 1 for labelled joints (v > 0) unless the whole window
falls off the map, then 0 and no Gaussian. Identical to the original for joints at x, y >= 0
(tested); for negative coordinates we round with floor(x + 0.5) where the original's int()
truncates toward zero, and a window that ends just before the map gets weight 0 (original: 1
with an empty map). Decoding follows `get_final_preds`: argmax, a quarter
pixel toward the higher neighbour on each axis when 1 < x < W-1 and 1 < y < H-1, then the
inverse crop affine.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from okdpose.data.transforms import affine_points, get_affine_transform


def encode_heatmaps(keypoints: np.ndarray, visible: np.ndarray, image_size: Sequence[int],
                    heatmap_size: Sequence[int], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints (..., J, 2) in input pixels, visibility (..., J) -> target (..., J, H, W), weight (..., J).

    Vectorised over joints (and any leading batch axes): one broadcast exp, no per-joint loop.
    """
    kp = np.asarray(keypoints, dtype=np.float32)
    vis = np.asarray(visible)
    hw, hh = int(heatmap_size[0]), int(heatmap_size[1])
    stride = np.array([image_size[0] / hw, image_size[1] / hh], dtype=np.float32)
    mu = np.floor(kp / stride + 0.5)                              # nearest heatmap pixel
    radius = int(np.floor(3 * sigma))
    # visible part of the window [mu - r, mu + r]; no overlap with the map -> weight 0
    on_map = ((mu[..., 0] - radius < hw) & (mu[..., 1] - radius < hh)
              & (mu[..., 0] + radius >= 0) & (mu[..., 1] + radius >= 0))
    weight = ((vis > 0) & on_map).astype(np.float32)

    xs = np.arange(hw, dtype=np.float32)
    ys = np.arange(hh, dtype=np.float32)
    dx = xs - mu[..., 0:1]                                        # (..., J, W)
    dy = ys - mu[..., 1:2]                                        # (..., J, H)
    gx = np.where(np.abs(dx) <= radius, np.exp(-dx * dx / (2 * sigma * sigma)), 0.0)
    gy = np.where(np.abs(dy) <= radius, np.exp(-dy * dy / (2 * sigma * sigma)), 0.0)
    target = gy[..., :, None] * gx[..., None, :] * weight[..., None, None]   # separable Gaussian
    return target.astype(np.float32), weight


def get_max_preds(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax of each heatmap (B, J, H, W) -> coords (B, J, 2) heatmap px float32, maxvals (B, J).

    Coordinates are 0 where the maximum is <= 0, as the original.
    """
    hm = np.asarray(heatmaps)
    if hm.ndim != 4:
        raise ValueError(f"heatmaps must be (B, J, H, W), got shape {hm.shape}")
    b, j, _, w = hm.shape
    flat = hm.reshape(b, j, -1)
    idx = flat.argmax(axis=2)
    maxvals = np.take_along_axis(flat, idx[..., None], axis=2)[..., 0].astype(np.float32)
    coords = np.stack([idx % w, idx // w], axis=-1).astype(np.float32)
    coords *= (maxvals > 0)[..., None]
    return coords, maxvals


def refine_quarter_pixel(coords: np.ndarray, heatmaps: np.ndarray) -> np.ndarray:
    """Shift each integer peak (B, J, 2) a quarter pixel toward its higher neighbour, per axis."""
    hm = np.asarray(heatmaps)
    b, j, h, w = hm.shape
    px = np.floor(coords[..., 0] + 0.5).astype(np.int64)
    py = np.floor(coords[..., 1] + 0.5).astype(np.int64)
    inside = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)
    pxc, pyc = np.clip(px, 1, w - 2), np.clip(py, 1, h - 2)
    bi, ji = np.meshgrid(np.arange(b), np.arange(j), indexing="ij")
    diff_x = hm[bi, ji, pyc, pxc + 1] - hm[bi, ji, pyc, pxc - 1]
    diff_y = hm[bi, ji, pyc + 1, pxc] - hm[bi, ji, pyc - 1, pxc]
    shift = np.stack([np.sign(diff_x), np.sign(diff_y)], axis=-1) * 0.25 * inside[..., None]
    return (coords + shift).astype(np.float32)


def heatmap_to_frame(coords: np.ndarray, center: np.ndarray, scale: np.ndarray,
                     heatmap_size: Sequence[int]) -> np.ndarray:
    """Heatmap px (B, J, 2) -> frame px through the inverse crop affine of each sample's (center, scale)."""
    center = np.asarray(center, dtype=np.float32).reshape(-1, 2)
    scale = np.asarray(scale, dtype=np.float32).reshape(-1, 2)
    inv = np.stack([get_affine_transform(c, s, 0.0, heatmap_size, inv=True) for c, s in zip(center, scale)])
    return affine_points(coords, inv).astype(np.float32)


def decode_heatmaps(heatmaps: np.ndarray, center: np.ndarray, scale: np.ndarray,
                    refine: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (B, J, H, W), center (B, 2), scale (B, 2) -> coords (B, J, 2) frame px, maxvals (B, J)."""
    hm = np.asarray(heatmaps, dtype=np.float32)
    coords, maxvals = get_max_preds(hm)
    if refine:
        coords = refine_quarter_pixel(coords, hm)
    h, w = hm.shape[2:]
    return heatmap_to_frame(coords, center, scale, (w, h)), maxvals


def flip_back(heatmaps: Any, flip_perm: np.ndarray | Sequence[int], shift: bool = True) -> Any:
    """Un-mirror heatmaps (B, J, H, W) predicted on a horizontally flipped input.

    Flips the W axis and swaps left/right joints (`flip_perm` from `JointSpec.flip_permutation()`).
    With `shift` the result moves one column right (column 0 kept), the official SHIFT_HEATMAP
    correction for x -> W - 1 - x mirroring; average the result with the unflipped output.
    Works on numpy arrays and torch tensors (returns the same kind).
    """
    perm = np.asarray(flip_perm, dtype=np.int64)
    if isinstance(heatmaps, np.ndarray):
        out = heatmaps[:, perm, :, ::-1].copy()
        if shift:
            out[..., 1:] = out[..., :-1].copy()
        return out
    import torch  # a tensor was passed, so torch is installed

    out = torch.flip(heatmaps, dims=[-1])[:, torch.as_tensor(perm, device=heatmaps.device)]
    if shift:
        out = torch.cat([out[..., :1], out[..., :-1]], dim=-1)
    return out
