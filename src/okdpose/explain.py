"""EigenCAM per stage: an adapter over pytorch-grad-cam's `EigenCAM`, the target layers of a
multi-output HRNet, and the explained samples (maps with the crops, boxes, joints, predictions).

Legend: B images, C channels, (h, w) a layer's map, (H, W) the input crop, J joints; points are
(x, y) crop pixels; boxes are (x0, y0, x1, y1) crop pixels; sizes (w, h).

    maps = eigencam(model, images, ["feature_taps.3", "final_layer"])   # {name: (B, H, W) float32}

EigenCAM (Muhammad & Yeasin 2020) projects a layer's activations onto their first principal
component. We use grad-cam 1.5.7's own machinery (`EigenCAM`, `BaseCAM.compute_cam_per_layer`,
`aggregate_multi_layers`, `scale_cam_image`) with four changes, each checked against the stock
class in tests/test_explain.py:

- one forward pass for all layers, and a map per layer (stock `BaseCAM` averages its target
  layers into one map), with activations matched to layers by module (stock matches them by
  hook firing order, wrong when layers are not listed in execution order), copied in the hook
  (a later in-place op, e.g. a residual `out += x`, cannot change them) and taken under
  `torch.no_grad()` (no gradients are needed, so the list output and `targets` never reach
  grad-cam's gradient code, which breaks on them);
- an economy SVD (`full_matrices=False`) in place of stock's full one, which builds the
  (h*w) x (h*w) matrix U that is never used (slow, and gigabytes at 128x96). Both calls run
  LAPACK `gesdd` and differ only in how much of U it forms; the first right-singular vector,
  sign included, comes from the same computation, so with `sign="stock"` the maps equal stock's;
- the sign (`sign="oriented"`, the default): the component's sign is arbitrary, and stock clips
  the projection at 0, so an inverted component lights up the background and leaves the infant
  dark. We negate the projection when its covariance with the channel-mean activation is
  negative (`oriented_sign`); on models/model.pt's 8 stage layers x 40 test crops this picked the
  orientation with more CAM energy in the infant's box for 99.4% of the maps, stock's sign 75%;
- the model is left as found: hooks released and every module's train/eval mode restored
  (constructing a grad-cam CAM calls `model.eval()`), also when an error is raised, which is
  never swallowed (stock `__exit__` swallows IndexError). A model already in eval mode is not
  walked again: `model.eval()` over the ~1000 modules of W8 cost ~14 ms per call, ~9 % of
  the explain stage's EigenCAM time (cProfile, AVX2 CPU).

`autocast` (explain.precision) runs the forward in bf16 / fp16; the activations are taken in
float32 and the CAM maths (SVD, scaling) stay float32.

Maps come at the input resolution, bilinearly upsampled from the layer's, and min-max scaled to
[0, 1] per image, as stock. Their scores are `okdpose.cam_scores`', their pictures
`okdpose.viz.explain_picture`.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM
from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients
from threadpoolctl import ThreadpoolController
from torch import Tensor, nn

from okdpose.cam_scores import pointing_radius
from okdpose.data.dataset import PoseDataset, denormalize
from okdpose.model.fuse import cached_inference_copy
from okdpose.model.hrnet import HRNetTrunk


class LayerError(ValueError):
    """A target layer that cannot be explained; the message lists valid examples."""


# --------------------------------------------------------------------------- projection

SIGNS = ("oriented", "stock")
_BLAS: Optional[ThreadpoolController] = None


def _one_blas_thread() -> Any:
    """A context that runs BLAS single-threaded. The library scan behind it is done once per
    process: `threadpool_limits(...)` rescans the loaded libraries on every call, which cost
    ~7 ms per explained layer, more than its SVD (measured with cProfile, W8, 8 layers)."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def economy_2d_projection(activation_batch: np.ndarray, orient: bool = False) -> np.ndarray:
    """(B, C, h, w) activations -> (B, h, w) float32 projections on the first principal component.

    grad-cam's `get_2d_projection` line for line, with `full_matrices=False`: same V, same sign.
    `orient=True` then negates a projection whose covariance with the layer's channel-mean
    activation is negative (`oriented_sign`), so the map is high where the layer fires; a
    projection already oriented so is returned bit for bit. BLAS runs single-threaded here: a
    tall, thin SVD gains nothing from threads and loses a lot to their start-up on a busy CPU.
    """
    activation_batch = activation_batch.copy()
    activation_batch[np.isnan(activation_batch)] = 0
    projections = []
    with _one_blas_thread():
        for activations in activation_batch:
            reshaped = activations.reshape(activations.shape[0], -1).transpose()   # (h*w, C)
            reshaped = reshaped - reshaped.mean(axis=0)    # centring: stock does it, maps depend on it
            _, _, vt = np.linalg.svd(reshaped, full_matrices=False)
            projection = reshaped @ vt[0, :]
            if orient:
                projection = projection * oriented_sign(projection, reshaped)
            projections.append(projection.reshape(activations.shape[1:]))
    return np.float32(projections)


