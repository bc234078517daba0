"""EigenCAM per stage: an adapter over pytorch-grad-cam's `EigenCAM`, target layers, CAM scores.

Legend: B images, C channels, (h, w) a layer's map, (H, W) the input crop, J joints; points are
(x, y) crop pixels; boxes are (x0, y0, x1, y1) crop pixels; sizes (w, h).

    maps = eigencam(model, images, ["feature_taps.3", "final_layer"])   # {name: (B, H, W) float32}

EigenCAM (Muhammad & Yeasin 2020) projects a layer's activations onto their first principal
component. We use grad-cam 1.5.7's own machinery (`EigenCAM`, `BaseCAM.compute_cam_per_layer`,
`aggregate_multi_layers`, `scale_cam_image`) with three changes, each checked against the stock
class in tests/test_explain.py:

- one forward pass for all layers, and a map per layer (stock `BaseCAM` averages its target
  layers into one map), with activations matched to layers by module (stock matches them by
  hook firing order, wrong when layers are not listed in execution order), copied in the hook
  (a later in-place op, e.g. a residual `out += x`, cannot change them) and taken under
  `torch.no_grad()` (no gradients are needed, so the list output and `targets` never reach
  grad-cam's gradient code, which breaks on them);
- an economy SVD (`full_matrices=False`) in place of stock's full one, which builds the
  (h*w) x (h*w) matrix U (1-2 s per image on a 64x48 map, gigabytes at 128x96) that is
  never used. Both calls run LAPACK `gesdd` and differ only in how much of U it forms; the first
  right-singular vector, sign included, comes from the same computation, so the maps equal
  stock's (the sign itself stays arbitrary, as in stock: see the README);
- the model is left as found: hooks released and every module's train/eval mode restored
  (constructing a grad-cam CAM calls `model.eval()`), also when an error is raised, which is
  never swallowed (stock `__exit__` swallows IndexError).

Maps come at the input resolution, bilinearly upsampled from the layer's, and min-max scaled to
[0, 1] per image, as stock. Scores (`energy_in_box`, `pointing_hit`, `cam_scores`) are pure numpy.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import cv2
import numpy as np
import torch
from pytorch_grad_cam import EigenCAM
from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from okdpose.codec import decode_heatmaps
from okdpose.data.transforms import PIXEL_STD, affine_points, get_affine_transform
from okdpose.joints import JointSpec
from okdpose.model.fuse import cached_inference_copy
from okdpose.model.hrnet import HRNetTrunk
from okdpose.viz import cam_overlay, draw_skeleton, put_label, tile_table


class LayerError(ValueError):
    """A target layer that cannot be explained; the message lists valid examples."""


# --------------------------------------------------------------------------- projection

def economy_2d_projection(activation_batch: np.ndarray) -> np.ndarray:
    """(B, C, h, w) activations -> (B, h, w) float32 projections on the first principal component.

    grad-cam's `get_2d_projection` line for line, with `full_matrices=False`: same V, same sign.
    BLAS runs single-threaded here: a tall, thin SVD gains nothing from threads and loses a lot
    to their start-up on a busy CPU.
    """
    activation_batch = activation_batch.copy()
    activation_batch[np.isnan(activation_batch)] = 0
    projections = []
    with threadpool_limits(limits=1, user_api="blas"):
        for activations in activation_batch:
            reshaped = activations.reshape(activations.shape[0], -1).transpose()   # (h*w, C)
            reshaped = reshaped - reshaped.mean(axis=0)    # centring: stock does it, maps depend on it
            _, _, vt = np.linalg.svd(reshaped, full_matrices=False)
            projections.append((reshaped @ vt[0, :]).reshape(activations.shape[1:]))
    return np.float32(projections)


# --------------------------------------------------------------------------- the adapter

class _LayerActivations(ActivationsAndGradients):
    """grad-cam's hook holder, keyed by module: after a forward, `activations` follows the order
    of `target_layers` whatever order the hooks fired in; a non-map output is an error."""

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
        self.names = {id(m): name for name, m in layers.items()}
        self.order = list(layers.values())
        self._captured: dict[int, Tensor] = {}
        super().__init__(model, self.order, reshape_transform=None, detach=True)

    def save_activation(self, module: nn.Module, input: Any, output: Any) -> None:
        name = self.names[id(module)]
        if not isinstance(output, Tensor) or output.dim() != 4:
            what = (f"a {output.dim()}-D tensor {tuple(output.shape)}" if isinstance(output, Tensor)
                    else f"a {type(output).__name__}")
            raise LayerError(f"layer {name!r} outputs {what}, not a 4-D (B, C, h, w) feature map; "
                             f"choose a module that outputs one, e.g. {', '.join(example_layers(self.model))}")
        if id(module) in self._captured:
            raise LayerError(f"layer {name!r} runs more than once per forward pass, so its map is ambiguous; "
                             "choose a module that runs once")
        self._captured[id(module)] = output.detach().to("cpu", copy=True)

    def __call__(self, x: Tensor) -> Any:
        self._captured = {}
        self.gradients, self.activations = [], []
        out = self.model(x)
        silent = [self.names[id(m)] for m in self.order if id(m) not in self._captured]
        if silent:
            raise LayerError(f"layer(s) {silent} did not run in the forward pass (not used by this model); "
                             f"choose among e.g. {', '.join(example_layers(self.model))}")
        self.activations = [self._captured[id(m)] for m in self.order]
        self._captured = {}
        return out


class LayerEigenCAM(EigenCAM):
    """pytorch-grad-cam `EigenCAM` over several layers: one forward, one (B, H, W) map per layer.

    Use as a context manager: on exit the hooks are released and every module's train/eval mode
    restored; exceptions propagate. `cam(images)` -> {name: maps}; `cam.outputs` holds the
    model's output of that forward (for a `MultiOutHRNet`, the heatmaps of every stage).
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
        self._modes: Optional[list[tuple[nn.Module, bool]]] = [(m, m.training) for m in model.modules()]
        self.layer_names = list(layers)
        try:
            super().__init__(model, list(layers.values()))     # calls model.eval(), registers stock hooks
            self.activations_and_grads.release()               # replaced by the module-keyed holder
            self.activations_and_grads = _LayerActivations(model, layers)
        except BaseException:
            self.release()
            raise

    def get_cam_image(self, input_tensor: Tensor, target_layer: nn.Module, targets: Any,
                      activations: np.ndarray, grads: Any, eigen_smooth: bool) -> np.ndarray:
        return economy_2d_projection(activations)

    def __call__(self, input_tensor: Tensor) -> dict[str, np.ndarray]:   # type: ignore[override]
        x = input_tensor.to(self.device)
        with torch.no_grad():
            self.outputs = self.activations_and_grads(x)
        per_layer = self.compute_cam_per_layer(x, [], eigen_smooth=False)    # [(B, 1, H, W)]
        # `aggregate_multi_layers` of one layer is what stock returns for that layer alone
        return {name: self.aggregate_multi_layers([cam]) for name, cam in zip(self.layer_names, per_layer)}

    def release(self) -> None:
        """Remove the hooks and restore train/eval modes (idempotent)."""
        holder = getattr(self, "activations_and_grads", None)
        if holder is not None:
            holder.release()
        if self._modes is not None:
            for module, training in self._modes:
                module.training = training
            self._modes = None

    def __exit__(self, exc_type: Any, exc_value: Any, exc_tb: Any) -> None:
        self.release()          # returns None: exceptions are never swallowed

    def __del__(self) -> None:
        self.release()


