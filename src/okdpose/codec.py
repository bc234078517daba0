"""The heatmap codec: keypoints to Gaussian target heatmaps and back, and the frame <-> crop
mapping of points; every coordinate conversion of the package goes through `HeatmapCodec`.

Legend: B crops, J joints, H x W heatmap (h, w), points (x, y); sizes are (w, h). Three frames
of reference: frame pixels (the recording), crop pixels (the model input of `image_size`, cut
by `okdpose.geometry.get_affine_transform` from a (center, scale)), heatmap pixels (the
model output of `heatmap_size`, crop / stride, no half-pixel offset, as the original).

    codec = HeatmapCodec((192, 256), (48, 64), sigma=2.0)
    target, weight = codec.encode(crop_keypoints, visible)          # (J, 64, 48), (J,)
    coords, maxvals = codec.decode(heatmaps, center, scale)         # frame px
    crop_pts = codec.frame_to_crop(frame_pts, center, scale)

Targets follow the official HRNet `generate_target`: an unnormalised Gaussian (peak 1) of std
`sigma` heatmap pixels centred on the joint rounded to the nearest heatmap pixel, truncated to a
(2*floor(3 sigma) + 1)^2 window; weight = 1 for labelled joints (v > 0) unless the whole window
falls off the map, then 0 and no Gaussian. Identical to the original for joints at x, y >= 0
(tested); for negative coordinates we round with floor(x + 0.5) where the original's int()
truncates toward zero, and a window that ends just before the map gets weight 0 (original: 1
with an empty map). Decoding follows `get_final_preds`: argmax, a quarter pixel toward the
higher neighbour on each axis when 1 < x < W-1 and 1 < y < H-1, then the inverse crop affine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from okdpose.geometry import PIXEL_STD, crop_to_frame, frame_to_crop

OUTPUT_STRIDE = 4      # HRNet's heatmaps are 1/4 of its input (the stem's two stride-2 convolutions)


@dataclass(frozen=True)
class HeatmapCodec:
    """Coordinates of one model input size: `image_size` (w, h) crops, `heatmap_size` (w, h)
    heatmaps (an integer stride, the same on both axes), Gaussian targets of std `sigma`."""

    image_size: tuple[int, int]
    heatmap_size: tuple[int, int]
    sigma: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", (int(self.image_size[0]), int(self.image_size[1])))
        object.__setattr__(self, "heatmap_size", (int(self.heatmap_size[0]), int(self.heatmap_size[1])))
        object.__setattr__(self, "sigma", float(self.sigma))
        (iw, ih), (hw, hh) = self.image_size, self.heatmap_size
        if min(iw, ih, hw, hh) < 1 or iw % hw or ih % hh or iw // hw != ih // hh:
            raise ValueError(f"heatmap_size {[hw, hh]} must divide image_size {[iw, ih]} by the same whole "
                             f"number on both axes (HRNet: {OUTPUT_STRIDE}, i.e. {[iw // OUTPUT_STRIDE, ih // OUTPUT_STRIDE]})")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")

    @property
    def stride(self) -> int:
        """Crop pixels per heatmap pixel."""
        return self.image_size[0] // self.heatmap_size[0]

    # ------------------------------------------------------------------ heatmaps
    def encode(self, keypoints: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints (..., J, 2) crop px, visibility (..., J) -> target (..., J, H, W), weight (..., J)."""
        return encode_heatmaps(keypoints, visible, self.image_size, self.heatmap_size, self.sigma)

    def encode_frame(self, joints: np.ndarray, center: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frame joints (B, J, 3) [x, y, v] in the unrotated crops (center, scale) (B, 2) -> the
        targets (B, J, H, W) and weights (B, J) a data set builds for them."""
        j = np.asarray(joints, np.float64)
        return self.encode(self.frame_to_crop(j[..., :2], center, scale), j[..., 2])

    def decode(self, heatmaps: np.ndarray, center: np.ndarray, scale: np.ndarray,
               refine: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Heatmaps (B, J, H, W), center, scale (B, 2) -> coords (B, J, 2) frame px, maxvals (B, J)."""
        return decode_heatmaps(heatmaps, center, scale, refine)

    def decode_crop(self, heatmaps: np.ndarray, refine: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Heatmaps (B, J, H, W) -> coords (B, J, 2) crop px, maxvals (B, J)."""
        hm = np.asarray(heatmaps, dtype=np.float32)
        coords, maxvals = get_max_preds(hm)
        if refine:
            coords = refine_quarter_pixel(coords, hm)
        return (coords * self.stride).astype(np.float32), maxvals

    # ------------------------------------------------------------------ frame <-> crop
    def frame_to_crop(self, points: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Frame points -> crop px (float64): (J, 2) with center, scale (2,), or (B, J, 2) with (B, 2)."""
        return frame_to_crop(points, center, scale, self.image_size)

    def crop_to_frame(self, points: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Crop px -> frame points (float64), the inverse of `frame_to_crop` (same shapes)."""
        return crop_to_frame(points, center, scale, self.image_size)

    def joints_to_crop(self, joints: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """(B, J, 3+) frame px + extra columns (visibility, score) -> crop px, columns kept, float32."""
        j = np.asarray(joints, dtype=np.float64)
        return np.concatenate([self.frame_to_crop(j[..., :2], center, scale), j[..., 2:]], axis=-1).astype(np.float32)

    def box_to_crop(self, bbox: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """COCO boxes (B, 4) [x, y, w, h] frame px -> (B, 4) (x0, y0, x1, y1) crop px (unrotated
        crops: the corners' bounding box is the exact image)."""
        x, y, w, h = np.asarray(bbox, np.float64).reshape(-1, 4).T
        corners = np.stack([np.stack([x, y], -1), np.stack([x + w, y], -1),
                            np.stack([x, y + h], -1), np.stack([x + w, y + h], -1)], axis=1)   # (B, 4, 2)
        c = self.frame_to_crop(corners, center, scale)
        return np.concatenate([c.min(axis=1), c.max(axis=1)], axis=-1).astype(np.float32)

    def crop_px_per_frame_px(self, scale: np.ndarray) -> np.ndarray:
        """(B, 2) scale -> (B,) crop pixels per frame pixel of each crop."""
        return float(self.image_size[0]) / (np.asarray(scale, np.float64).reshape(-1, 2)[:, 0] * PIXEL_STD)


# --------------------------------------------------------------------------- the functions behind it

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

    Coordinates are 0 where the maximum is <= 0, as the original. The package's only argmax.
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
    return crop_to_frame(coords, center, scale, heatmap_size).astype(np.float32)


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