def oriented_sign(projection: np.ndarray, centred: np.ndarray) -> float:
    """+1 or -1: the sign that gives the projection (h*w,) a non-negative covariance with the
    channel-mean activation, given the channel-centred activations (h*w, C). The SVD's sign is
    arbitrary; this one makes the map agree with where the layer fires on average (+1 on a tie).
    Covariance, not the sign of mean(a) . v: adding a constant to a channel (a BN bias) changes
    neither the component nor this sign."""
    return -1.0 if float(projection @ centred.mean(axis=1)) < 0 else 1.0


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
        # a copy (a later in-place op cannot change it), float32 (numpy has no bf16; the SVD runs in fp32)
        self._captured[id(module)] = output.detach().to("cpu", torch.float32, copy=True)

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
    `sign`: "oriented" (`oriented_sign`) or "stock" (grad-cam's arbitrary SVD sign).
    `autocast`: None (fp32) or the forward's autocast dtype (bf16 / fp16); maps are float32.
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module], sign: str = "oriented",
                 autocast: Optional[torch.dtype] = None) -> None:
        if sign not in SIGNS:
            raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
        self.orient, self.autocast = sign == "oriented", autocast
        self._modes: Optional[list[tuple[nn.Module, bool]]] = [(m, m.training) for m in model.modules()]
        self.layer_names = list(layers)
        try:
            with _eval_once(model, self._modes):
                super().__init__(model, list(layers.values()))     # calls model.eval(), registers stock hooks
            self.activations_and_grads.release()               # replaced by the module-keyed holder
            self.activations_and_grads = _LayerActivations(model, layers)
        except BaseException:
            self.release()
            raise

    def get_cam_image(self, input_tensor: Tensor, target_layer: nn.Module, targets: Any,
                      activations: np.ndarray, grads: Any, eigen_smooth: bool) -> np.ndarray:
        return economy_2d_projection(activations, self.orient)

    def __call__(self, input_tensor: Tensor) -> dict[str, np.ndarray]:   # type: ignore[override]
        x = input_tensor.to(self.device)
        with torch.no_grad(), autocast_context(self.device, self.autocast):
            self.outputs = self.activations_and_grads(x)
        per_layer = self.compute_cam_per_layer(x, [], eigen_smooth=False)    # [(B, 1, H, W)]
        # `aggregate_multi_layers` of one layer is what stock returns for that layer alone
        return {name: self.aggregate_multi_layers([cam]) for name, cam in zip(self.layer_names, per_layer)}

    def release(self) -> None:
        """Remove the hooks and restore train/eval modes (idempotent)."""
        holder = getattr(self, "activations_and_grads", None)
        if holder is not None:
            holder.release()
        if getattr(self, "_modes", None) is not None:
            for module, training in self._modes:
                if module.training != training:      # nn.Module.__setattr__ is slow: only what changed
                    module.training = training
            self._modes = None

    def __exit__(self, exc_type: Any, exc_value: Any, exc_tb: Any) -> None:
        self.release()          # returns None: exceptions are never swallowed

    def __del__(self) -> None:
        self.release()


@contextlib.contextmanager
def _eval_once(model: nn.Module, modes: Sequence[tuple[nn.Module, bool]]) -> Any:
    """Around grad-cam's constructor: when every module is already in eval mode and none
    overrides `train`, `model.eval()` would change nothing, so it is answered without walking
    the modules (an instance attribute shadowing the method, removed on exit)."""
    idle = all(not training and type(m).train is nn.Module.train for m, training in modes)
    if idle and "eval" not in vars(model):
        object.__setattr__(model, "eval", lambda: model)
        try:
            yield
        finally:
            object.__delattr__(model, "eval")
    else:
        yield


def autocast_context(device: Any, dtype: Optional[torch.dtype]) -> Any:
    """torch.autocast on `device`'s type in `dtype`; a no-op for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


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


def eigencam(model: nn.Module, images: Tensor, layers: Sequence[str], batch_size: int = 16,
             fold_bn: bool = False, sign: str = "oriented", autocast: Optional[torch.dtype] = None) -> dict[str, np.ndarray]:
    """EigenCAM maps of `layers` (dotted module names) for `images` (B, 3, H, W), the normalised
    crops the model sees -> {name: (B, H, W) float32 in [0, 1]}; one forward pass per batch.
    With `sign="stock"` the maps equal stock grad-cam's up to float rounding (tests/test_explain.py:
    within 1e-6; bit for bit on the CPUs measured so far, as both SVDs run the same LAPACK gesdd);
    "oriented" (default) negates the components that come out against the activations first.

    `fold_bn=True` runs an HRNet as its `okdpose.model.fuse.cached_inference_copy` instead (BN
    folded into the convs, except where a target layer is a folded conv or BN; channels-last on
    CPU; made once per state of the model, as folding takes time): the forward pass, most of the
    time, gets faster (`python -m okdpose.bench`), and the maps then equal stock's only up to
    float rounding (|diff| ~1e-6 to 1e-5 on the [0, 1] maps). `autocast` (bf16 / fp16) runs
    the forward so; the maps then differ from fp32's (`map_difference` measures by how much)."""
    return eigencam_with_outputs(model, images, layers, batch_size, fold_bn, sign, autocast)[0]