def resolve_layers(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Dotted module names -> modules (duplicates dropped); a name that is not a module of
    `model` raises LayerError listing valid examples."""
    out: dict[str, nn.Module] = {}
    for name in names:
        if name in out:
            continue
        try:
            if not name:
                raise AttributeError("the model itself is not a target layer")
            out[name] = model.get_submodule(name)
        except AttributeError:
            raise LayerError(f"layer {name!r} is not a module of {type(model).__name__}; use a dotted "
                             f"module name such as {', '.join(example_layers(model))}") from None
    if not out:
        raise LayerError(f"no target layers given; e.g. {', '.join(example_layers(model))}")
    return out


def example_layers(model: nn.Module) -> list[str]:
    """A few valid target names: the feature taps, heads and lowest-resolution branch, if any."""
    names = [*getattr(model, "feature_layer_names", list)(), *getattr(model, "head_layer_names", list)()]
    modules = dict(model.named_modules())
    branches = [tuple(map(int, m.groups())) for n in modules if (m := _BRANCH.fullmatch(n))]
    if branches:                                   # the last module's lowest-resolution branch
        names.append("stage{}.{}.branches.{}".format(*max(branches)))
    return names or [n for n, m in modules.items() if isinstance(m, nn.Conv2d)][:4]


_BRANCH = re.compile(r"stage(\d+)\.(\d+)\.branches\.(\d+)")


def eigencam(model: nn.Module, images: Tensor, layers: Sequence[str],
             batch_size: int = 16, fold_bn: bool = False) -> dict[str, np.ndarray]:
    """EigenCAM maps of `layers` (dotted module names) for `images` (B, 3, H, W), the normalised
    crops the model sees -> {name: (B, H, W) float32 in [0, 1]}; one forward pass per batch.
    The maps equal stock grad-cam's bit for bit (tests/test_explain.py).

    `fold_bn=True` runs an HRNet as its `okdpose.model.fuse.cached_inference_copy` instead (BN
    folded into the convs, except where a target layer is a folded conv or BN; channels-last on
    CPU; made once per state of the model, 0.5-0.75 s for a W32): the forward pass, most of the time,
    gets faster (`python -m okdpose.bench`), and the maps then equal stock's only up to float
    rounding (|diff| ~1e-6 to 1e-5 on the [0, 1] maps)."""
    return eigencam_with_outputs(model, images, layers, batch_size, fold_bn)[0]


def eigencam_with_outputs(model: nn.Module, images: Tensor, layers: Sequence[str],
                          batch_size: int = 16, fold_bn: bool = False) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """`eigencam` plus the model's outputs of the same forward pass, as numpy (a list output,
    e.g. per-stage heatmaps (B, J, h, w), stays a list; a tensor becomes a one-item list)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    modules = resolve_layers(model, layers)
    net, channels_last = model, False
    if fold_bn and isinstance(model, HRNetTrunk):
        net = cached_inference_copy(model, keep=list(modules))
        channels_last = next(iter(net.parameters())).is_contiguous(memory_format=torch.channels_last)
        modules = resolve_layers(net, list(modules))
    maps: dict[str, list[np.ndarray]] = {name: [] for name in modules}
    outputs: list[list[np.ndarray]] = []
    with LayerEigenCAM(net, modules) as cam:
        for chunk in images.split(batch_size):
            if channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            for name, m in cam(chunk).items():
                maps[name].append(m)
            out = cam.outputs if isinstance(cam.outputs, (list, tuple)) else [cam.outputs]
            outputs.append([o.detach().cpu().numpy() for o in out])
    return ({name: np.concatenate(m) for name, m in maps.items()},
            [np.concatenate(parts) for parts in zip(*outputs)])


