"""Pictures for people: skeleton overlays and image grids (uint8 BGR, OpenCV drawing).

Joints are (J, 3) arrays of (x, y, v) in the image's pixels; v = 2 visible (filled dot),
v = 1 occluded (hollow dot, dashed-looking thin bone), v = 0 absent (not drawn). The infant's
right side is drawn in orange, the left in blue, so left/right swaps are easy to spot.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import cv2
import numpy as np

from okdpose.files import atomic_path
from okdpose.joints import JointSpec

if TYPE_CHECKING:                 # for annotations only: viz needs neither torch nor grad-cam
    from okdpose.evaluation import EvalReport
    from okdpose.explain import CamTarget
    from okdpose.inference import Predictions

RIGHT_COLOR = (0, 140, 255)     # BGR orange
LEFT_COLOR = (255, 120, 0)      # BGR blue
CENTER_COLOR = (0, 220, 0)
BOX_COLOR = (80, 220, 80)


def to_bgr(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 1) or (H, W, 3) -> a contiguous (H, W, 3) copy."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype} (convert depth with okdpose.data.coco.to_uint8)")
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(img[..., :3]).copy()


def _joint_color(spec: JointSpec, j: int) -> tuple[int, int, int]:
    name = spec.names[j]
    if name.startswith("right"):
        return RIGHT_COLOR
    if name.startswith("left"):
        return LEFT_COLOR
    return CENTER_COLOR


def draw_skeleton(image: np.ndarray, joints: np.ndarray, spec: JointSpec, *, radius: int | None = None,
                  thickness: int | None = None, box: Sequence[float] | None = None,
                  color: tuple[int, int, int] | None = None, label: str | None = None) -> np.ndarray:
    """Copy of `image` with the skeleton of `joints` (J, 3) drawn; optional (x, y, w, h) box and caption.

    `color` draws every joint and bone in one colour (e.g. predictions over ground truth).
    """
    out = to_bgr(image)
    h, w = out.shape[:2]
    radius = radius or max(2, round(min(h, w) / 120))
    thickness = thickness or max(1, radius // 2)
    pts = np.asarray(joints, dtype=np.float64)
    xy = np.round(pts[:, :2]).astype(int)
    v = pts[:, 2] if pts.shape[1] > 2 else np.full(len(pts), 2.0)
    if box is not None:
        x, y, bw, bh = (int(round(c)) for c in box[:4])
        cv2.rectangle(out, (x, y), (x + bw, y + bh), BOX_COLOR, 1)
    for a, b in spec.skeleton0:
        if v[a] > 0 and v[b] > 0:
            c = color or _joint_color(spec, a)
            t = thickness if min(v[a], v[b]) >= 2 else max(1, thickness // 2)
            cv2.line(out, tuple(xy[a]), tuple(xy[b]), c, t, cv2.LINE_AA)
    for j in range(len(pts)):
        if v[j] <= 0:
            continue
        c = color or _joint_color(spec, j)
        cv2.circle(out, tuple(xy[j]), radius, c, -1 if v[j] >= 2 else 1, cv2.LINE_AA)
    if label:
        cv2.putText(out, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def image_grid(images: Sequence[np.ndarray], cols: int = 4, pad: int = 4,
               background: int = 32) -> np.ndarray:
    """Tile uint8 images (each resized to the first one's size) into one (rows x cols) BGR image."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    tiles = [to_bgr(im) for im in images]
    th, tw = tiles[0].shape[:2]
    tiles = [t if t.shape[:2] == (th, tw) else cv2.resize(t, (tw, th), interpolation=cv2.INTER_AREA) for t in tiles]
    cols = max(1, min(cols, len(tiles)))
    rows = -(-len(tiles) // cols)
    grid = np.full((rows * th + (rows + 1) * pad, cols * tw + (cols + 1) * pad, 3), background, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        grid[y:y + th, x:x + tw] = t
    return grid


def write_png(path, image: np.ndarray) -> None:
    """Write a PNG atomically (temporary file beside it, then rename)."""
    with atomic_path(path) as tmp:
        ok, buf = cv2.imencode(".png", image)
        if not ok:
            raise OSError(f"could not encode {path} as PNG")
        tmp.write_bytes(buf.tobytes())


def cam_overlay(image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.5, label: str | None = None) -> np.ndarray:
    """A CAM (h, w) float in [0, 1] over a uint8 image (jet colour map, red = high), resized to the
    image; `alpha` is the map's weight (pytorch-grad-cam's show_cam_on_image uses 0.5)."""
    out = to_bgr(image)
    h, w = out.shape[:2]
    m = np.asarray(cam, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"cam must be a 2-D map, got shape {m.shape}")
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.uint8(np.clip(m, 0.0, 1.0) * 255.0 + 0.5), cv2.COLORMAP_JET)
    out = cv2.addWeighted(heat, alpha, out, 1.0 - alpha, 0.0)
    return put_label(out, label) if label else out


def put_label(image: np.ndarray, text: str) -> np.ndarray:
    """Copy of a uint8 image with a small caption at the top left (white on a dark outline)."""
    out = to_bgr(image)
    for color, thick in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.putText(out, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, color, thick, cv2.LINE_AA)
    return out


def tile_table(rows: Sequence[Sequence[np.ndarray | None]], pad: int = 3, background: int = 32) -> np.ndarray:
    """Tile a table of uint8 images (None = empty cell) into one BGR image; every tile is resized
    to the first non-empty one's size and short rows are padded with empty cells."""
    first = next((t for row in rows for t in row if t is not None), None)
    if first is None:
        raise ValueError("tile_table needs at least one image")
    blank = np.full(to_bgr(first).shape, background, np.uint8)
    cols = max(len(row) for row in rows)
    flat = [t if t is not None else blank for row in rows for t in (*row, *[None] * (cols - len(row)))]
    flat = [t if t is not None else blank for t in flat]
    return image_grid(flat, cols=cols, pad=pad, background=background)


def write_png_palette(path, image: np.ndarray, colors: int = 256) -> None:
    """Write a uint8 BGR image as a palette PNG (`colors` colours, median cut, no dithering),
    atomically: 3-4x smaller than a true-colour PNG for CAM overlays, which have smooth colour
    ramps over noisy depth texture. Pillow comes with matplotlib."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(to_bgr(image)[..., ::-1]))            # BGR -> RGB
    pal = img.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    with atomic_path(path) as tmp:
        pal.save(tmp, format="PNG", optimize=True)


GT_COLOR = (80, 220, 80)        # BGR green: ground truth under a prediction


def compare_poses(image: np.ndarray, gt: np.ndarray, preds: Sequence[np.ndarray], spec: JointSpec,
                  labels: Sequence[str] | None = None, upscale: int = 1) -> np.ndarray:
    """One row of tiles, one per prediction (e.g. per stage): `image` with the ground truth `gt`
    (J, 3) in thin green under the predicted skeleton (J, 2 or 3; right orange, left blue).

    Points are in `image` pixels; `upscale` enlarges small crops (pixels repeated) before drawing.
    """
    base = to_bgr(image)
    if upscale > 1:
        base = cv2.resize(base, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_NEAREST)
    g = np.asarray(gt, dtype=np.float64).copy()
    g[:, :2] = (g[:, :2] + 0.5) * upscale - 0.5        # pixel centres stay centres
    radius = max(2, round(min(base.shape[:2]) / 80))
    tiles = []
    for i, p in enumerate(preds):
        q = np.asarray(p, dtype=np.float64)
        q = np.concatenate([q[:, :2], np.full((len(q), 1), 2.0)], axis=1)
        q[:, :2] = (q[:, :2] + 0.5) * upscale - 0.5
        tile = draw_skeleton(base, g, spec, radius=max(1, radius - 1), thickness=1, color=GT_COLOR)
        tiles.append(draw_skeleton(tile, q, spec, radius=radius, thickness=max(1, radius // 2),
                                   label=labels[i] if labels else None))
    return image_grid(tiles, cols=len(tiles))


# --------------------------------------------------------------------------- evaluation pictures

def pose_examples(dataset: Any, preds: Predictions, report: EvalReport, num: int) -> list[np.ndarray]:
    """Pictures (BGR uint8) of `num` evenly spaced annotations matched in the last stage: the model
    input crop (from `dataset`, the PoseDataset `preds` came from) with the ground truth under
    each stage's prediction, one tile per stage (`compare_poses`)."""
    from okdpose.data.dataset import denormalize        # torch: imported only when drawing these
    from okdpose.inference import base_dataset

    base = base_dataset(dataset)
    codec = preds.codec
    last = report.matches[preds.stages[-1]]
    anns = np.flatnonzero(last >= 0)
    if not num or not anns.size:
        return []
    pictures = []
    for a in anns[np.unique(np.linspace(0, len(anns) - 1, num).round().astype(int))]:
        row = int(last[a])
        center, scale = preds.centers[row], preds.scales[row]
        gt = np.asarray(report.annotations[a]["keypoints"], np.float64).reshape(-1, 3)
        err = np.linalg.norm(preds.coords[:, row] - gt[None, :, :2], axis=-1)[:, gt[:, 2] > 0]      # (S, visible)
        crop_gt = np.concatenate([codec.frame_to_crop(gt[:, :2], center, scale), gt[:, 2:]], axis=1)
        image = denormalize(base[int(preds.indices[row])][0])[..., ::-1]          # RGB -> BGR
        labels = [f"stage{k} {e.mean():.1f}px" if e.size else f"stage{k}" for k, e in zip(preds.stages, err)]
        crop_preds = [codec.frame_to_crop(c, center, scale) for c in preds.coords[:, row]]
        pictures.append(compare_poses(image, crop_gt, crop_preds, base.spec, labels,
                                      upscale=max(1, round(256 / codec.image_size[1]))))
    return pictures


# --------------------------------------------------------------------------- explanation pictures

TILE_WIDTH = 128      # px; every crop is drawn at this width: captions stay legible, PNGs small


def explain_picture(crop: np.ndarray, gt: np.ndarray, box: Sequence[float], preds: Mapping[int, np.ndarray],
                    cams: Mapping[str, np.ndarray], targets: Sequence[CamTarget], spec: JointSpec) -> np.ndarray:
    """One image's picture (uint8 BGR): column 0 the crop with the ground truth (skeleton, box) and
    plain; then per stage its predicted skeleton above its CAM overlays (feature, head); then the
    extra layers. crop: uint8 (H, W, 3) RGB; gt, preds[stage]: (J, 3) crop px; cams[key]: (H, W)."""
    k = TILE_WIDTH / crop.shape[1]
    size = (TILE_WIDTH, round(crop.shape[0] * k))
    big = cv2.resize(np.ascontiguousarray(crop[..., ::-1]), size,                   # RGB -> BGR
                     interpolation=cv2.INTER_LINEAR if k > 1 else cv2.INTER_AREA)

    def scaled(joints: np.ndarray) -> np.ndarray:
        j = np.asarray(joints, np.float64).copy()
        j[:, :2] = (j[:, :2] + 0.5) * k - 0.5        # pixel centres of the resized crop
        return j

    x0, y0, x1, y1 = ((c + 0.5) * k - 0.5 for c in box)
    columns: list[list[np.ndarray | None]] = [[
        draw_skeleton(big, scaled(gt), spec, box=(x0, y0, x1 - x0, y1 - y0), label="GT"),
        put_label(big, "input")]]
    by_stage: dict[int, list[CamTarget]] = {}
    for t in targets:
        if t.stage is not None:
            by_stage.setdefault(t.stage, []).append(t)
    for stage, ts in by_stage.items():
        pred = scaled(preds[stage])
        pred[:, 2] = 2                                   # draw every predicted joint as visible
        columns.append([draw_skeleton(big, pred, spec, label=f"S{stage} pred")]
                       + [cam_overlay(big, cams[t.key], label=f"S{stage} {t.kind}") for t in ts])
    columns += [[None, cam_overlay(big, cams[t.key], label=t.layer)] for t in targets if t.stage is None]
    height = max(len(c) for c in columns)
    return tile_table([[c[r] if r < len(c) else None for c in columns] for r in range(height)])


def _marker(image: np.ndarray, xy: Sequence[float], color: tuple[int, int, int], filled: bool) -> None:
    """A joint marker drawn in place: a filled dot (predicted) or a ring with a dark outline (true)."""
    p = (int(round(xy[0])), int(round(xy[1])))
    if filled:
        cv2.circle(image, p, 3, (0, 0, 0), -1, cv2.LINE_AA)
        cv2.circle(image, p, 2, color, -1, cv2.LINE_AA)
    else:
        cv2.circle(image, p, 5, (0, 0, 0), 2, cv2.LINE_AA)
        cv2.circle(image, p, 5, color, 1, cv2.LINE_AA)


def joint_method_grid(crop: np.ndarray, gt: np.ndarray, pred: np.ndarray, pose: Mapping[str, np.ndarray],
                      joints: Mapping[str, np.ndarray | None], spec: JointSpec, stage: int) -> np.ndarray:
    """One image's per-joint CAMs of one stage (uint8 BGR): a column per target (the whole pose,
    then each joint), a row per method, under a first row with the crop and the target's joints.
    On every tile the true joint is a green ring, the stage's predicted joint a filled dot (pose
    row: the whole skeletons). crop: uint8 (H, W, 3) RGB; gt, pred: (J, 3) crop px; pose[method]:
    (H, W); joints[method]: (J, H, W), or None for a method without targets (EigenCAM: pose row only)."""
    k = TILE_WIDTH / crop.shape[1]
    size = (TILE_WIDTH, round(crop.shape[0] * k))
    big = cv2.resize(np.ascontiguousarray(crop[..., ::-1]), size,
                     interpolation=cv2.INTER_LINEAR if k > 1 else cv2.INTER_AREA)

    def scaled(points: np.ndarray) -> np.ndarray:
        j = np.asarray(points, np.float64).copy()
        j[:, :2] = (j[:, :2] + 0.5) * k - 0.5
        return j

    g, p = scaled(gt), scaled(pred)
    p[:, 2] = 2
    header = draw_skeleton(draw_skeleton(big, g, spec, thickness=1, color=GT_COLOR), p, spec,
                           label=f"S{stage} pose")
    rows = [[header] + [cam_overlay(big, m, label=name) for name, m in pose.items()]]
    for j, joint in enumerate(spec.names):
        tile = big.copy()
        if g[j, 2] > 0:
            _marker(tile, g[j], GT_COLOR, filled=False)
        _marker(tile, p[j], _joint_color(spec, j), filled=True)
        row: list[np.ndarray | None] = [put_label(tile, joint)]
        for name, maps in joints.items():
            if maps is None:
                row.append(None)
                continue
            cell = cam_overlay(big, maps[j], label=name)
            if g[j, 2] > 0:
                _marker(cell, g[j], GT_COLOR, filled=False)
            _marker(cell, p[j], _joint_color(spec, j), filled=True)
            row.append(cell)
        rows.append(row)
    width = max(len(r) for r in rows)
    return tile_table([[r[c] if c < len(r) else None for r in rows] for c in range(width)])