def eigencam_with_outputs(model: nn.Module, images: Tensor, layers: Sequence[str], batch_size: int = 16,
                          fold_bn: bool = False, sign: str = "oriented", autocast: Optional[torch.dtype] = None,
                          ) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """`eigencam` plus the model's outputs of the same forward pass, as float32 numpy (a list
    output, e.g. per-stage heatmaps (B, J, h, w), stays a list; a tensor becomes a one-item list)."""
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
    with LayerEigenCAM(net, modules, sign, autocast) as cam:
        for chunk in images.split(batch_size):
            if channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            for name, m in cam(chunk).items():
                maps[name].append(m)
            out = cam.outputs if isinstance(cam.outputs, (list, tuple)) else [cam.outputs]
            outputs.append([o.detach().float().cpu().numpy() for o in out])
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


# --------------------------------------------------------------------------- explained samples

@dataclass(frozen=True)
class ExplainSamples:
    """Explained crops and what is drawn and scored on them, all in crop px (B images)."""

    names: list[str]                 # "<image_id:012d>_<ann_id>", one per image
    crops: np.ndarray                # (B, H, W, 3) uint8 RGB: the crops the model saw
    boxes: np.ndarray                # (B, 4) ground-truth boxes (x0, y0, x1, y1)
    joints: np.ndarray               # (B, J, 3) ground truth + v
    radius: np.ndarray               # (B,) pointing-game radius
    preds: dict[int, np.ndarray]     # stage (1-based) -> (B, J, 3) decoded joints + heatmap maximum
    cams: dict[str, np.ndarray]      # CamTarget.key -> (B, H, W) maps in [0, 1]
    inputs: Optional[Tensor] = None  # (B, 3, H, W) the normalised crops (what the model ran on)
    heatmaps: Optional[dict[int, np.ndarray]] = None   # stage -> (B, J, h, w) its heatmaps


def explain_samples(model: nn.Module, dataset: PoseDataset, rows: Sequence[int], targets: Sequence[CamTarget],
                    pointing_fraction: float, sign: str = "oriented",
                    autocast: Optional[torch.dtype] = None) -> ExplainSamples:
    """EigenCAM of `targets` on the dataset's `rows` (one forward pass per batch, under
    `autocast` when given, whose per-stage heatmaps give the predictions), with the ground truth
    mapped into the crops by the dataset's codec; the pointing radius is `pointing_fraction` *
    max(box w, h)."""
    samples = [dataset[int(i)] for i in rows]
    images = torch.stack([s[0] for s in samples])
    center, scale = np.stack([s[3]["center"] for s in samples]), np.stack([s[3]["scale"] for s in samples])
    bbox, codec, r = dataset.records.bbox[rows], dataset.codec, dataset.records
    maps, heatmaps = eigencam_with_outputs(model, images, [t.layer for t in targets], sign=sign, autocast=autocast)
    preds = {}
    for stage, hm in zip(model.output_stages, heatmaps):
        coords, maxvals = codec.decode_crop(hm)
        preds[stage] = np.concatenate([coords, maxvals[..., None]], axis=-1)
    return ExplainSamples(
        names=[f"{r.image_id[i]:012d}_{r.ann_id[i]}" for i in rows],
        crops=np.stack([denormalize(image) for image in images]),
        boxes=codec.box_to_crop(bbox, center, scale),
        joints=codec.joints_to_crop(np.stack([s[3]["joints"] for s in samples]), center, scale),
        radius=pointing_radius(bbox, codec.crop_px_per_frame_px(scale), pointing_fraction),
        preds=preds,
        cams={t.key: maps[t.layer] for t in targets},
        inputs=images,
        heatmaps=dict(zip(model.output_stages, heatmaps)))


def precision_shift(model: nn.Module, samples: ExplainSamples, targets: Sequence[CamTarget], codec: Any,
                    sign: str = "oriented") -> dict[str, Any]:
    """How far a lower-precision explanation moved from fp32 (accuracy is not traded silently):
    the same EigenCAM layers and predictions in fp32 on the same crops -> {"maps": {key:
    {"max_abs", "mean_abs"}} of the [0, 1] maps, "keypoints_px": {stage: {"mean", "max"}} of
    the decoded joints (crop px)}."""
    ref, heatmaps = eigencam_with_outputs(model, samples.inputs, [t.layer for t in targets], sign=sign)
    maps = {}
    for t in targets:
        d = np.abs(samples.cams[t.key] - ref[t.layer])
        maps[t.key] = {"max_abs": round(float(d.max()), 6), "mean_abs": round(float(d.mean()), 6)}
    px = {}
    for stage, hm in zip(model.output_stages, heatmaps):
        coords, _ = codec.decode_crop(hm)
        d = np.linalg.norm(samples.preds[stage][..., :2] - coords, axis=-1)
        px[f"stage{stage}"] = {"mean": round(float(d.mean()), 4), "max": round(float(d.max()), 4)}
    return {"maps": maps, "keypoints_px": px}