# --------------------------------------------------------------------------- target layers

@dataclass(frozen=True)
class CamTarget:
    """One explained layer: `key` names it in metrics/pictures ("stage2/feature", "stage2/head",
    "extra/stage4.2.branches.3"), `layer` is the dotted module name, `stage` 1-based or None."""

    key: str
    layer: str
    stage: Optional[int]
    kind: str            # "feature" | "head" | "extra"


def cam_targets(model: nn.Module, stages: Optional[Sequence[int]] = None, heads: bool = True,
                extra: Sequence[str] = ()) -> list[CamTarget]:
    """Per selected stage output (1-based; None = all): the branch-0 feature its head reads and,
    with `heads`, the head; then the `extra` layers. Unknown stages or layers raise LayerError."""
    available = tuple(model.output_stages)
    chosen = available if stages is None else tuple(stages)
    bad = [s for s in chosen if s not in available]
    if bad or not chosen:
        raise LayerError(f"explain.stages {list(chosen)}: this model's outputs are stages {list(available)}; "
                         "pick among them (null = all)")
    features = dict(zip(available, model.feature_layer_names()))
    head_names = dict(zip(available, model.head_layer_names()))
    targets = []
    for s in chosen:
        targets.append(CamTarget(f"stage{s}/feature", features[s], s, "feature"))
        if heads:
            targets.append(CamTarget(f"stage{s}/head", head_names[s], s, "head"))
    if extra:
        resolve_layers(model, extra)          # fail early on a bad name
    targets += [CamTarget(f"extra/{name}", name, None, "extra") for name in dict.fromkeys(extra)]
    return targets


