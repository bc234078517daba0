"""How well a CAM lands on the person: energy in the box and the pointing game (any joint, or
the targeted joint), with their chance levels, and means of per-image scores; pure numpy.

Legend: B images, J joints, (H, W) a map; points are (x, y) crop pixels, a pixel's centre at
its (column, row); boxes are (x0, y0, x1, y1) crop pixels.

    per_image = image_scores(maps, boxes, joints, radius)       # maps (B, H, W) -> {score: (B,)}
    summary, detail = score_report(layer_maps, method_maps, boxes, joints, radius)
    summary["stage2"]["gradcam"]["joint_pointing_game"], summary["chance"]["energy_in_box"]
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
    for an all-zero map. A uniform map scores the box's area share (`chance_scores`)."""
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


def _mean(values: Sequence[float]) -> Optional[float]:
    v = [x for x in values if not math.isnan(x)]
    return round(float(np.mean(v)), 4) if v else None


def joint_pointing(maps: np.ndarray, joints: np.ndarray, radius: np.ndarray,
                   min_visibility: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per-joint pointing game of joint-targeted maps (B, J, H, W): is the map of joint j's
    target peaked within `radius` (B,) px of joint j (B, J, 3)? -> hits and chance levels
    (B, J) float (1/0; NaN for joints below `min_visibility` or all-zero maps). Chance: the share
    of crop pixels within the radius of joint j (the disc's area / the crop's, clipped at the
    crop's edges): the hit rate of a peak drawn uniformly over the crop."""
    b, j = maps.shape[:2]
    hits, chance = np.full((b, j), np.nan), np.full((b, j), np.nan)
    for i in range(b):
        for k in range(j):
            one = joints[i, k:k + 1]
            hit = pointing_hit(maps[i, k], one, float(radius[i]), min_visibility)
            if hit is not None:
                hits[i, k] = float(hit)
                chance[i, k] = pointing_chance(maps.shape[2:], one, float(radius[i]), min_visibility)
    return hits, chance


def image_scores(pose: np.ndarray, boxes: np.ndarray, joints: np.ndarray, radius: np.ndarray,
                 joint_maps: Optional[np.ndarray] = None, min_visibility: int = 2) -> dict[str, np.ndarray]:
    """Per-image localisation of one method's maps: `pose` (B, H, W) (its whole-pose or only map)
    and optional `joint_maps` (B, J, H, W). -> {"energy_in_box" (B,), "pointing_game" (B,) (peak
    near any labelled joint), "joint_pointing_game" (B, J) with joint maps}; NaN = not scored."""
    out = {"energy_in_box": np.array([energy_in_box(m, bx) for m, bx in zip(pose, boxes)]),
           "pointing_game": np.array([_nan(pointing_hit(m, jt, float(r), min_visibility))
                                      for m, jt, r in zip(pose, joints, radius)])}
    if joint_maps is not None:
        out["joint_pointing_game"] = joint_pointing(joint_maps, joints, radius, min_visibility)[0]
    return out


def chance_scores(shape: Sequence[int], boxes: np.ndarray, joints: np.ndarray, radius: np.ndarray,
                  min_visibility: int = 2) -> dict[str, np.ndarray]:
    """Chance levels of `image_scores` on (H, W) maps: the box's area share (a uniform map's
    energy in the box), the any-joint and per-joint pointing games of a uniformly drawn peak."""
    j = np.asarray(joints)
    disc = np.array([[_nan(pointing_chance(shape, j[i, k:k + 1], float(radius[i]), min_visibility))
                      for k in range(j.shape[1])] for i in range(len(j))])
    return {"energy_in_box": np.array([float(box_mask(bx, shape).mean()) for bx in boxes]),
            "pointing_game": np.array([_nan(pointing_chance(shape, jt, float(r), min_visibility))
                                       for jt, r in zip(j, radius)]),
            "joint_pointing_game": disc}


def mean_scores(per_image: Mapping[str, np.ndarray]) -> dict[str, Optional[float]]:
    """{name: per-image (B,) or per-joint (B, J) scores} -> {name: mean over the scored entries
    (NaN skipped), 4 decimals; None when none}."""
    return {k: _mean(np.asarray(v, np.float64).ravel().tolist()) for k, v in per_image.items()}


def _nan(x: Optional[float]) -> float:
    return math.nan if x is None else float(x)


def score_report(layer_maps: Mapping[str, np.ndarray], method_maps: Mapping[int, Mapping[str, Any]],
                 boxes: np.ndarray, joints: np.ndarray, radius: np.ndarray,
                 min_visibility: int = 2) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scores of one explain run: EigenCAM layer maps {"stage2/head": (B, H, W), "extra/<layer>":
    …} and the methods' maps {stage: {method: m}} (m.pose (B, H, W), m.joints (B, J, H, W) or
    None, m.faith {name: (B,) or (B, J)}: `okdpose.keypoint_cam.MethodMaps`).

    -> (summary, per_image): summary {"stage<k>": {method: means, "eigencam_<layer kind>": means
    for the other EigenCAM layers (e.g. the head)}, "extra": {layer: means}, "chance": means,
    "images": B, "pointing_images": images with a labelled joint}; per_image has the same keys
    with the per-image (and per-joint) values, NaN as None."""
    shape = next(iter(layer_maps.values())).shape[1:] if layer_maps else \
        next(iter(next(iter(method_maps.values())).values())).pose.shape[1:]
    summary: dict[str, Any] = {}
    per_image: dict[str, Any] = {}

    def put(group: str, name: str, values: dict[str, np.ndarray]) -> None:
        summary.setdefault(group, {})[name] = mean_scores(values)
        per_image.setdefault(group, {})[name] = {k: _listed(v) for k, v in values.items()}

    for stage, by_method in method_maps.items():
        for method, m in by_method.items():
            put(f"stage{stage}", method, {**image_scores(m.pose, boxes, joints, radius, m.joints, min_visibility),
                                          **m.faith})
    for key, maps in layer_maps.items():
        group, _, name = key.partition("/")
        if group != "extra" and name == "feature" and "eigencam" in summary.get(group, {}):
            continue                    # the feature layer's EigenCAM is the "eigencam" method's map
        put(group, name if group == "extra" else f"eigencam_{name}",
            image_scores(maps, boxes, joints, radius, None, min_visibility))
    chance = chance_scores(shape, boxes, joints, radius, min_visibility)
    summary["chance"] = mean_scores(chance)
    per_image["chance"] = {k: _listed(v) for k, v in chance.items()}
    summary["images"] = len(boxes)
    summary["pointing_images"] = int(np.isfinite(chance["pointing_game"]).sum())
    return summary, per_image


def stage_table(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Long-form rows (stage, method, scores…) of `score_report`'s summary, for a DVC plot: one
    row per stage and method (methods only, not the extra EigenCAM layers), plus a "chance" row
    per stage; a score a method lacks is left empty."""
    names = ("energy_in_box", "pointing_game", "joint_pointing_game", "confidence_change")
    rows = []
    stages = sorted(int(k[5:]) for k in summary if k.startswith("stage") and k[5:].isdigit())
    for stage in stages:
        for method, scores in summary[f"stage{stage}"].items():
            if not method.startswith("eigencam_"):
                rows.append({"stage": stage, "method": method, **{n: scores.get(n) for n in names}})
        rows.append({"stage": stage, "method": "chance", **{n: summary["chance"].get(n) for n in names}})
    return rows


def _listed(values: np.ndarray) -> list:
    """(B,) or (B, J) floats -> nested lists, 4 decimals, NaN -> None."""
    a = np.asarray(values, np.float64)
    return [None if not math.isfinite(x) else round(float(x), 4) for x in a] if a.ndim == 1 else [_listed(r) for r in a]
