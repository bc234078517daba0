"""How well a CAM lands on the person: energy in the box and the pointing game, pure numpy.

Legend: B images, J joints, (H, W) a map; points are (x, y) crop pixels, a pixel's centre at
its (column, row); boxes are (x0, y0, x1, y1) crop pixels.

    scores = cam_scores({"stage2/head": maps}, boxes, joints, radius)   # maps (B, H, W)
    scores["stage2"]["head"]["energy_in_box"], scores["baseline"]["pointing_game"]
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np


def pointing_radius(bbox: np.ndarray, crop_px_per_frame_px: np.ndarray, fraction: float) -> np.ndarray:
    """`fraction` * max(box w, h) of COCO boxes (B, 4) [x, y, w, h] frame px (the PCK normaliser of
    okdpose.metrics.pck), in crop px: (B,) float32, given each crop's (B,) crop px per frame px."""
    box_size = np.asarray(bbox, np.float64)[:, 2:4].max(axis=1)
    return (fraction * box_size * crop_px_per_frame_px).astype(np.float32)


def box_mask(box: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """(H, W) bool: pixels whose centre (x, y) = (column, row) lies in the box (x0, y0, x1, y1)."""
    h, w = int(shape[0]), int(shape[1])
    x0, y0, x1, y1 = box
    xs, ys = np.arange(w), np.arange(h)
    return ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]


def energy_in_box(cam: np.ndarray, box: Sequence[float]) -> float:
    """Share of the map's total (non-negative) energy inside the box: 1.0 all in, 0.0 none; NaN
    for an all-zero map. A uniform map scores the box's area share (see `cam_scores` baseline)."""
    cam = np.asarray(cam, np.float64)
    total = cam.sum()
    return float(cam[box_mask(box, cam.shape)].sum() / total) if total > 0 else math.nan


def pointing_hit(cam: np.ndarray, joints: np.ndarray, radius: float, min_visibility: int = 2) -> Optional[bool]:
    """Pointing game: is the map's peak (first argmax) within `radius` px of a joint (J, 3) with
    v >= `min_visibility`? None when no joint qualifies or the map is all zero."""
    cam = np.asarray(cam)
    j = np.asarray(joints, np.float64)
    pts = j[j[:, 2] >= min_visibility, :2]
    if len(pts) == 0 or not cam.max() > 0:
        return None
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return bool(np.min(np.hypot(pts[:, 0] - x, pts[:, 1] - y)) <= radius)


def pointing_chance(shape: Sequence[int], joints: np.ndarray, radius: float, min_visibility: int = 2) -> Optional[float]:
    """Hit rate of a peak drawn uniformly over the crop: the share of pixels within `radius` of a
    qualifying joint (the pointing game's chance level for this image)."""
    j = np.asarray(joints, np.float64)
    pts = j[j[:, 2] >= min_visibility, :2]
    if len(pts) == 0:
        return None
    ys, xs = np.mgrid[0:int(shape[0]), 0:int(shape[1])]
    d2 = (xs[None] - pts[:, 0, None, None]) ** 2 + (ys[None] - pts[:, 1, None, None]) ** 2
    return float((d2.min(axis=0) <= radius ** 2).mean())


def cam_scores(maps: Mapping[str, np.ndarray], boxes: np.ndarray, joints: np.ndarray, radius: np.ndarray,
               min_visibility: int = 2) -> dict[str, Any]:
    """Mean scores over the images for each map set {key: (B, H, W)}, with boxes (B, 4) crop
    (x0, y0, x1, y1), joints (B, J, 3) crop px + v and per-image radius (B,) px.

    -> {group: {name: {"energy_in_box", "pointing_game"}}} for keys "group/name" (e.g.
    out["stage2"]["head"]), plus "baseline": {"energy_in_box": box area share (a uniform map's
    score), "pointing_game": chance hit rate}, "images", "pointing_images". Images without a
    qualifying joint are left out of the pointing averages; NaN -> None.
    """
    b = len(boxes)
    shape = next(iter(maps.values())).shape[1:] if maps else (0, 0)
    out: dict[str, Any] = {}
    for key, m in maps.items():
        if m.shape[0] != b:
            raise ValueError(f"maps[{key!r}] has {m.shape[0]} images, boxes {b}")
        hits = [pointing_hit(m[i], joints[i], float(radius[i]), min_visibility) for i in range(b)]
        scores = {"energy_in_box": _mean([energy_in_box(m[i], boxes[i]) for i in range(b)]),
                  "pointing_game": _mean([float(h) for h in hits if h is not None])}
        group, _, name = key.partition("/")
        if name:
            out.setdefault(group, {})[name] = scores
        else:
            out[key] = scores
    chance = [pointing_chance(shape, joints[i], float(radius[i]), min_visibility) for i in range(b)]
    area = [float(box_mask(boxes[i], shape).mean()) for i in range(b)]
    out["baseline"] = {"energy_in_box": _mean(area), "pointing_game": _mean([c for c in chance if c is not None])}
    out["images"] = b
    out["pointing_images"] = sum(c is not None for c in chance)
    return out


def _mean(values: Sequence[float]) -> Optional[float]:
    v = [x for x in values if not math.isnan(x)]
    return round(float(np.mean(v)), 4) if v else None