# --------------------------------------------------------------------------- crop geometry

def box_in_crop(bbox: np.ndarray, center: np.ndarray, scale: np.ndarray, image_size: Sequence[int]) -> np.ndarray:
    """COCO boxes (B, 4) [x, y, w, h] frame px -> (B, 4) (x0, y0, x1, y1) crop px through each crop's
    affine (rotation 0: the corners' bounding box is the exact image)."""
    out = []
    for (x, y, w, h), c, s in zip(np.asarray(bbox, np.float64), center, scale):
        corners = affine_points(np.array([[x, y], [x + w, y], [x, y + h], [x + w, y + h]]),
                                get_affine_transform(c, s, 0.0, image_size))
        out.append([*corners.min(axis=0), *corners.max(axis=0)])
    return np.asarray(out, dtype=np.float32)


def joints_in_crop(joints: np.ndarray, center: np.ndarray, scale: np.ndarray, image_size: Sequence[int]) -> np.ndarray:
    """(B, J, 3) frame px + v -> (B, J, 3) crop px + v."""
    trans = np.stack([get_affine_transform(c, s, 0.0, image_size) for c, s in zip(center, scale)])
    j = np.asarray(joints, dtype=np.float64)
    return np.concatenate([affine_points(j[..., :2], trans), j[..., 2:]], axis=-1).astype(np.float32)


def predictions_in_crop(heatmaps: np.ndarray, center: np.ndarray, scale: np.ndarray,
                        image_size: Sequence[int]) -> np.ndarray:
    """One stage's heatmaps (B, J, h, w) -> decoded joints (B, J, 3) crop px + max value."""
    coords, maxvals = decode_heatmaps(heatmaps, center, scale)
    trans = np.stack([get_affine_transform(c, s, 0.0, image_size) for c, s in zip(center, scale)])
    return np.concatenate([affine_points(coords, trans), maxvals[..., None]], axis=-1).astype(np.float32)


def pointing_radius(bbox: np.ndarray, scale: np.ndarray, image_size: Sequence[int], fraction: float) -> np.ndarray:
    """`fraction` * max(box w, h) frame px (the PCK normaliser of okdpose.metrics.pck) -> (B,) crop px."""
    box_size = np.asarray(bbox, np.float64)[:, 2:4].max(axis=1)
    crop_per_frame_px = float(image_size[0]) / (np.asarray(scale, np.float64)[:, 0] * PIXEL_STD)
    return (fraction * box_size * crop_per_frame_px).astype(np.float32)


# --------------------------------------------------------------------------- scores (pure numpy)

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


# --------------------------------------------------------------------------- pictures

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
    columns: list[list[Optional[np.ndarray]]] = [[
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
