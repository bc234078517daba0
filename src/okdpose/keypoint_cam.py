"""pytorch-grad-cam's methods on a heatmap model: a stage-k model wrapper, keypoint targets, and
per-joint maps with grad-cam's own classes.

Legend: B images, J joints, (h, w) heatmap, (H, W) the input crop; peaks are (x, y) heatmap
pixels (integers).

    net = StageHeatmaps(model, stage=2)                   # x (B, 3, H, W) -> (B, J, h, w)
    peaks = predicted_peaks(heatmaps)                     # (B, J, 2)
    maps = joint_cams(net, "gradcam", "feature_taps.1", images, peaks)   # (B, J + 1, H, W): joints, pose

grad-cam's methods were written for classifiers (`ClassifierOutputTarget`: one logit); a heatmap
model's "score" for joint j is its heatmap value at the joint's peak (`KeypointTarget`), and the
whole pose's the sum over joints (`PoseTarget`). A CAM object explains one (image, target) pair
per batch item, so the J + 1 targets of an image are J + 1 batch items: for gradient methods the
wrapper repeats the image's stage feature J + 1 times (one trunk forward per image, a backward
through the head only). The maps are those of grad-cam's classes, unchanged (tests/
test_keypoint_cam.py compares every method with a plain stock call, one image and target each).
Faithfulness: grad-cam's `CamMultImageConfidenceChange` and ROAD with these targets.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from pytorch_grad_cam import (AblationCAM, EigenCAM, EigenGradCAM, GradCAM, GradCAMPlusPlus, HiResCAM,
                              LayerCAM, ScoreCAM, XGradCAM)
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
from torch import Tensor, nn

from okdpose.explain import autocast_context, eigencam
from okdpose.model.multi_out import MultiOutHRNet, head_name

# the names of grad-cam's own cam.py example ("gradcampp" for its "gradcam++": MLflow metric names
# take no "+"); FullGrad is left out (see the README): it ignores the target layer (it sums input x
# gradient and every bias x gradient of the network), so it is no per-stage layer map
METHODS: dict[str, type] = {
    "eigencam": EigenCAM, "gradcam": GradCAM, "hirescam": HiResCAM, "gradcampp": GradCAMPlusPlus,
    "xgradcam": XGradCAM, "layercam": LayerCAM, "eigengradcam": EigenGradCAM, "scorecam": ScoreCAM,
    "ablationcam": AblationCAM,
}
# methods whose maps do not depend on the target (one map per image, whatever the joint)
CLASS_AGNOSTIC = frozenset({"eigencam"})


class StageHeatmaps(nn.Module):
    """Stage k's heatmaps of a `MultiOutHRNet` as one tensor: (B, 3, H, W) -> (B * copies, J, h, w).

    Runs a copy of the model truncated after stage k (the same weights; nothing after stage k
    runs): its trunk up to stage k's feature under `torch.no_grad()`, then the feature tap
    (`tap`, the wrapper's name of the model's `feature_taps.{k-1}`) and stage k's head (`head`)
    with gradients. The gradient methods' backward so runs through the 1x1 head only, not the
    whole trunk, and gives the same gradients at the tap. With `copies` > 1 every feature is
    repeated that many times before the tap, so grad-cam explains several targets of one image
    from one trunk forward (its batch item i * copies + t is image i, target t). Layers below the
    tap run without gradients: gradient methods can explain only `tap` (and `head`). The copy is
    in eval mode and shares no gradients with `model`. `autocast` (bf16 / fp16) runs the no-grad
    trunk so, the costly part; its feature is cast back to float32, so the tap and head, whose
    activations and gradients grad-cam reads, run in float32 (numpy has no bf16).
    """

    def __init__(self, model: nn.Module, stage: int, autocast: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not isinstance(model, MultiOutHRNet):
            raise TypeError(f"per-joint CAMs need an okdpose MultiOutHRNet, got a {type(model).__name__}")
        if stage not in model.output_stages:
            raise ValueError(f"stage {stage} is not an output of this model (stages {list(model.output_stages)})")
        net = MultiOutHRNet(model.num_joints, model.width, n_stage=stage, multi=False)
        missing, _ = net.load_state_dict(model.state_dict(), strict=False)
        if missing:                         # a truncated single-head net is a strict subset
            raise ValueError(f"stage {stage} copy: weights missing from the model: {missing[:4]}")
        net = net.to(next(model.parameters()).device).eval()
        self.stage, self.copies, self.autocast = stage, 1, autocast
        self.tap, self.head = net.feature_taps[stage - 1], net.get_submodule(head_name(stage))
        net.feature_taps[stage - 1] = nn.Identity()      # the tap runs outside the no-grad trunk
        self.trunk = net
        self._names = {f"feature_taps.{stage - 1}": "tap", head_name(stage): "head"}

    def layer_name(self, name: str) -> str:
        """The wrapper's dotted name of the model's layer `name`."""
        return self._names.get(name, f"trunk.{name}")

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad(), autocast_context(x.device, self.autocast):
            feature = self.trunk.forward_features(x)[-1].float()
        if self.copies > 1:
            feature = feature.repeat_interleave(self.copies, 0)
        if torch.is_grad_enabled():
            feature.requires_grad_()        # a leaf: the backward stops here
        return self.head(self.tap(feature))


class KeypointTarget:
    """grad-cam target: joint j's heatmap value at heatmap pixel (x, y) of one image's output (J, h, w)."""

    def __init__(self, joint: int, x: int, y: int) -> None:
        self.joint, self.x, self.y = int(joint), int(x), int(y)

    def __call__(self, model_output: Tensor) -> Tensor:
        return model_output[..., self.joint, self.y, self.x]


class PoseTarget:
    """grad-cam target: the sum over joints of each joint's heatmap value at its peak (J, 2) (x, y)."""

    def __init__(self, peaks: np.ndarray) -> None:
        p = np.asarray(peaks, np.int64)
        self.joints, self.xs, self.ys = (torch.arange(len(p)), torch.from_numpy(p[:, 0]), torch.from_numpy(p[:, 1]))

    def __call__(self, model_output: Tensor) -> Tensor:
        return model_output[..., self.joints, self.ys, self.xs].sum(-1)


def predicted_peaks(heatmaps: np.ndarray) -> np.ndarray:
    """(B, J, h, w) -> (B, J, 2) int (x, y) of each heatmap's maximum (first on ties)."""
    hm = np.asarray(heatmaps)
    b, j, h, w = hm.shape
    flat = hm.reshape(b, j, -1).argmax(-1)
    return np.stack([flat % w, flat // w], axis=-1).astype(np.int64)


def gt_peaks(joints: np.ndarray, stride: int, heatmap_size: Sequence[int], fallback: np.ndarray) -> np.ndarray:
    """Ground-truth joints (B, J, 3) crop px + v -> (B, J, 2) int heatmap pixels (rounded);
    unlabelled joints (v = 0) and joints off the heatmap take the `fallback` peak (B, J, 2)."""
    j = np.asarray(joints, np.float64)
    xy = np.floor(j[..., :2] / stride + 0.5).astype(np.int64)
    w, h = int(heatmap_size[0]), int(heatmap_size[1])
    ok = (j[..., 2] > 0) & (xy[..., 0] >= 0) & (xy[..., 0] < w) & (xy[..., 1] >= 0) & (xy[..., 1] < h)
    return np.where(ok[..., None], xy, np.asarray(fallback, np.int64))


def image_targets(peaks: np.ndarray, joints: Optional[Sequence[int]] = None) -> list[Callable]:
    """One image's targets: `KeypointTarget` of each joint in `joints` (all by default), then the
    whole pose's `PoseTarget`."""
    chosen = range(len(peaks)) if joints is None else joints
    return [KeypointTarget(j, *peaks[j]) for j in chosen] + [PoseTarget(peaks)]


def make_cam(method: str, net: nn.Module, layer: str) -> Any:
    """grad-cam's `method` class on `net`'s dotted `layer` (one target layer)."""
    try:
        cls = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown CAM method {method!r}; choose among {sorted(METHODS)}") from None
    return cls(net, [net.get_submodule(layer)])


def joint_cams(net: StageHeatmaps, method: str, layer: str, images: Tensor, peaks: np.ndarray,
               joints: Optional[Sequence[int]] = None, batch_size: int = 32, sign: str = "oriented") -> np.ndarray:
    """`method`'s maps of `layer` (the wrapped model's dotted name) for every image (B, 3, H, W)
    and target: -> (B, T, H, W) float32 in [0, 1], T = the `joints` (all by default) then the
    whole pose (`image_targets` of the (B, J, 2) `peaks`). Gradient methods explain `batch_size`
    // T images per call (one trunk forward per image, `StageHeatmaps.copies`); ScoreCAM and
    AblationCAM one pair per call (they batch their own C perturbed forwards); EigenCAM, which
    ignores targets, runs once per batch (`okdpose.explain.eigencam` with `sign`) and its map is
    repeated for every target."""
    per_image = [image_targets(p, joints) for p in peaks]
    t = len(per_image[0])
    name = net.layer_name(layer)
    if method in CLASS_AGNOSTIC:
        maps = eigencam(net, images, [name], batch_size=batch_size, sign=sign, autocast=net.autocast)[name]
        return np.repeat(maps[:, None], t, axis=1)
    if name != "tap":
        raise ValueError(f"{method} explains stage {net.stage}'s feature layer feature_taps.{net.stage - 1} only "
                         f"(the trunk below it runs without gradients), got {layer!r}")
    cam, out = make_cam(method, net, name), []
    try:
        if cam.uses_gradients:      # copies of the feature: one trunk forward per image, all its targets
            per_batch = max(1, batch_size // t)
            net.copies = t
            for i in range(0, len(images), per_batch):
                targets = [target for p in per_image[i:i + per_batch] for target in p]
                out.append(cam(images[i:i + per_batch], targets=targets))
        else:                       # ScoreCAM, AblationCAM: their own batches of C perturbed forwards
            with contextlib.redirect_stderr(io.StringIO()):         # per pair; and their tqdm bars
                out = [cam(images[b:b + 1], targets=[target]) for b in range(len(images)) for target in per_image[b]]
    finally:
        net.copies = 1
        cam.activations_and_grads.release()
        net.zero_grad(set_to_none=True)
    return np.concatenate(out).reshape(len(images), t, *images.shape[2:])


def confidence_change(net: nn.Module, images: Tensor, cams: np.ndarray, targets: Sequence[Callable],
                      batch_size: int = 32, base: Optional[np.ndarray] = None) -> np.ndarray:
    """grad-cam's `CamMultImageConfidenceChange` relative to the unperturbed score: (target on
    image x CAM - target on image) / |target on image|, per item (N,) float32 for N images
    (N, 3, H, W), maps (N, H, W) and targets. 0: the map keeps all the model needs for the target;
    -1: nothing of it (the normalised input is multiplied by the map, so dark pixels become the
    data set's mean). `base` (N,): the unperturbed scores when known (saves a forward pass)."""
    metric, out = CamMultImageConfidenceChange(), []
    for i in range(0, len(images), batch_size):
        x, t = images[i:i + batch_size], list(targets[i:i + batch_size])
        if base is None:
            with torch.no_grad():
                before = np.float32([f(o).cpu().numpy() for f, o in zip(t, net(x))])
        else:
            before = np.float32(base[i:i + batch_size])
        after = metric(x, cams[i:i + batch_size], t, net, return_diff=False)
        out.append((after - before) / np.maximum(np.abs(before), 1e-6))
    return np.concatenate(out).astype(np.float32)


def road_scores(net: nn.Module, images: Tensor, cams: np.ndarray, targets: Sequence[Callable],
                seed: int = 0) -> dict[str, np.ndarray]:
    """grad-cam's ROAD (Rong et al. 2022) for one map per image (B, H, W) and its target: the
    target's change when the 20% most relevant pixels are imputed (`morf`, more negative = more
    faithful), when the 80% least relevant are (`lerf`, nearer 0 = more faithful), both relative
    to the unperturbed score, and `road` = (lerf - morf) / 2 (higher = more faithful).
    -> {"morf", "lerf", "road", "score"} (B,) float32. The imputation noise is seeded."""
    with torch.no_grad():
        base = np.float32([t(o).cpu().numpy() for t, o in zip(targets, net(images))])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        morf = ROADMostRelevantFirst(percentile=80)(images, cams, list(targets), net)
        lerf = ROADLeastRelevantFirst(percentile=20)(images, cams, list(targets), net)
    scale = np.maximum(np.abs(base), 1e-6)
    morf, lerf = morf / scale, lerf / scale
    return {"morf": morf, "lerf": lerf, "road": (lerf - morf) / 2, "score": base}


# --------------------------------------------------------------------------- per stage and method

@dataclass(frozen=True)
class MethodMaps:
    """One method's maps on one stage for B images, and their faithfulness."""

    joints: Optional[np.ndarray]     # (B, J, H, W) per-joint maps in [0, 1]; None for EigenCAM (no target)
    pose: np.ndarray                 # (B, H, W) the whole-pose map (EigenCAM: its map)
    faith: dict[str, np.ndarray]     # "confidence_change" (B,) pose target, "joint_confidence_change"
                                     # (B, J) each joint's map with its target, ROAD's (B,) when asked


def explain_methods(model: nn.Module, images: Tensor, heatmaps: Mapping[int, np.ndarray], gt_joints: np.ndarray,
                    stride: int, methods: Sequence[str], target_peak: str = "predicted",
                    eigencam_maps: Optional[Mapping[int, np.ndarray]] = None, road: bool = False,
                    sign: str = "oriented", autocast: Optional[torch.dtype] = None) -> dict[int, dict[str, MethodMaps]]:
    """Every `method` on the feature layer (`feature_layer_names`) of every stage in `heatmaps`
    {stage: (B, J, h, w)} of `model`'s forward on `images` (B, 3, H, W): -> {stage: {method:
    MethodMaps}}. Targets read stage k's heatmaps at the `target_peak`: "predicted" (argmax of
    `heatmaps[k]`) or "gt" (`gt_joints` (B, J, 3) crop px / `stride`; unlabelled joints fall back
    to the predicted peak). `eigencam_maps` {stage: (B, H, W)} (the feature maps of
    `okdpose.explain.eigencam`, computed in its one forward) are used as they are, else made.
    `autocast` (bf16 / fp16): every stage trunk runs so (`StageHeatmaps`); the maps are float32."""
    device = next(model.parameters()).device
    x = images.to(device)
    layers = dict(zip(model.output_stages, model.feature_layer_names()))
    out: dict[int, dict[str, MethodMaps]] = {}
    for stage, hm in heatmaps.items():
        net = StageHeatmaps(model, stage, autocast)
        peaks = predicted_peaks(hm)
        if target_peak == "gt":
            peaks = gt_peaks(gt_joints, stride, hm.shape[:1:-1], peaks)
        b, j = peaks.shape[:2]
        pose_targets = [PoseTarget(p) for p in peaks]
        joint_targets = [KeypointTarget(k, *p[k]) for p in peaks for k in range(j)]
        with torch.no_grad():              # the unperturbed scores, once for every method
            out_k = net(x)
        pose_base = np.float32([t(o).item() for t, o in zip(pose_targets, out_k)])
        joint_base = np.float32([joint_targets[i * j + k](out_k[i]).item() for i in range(b) for k in range(j)])
        out[stage] = {}
        for method in methods:
            if method in CLASS_AGNOSTIC:
                pose = (eigencam_maps[stage] if eigencam_maps is not None
                        else eigencam(model, images, [layers[stage]], sign=sign, autocast=autocast)[layers[stage]])
                joints = None
            else:
                maps = joint_cams(net, method, layers[stage], x, peaks)
                joints, pose = maps[:, :j], maps[:, j]
            faith = {"confidence_change": confidence_change(net, x, pose, pose_targets, base=pose_base)}
            if joints is not None:         # each joint's map with its own target: B x J perturbed forwards
                faith["joint_confidence_change"] = confidence_change(
                    net, x.repeat_interleave(j, 0), joints.reshape(b * j, *joints.shape[2:]), joint_targets,
                    base=joint_base).reshape(b, j)
            if road:
                faith.update({k: v for k, v in road_scores(net, x, pose, pose_targets).items() if k != "score"})
            out[stage][method] = MethodMaps(joints, pose, faith)
    return out
