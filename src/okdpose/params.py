"""Typed, validated view of `params.yaml`.

One frozen dataclass per section; `load_params()` builds them once and every stage passes the
pieces it needs to library functions as plain arguments. Unknown keys, wrong types and
impossible combinations are refused with a message naming the key and the fix.

Sizes are (w, h) as in the params file; KD couples are 1-based `(student, teacher)` stages.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml

from okdpose.codec import OUTPUT_STRIDE, HeatmapCodec
from okdpose.joints import JOINT_SPECS, JointSpec, get_joint_spec

MAX_STAGES = 4
MAX_INT = 2 ** 63 - 1
# autocast of a model (`okdpose.device.autocast_dtype`): auto = bf16 where the device runs it natively
Precision = Literal["auto", "fp32", "bf16", "fp16"]
# keys that were renamed: the loader names the new key instead of "unknown key"
RENAMED = {"train.amp": "train.precision (auto | fp32 | bf16 | fp16; amp: true was auto on CUDA)"}


class ParamsError(ValueError):
    """A params.yaml value that cannot work; the message names the key and the fix."""


# --------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class SyntheticParams:
    """The built-in BabyPose-like generator (data.source: synthetic), as
    `okdpose.data.synthetic.generate_dataset` takes it."""

    seed: int = 0
    subjects: tuple[int, int, int] = (8, 2, 2)     # train / val / test subjects (split by subject)
    frames_per_subject: int = 60
    occluder_prob: float = 0.6                      # scales the chance of a blanket / cables / caregiver hand per frame
    noise_mm: float = 4.0                           # depth noise std (mm) at 800 mm, growing with distance^2
    camera_height: tuple[float, float] = (550.0, 900.0)   # mm above the mattress, drawn per subject
    orientations: int = 1                           # crib orientations in the image: 1 (fixed camera, as BabyPose), 2 or 4
    out_of_frame_prob: float = 0.15                 # frames whose camera shift pushes joints out of the frame (v = 0)
    box_jitter: float = 0.06                        # detection boxes: relative std of centre / size noise
    false_positive_prob: float = 0.05               # detection boxes: chance of an extra low-score box per frame

    def validate(self, where: str) -> None:
        _check_seed(self.seed, f"{where}.seed")
        if len(self.subjects) != 3 or min(self.subjects) < 1:
            raise ParamsError(f"{where}.subjects must be three positive counts [train, val, test], got {list(self.subjects)}")
        if not 1 <= self.frames_per_subject <= 9999:
            raise ParamsError(f"{where}.frames_per_subject must be in 1..9999 (image ids are subject * 10000 + frame), got {self.frames_per_subject}")
        for key in ("occluder_prob", "out_of_frame_prob", "false_positive_prob"):
            _check_prob(getattr(self, key), f"{where}.{key}")
        if self.noise_mm < 0:
            raise ParamsError(f"{where}.noise_mm must be >= 0, got {self.noise_mm}")
        if self.orientations not in (1, 2, 4):
            raise ParamsError(f"{where}.orientations must be 1, 2 or 4, got {self.orientations}")
        lo, hi = self.camera_height
        if not 300 <= lo <= hi <= 1500:
            raise ParamsError(f"{where}.camera_height must be [low, high] mm with 300 <= low <= high <= 1500, got {[lo, hi]}")
        if not 0 <= self.box_jitter < 0.5:
            raise ParamsError(f"{where}.box_jitter must be in [0, 0.5), got {self.box_jitter}")


@dataclass(frozen=True)
class AugmentParams:
    """Training augmentation; all off reproduces the original paper."""

    flip: bool = False
    rotation: float = 0.0        # max degrees (+/-), applied with probability 0.6 as the original
    scale: float = 0.0           # scale factor range: scale * (1 +/- scale)
    half_body_prob: float = 0.0

    def validate(self, where: str) -> None:
        if not 0 <= self.rotation <= 180:
            raise ParamsError(f"{where}.rotation must be in [0, 180] degrees, got {self.rotation}")
        if not 0 <= self.scale < 1:
            raise ParamsError(f"{where}.scale must be in [0, 1), got {self.scale}")
        _check_prob(self.half_body_prob, f"{where}.half_body_prob")

    @property
    def enabled(self) -> bool:
        return self.flip or self.rotation > 0 or self.scale > 0 or self.half_body_prob > 0


@dataclass(frozen=True)
class DataParams:
    source: Literal["synthetic", "local", "archive", "url"] = "synthetic"
    name: str = "babypose"                 # download writes data/raw/<name>/
    path: Optional[str] = None             # local folder (source: local) or archive file (source: archive)
    url: Optional[str] = None              # source: url
    sha256: Optional[str] = None           # required with source: url (and checked for archive when set)
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    joints: str = "babypose12"
    image_size: tuple[int, int] = (96, 128)     # model input (w, h)
    heatmap_size: tuple[int, int] = (24, 32)    # (w, h); image_size / 4 for HRNet
    sigma: float = 1.0                           # Gaussian target std in heatmap pixels
    depth_range: tuple[float, float] = (400.0, 1200.0)  # mm mapped to 0..255 for 16-bit frames
    skip_invalid: bool = False
    augment: AugmentParams = field(default_factory=AugmentParams)

    def validate(self, where: str) -> None:
        if self.name in ("", ".", "..") or "/" in self.name or "\\" in self.name:
            raise ParamsError(f"{where}.name must be a plain folder name, got {self.name!r}")
        if self.source in ("local", "archive") and not self.path:
            raise ParamsError(f"{where}.source is {self.source!r}: set {where}.path to the {'folder' if self.source == 'local' else 'archive file'}")
        if self.source == "url":
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ParamsError(f"{where}.source is 'url': set {where}.url to an http(s) address, got {self.url!r}")
            if not self.sha256:
                raise ParamsError(f"{where}.source is 'url': {where}.sha256 is required (the archive's sha256 hex digest)")
        if self.sha256 is not None:
            s = self.sha256.lower()
            if len(s) != 64 or any(c not in "0123456789abcdef" for c in s):
                raise ParamsError(f"{where}.sha256 must be 64 hex digits, got {self.sha256!r}")
        if self.joints not in JOINT_SPECS:
            raise ParamsError(f"{where}.joints is {self.joints!r}; choose one of {sorted(JOINT_SPECS)}")
        if self.source == "synthetic" and self.joints != "babypose12":
            raise ParamsError(f"{where}.source synthetic writes BabyPose-12 joints: set {where}.joints: babypose12")
        for key, (w, h) in (("image_size", self.image_size), ("heatmap_size", self.heatmap_size)):
            if w < 8 or h < 8:
                raise ParamsError(f"{where}.{key} must be at least [8, 8] (w, h), got {[w, h]}")
        if self.sigma <= 0:
            raise ParamsError(f"{where}.sigma must be > 0, got {self.sigma}")
        try:
            stride = self.codec.stride
        except ValueError as e:
            raise ParamsError(f"{where}: {e}") from None
        if stride != OUTPUT_STRIDE:
            raise ParamsError(f"{where}.heatmap_size must be image_size / {OUTPUT_STRIDE} for HRNet (image "
                              f"{list(self.image_size)} -> {[v // OUTPUT_STRIDE for v in self.image_size]}), "
                              f"got {list(self.heatmap_size)}")
        lo, hi = self.depth_range
        if not 0 <= lo < hi:
            raise ParamsError(f"{where}.depth_range must be [near, far] mm with 0 <= near < far, got {[lo, hi]}")
        self.synthetic.validate(f"{where}.synthetic")
        self.augment.validate(f"{where}.augment")

    @property
    def joint_spec(self) -> JointSpec:
        return get_joint_spec(self.joints)

    @property
    def codec(self) -> HeatmapCodec:
        """The coordinates of this input size (`okdpose.codec`)."""
        return HeatmapCodec(self.image_size, self.heatmap_size, self.sigma)


@dataclass(frozen=True)
class ModelParams:
    width: int = 8                   # HRNet branch-0 width: 18/32/48 official, smaller for CPU
    n_stage: int = 4                 # 1..4: the model is truncated after this stage
    multi: bool = True               # a heatmap head after every stage (False: last only)
    pretrained: Optional[str] = None  # official pose_hrnet_*.pth or one of our checkpoints
    checkpoint: Optional[str] = None  # a trained model evaluated as is (ours or an OKD-HRNet release): no training

    def validate(self, where: str) -> None:
        if self.pretrained is not None and self.checkpoint is not None:
            raise ParamsError(f"{where}.pretrained and {where}.checkpoint are both set: pretrained initialises a "
                              f"training, checkpoint is a trained model evaluated as is; set one of them to null")
        if self.width < 2:
            raise ParamsError(f"{where}.width must be >= 2 (official: 18, 32, 48), got {self.width}")
        if not 1 <= self.n_stage <= MAX_STAGES:
            raise ParamsError(f"{where}.n_stage must be 1..{MAX_STAGES}, got {self.n_stage}")


@dataclass(frozen=True)
class LossParams:
    use_mse: bool = True               # deep supervision: MSE to ground truth for students in couples
    use_kld: bool = True
    # CPU default: every student distils from the teacher (deep supervision of stages 1-2 speeds
    # the from-scratch teacher up ~3x at this scale; measured, see train-okd report); paper: ((3, 4),)
    kld_couples: tuple[tuple[int, int], ...] = ((1, 4), (2, 4), (3, 4))   # 1-based (student, teacher)
    kld_weight: float = 1.0            # ours; original KLD_WEIGHT w -> w * J / (H * W); >= 3 collapsed the teacher here
    teacher_weight: float = 1.0
    temperature: float = 1.0
    detach_teacher: bool = False       # False reproduces the original (gradients reach the teacher)
    use_target_weight: bool = False
    rampup_epochs: float = 3.0         # sigmoid ramp-up of the KL weight (original TRAIN.LENGTH), at the
                                       # fractional epoch (epoch - 1 + step / steps); 0: off

    def validate(self, where: str) -> None:
        for key in ("kld_weight", "teacher_weight", "rampup_epochs"):
            if getattr(self, key) < 0:
                raise ParamsError(f"{where}.{key} must be >= 0, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ParamsError(f"{where}.temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 12
    batch_size: int = 8                # small batches: more optimiser steps in the CPU budget (measured)
    val_batch_size: int = 32           # per-epoch validation (inference only); W8 CPU: 1.3x batch 8's speed
    lr: float = 1e-3
    lr_steps: tuple[int, ...] = (9, 11)  # lr *= lr_factor after each of these (1-based) epochs
    lr_factor: float = 0.33
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    workers: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    patience: int = 0                  # early stop after this many epochs without improvement (0: off)
    precision: Precision = "auto"      # forward autocast (loss stays fp32): auto = bf16 where native and fast (device.fast_bf16)
    grad_clip: Optional[float] = None  # max gradient norm
    channels_last: bool | Literal["auto"] = "auto"   # memory format of model and batches (checkpoints stay contiguous)
    deterministic: bool = False        # CUDA: deterministic algorithms, TF32 off (else cudnn.benchmark); CPU: no-op
    nproc_per_node: int = 1            # > 1: the stage runs itself as N data-parallel processes (torch.distributed.run)
    dist_timeout_s: int = 1800         # how long a rank waits in a collective (rank 0 validates alone meanwhile)

    def validate(self, where: str) -> None:
        if self.epochs < 1:
            raise ParamsError(f"{where}.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ParamsError(f"{where}.batch_size must be >= 1, got {self.batch_size}")
        if self.val_batch_size < 1:
            raise ParamsError(f"{where}.val_batch_size must be >= 1 (lower it if validation runs out of memory), got "
                              f"{self.val_batch_size}")
        if self.lr <= 0:
            raise ParamsError(f"{where}.lr must be > 0, got {self.lr}")
        if list(self.lr_steps) != sorted(self.lr_steps) or any(s < 1 for s in self.lr_steps):
            raise ParamsError(f"{where}.lr_steps must be increasing positive epochs, got {list(self.lr_steps)}")
        if not 0 < self.lr_factor <= 1:
            raise ParamsError(f"{where}.lr_factor must be in (0, 1], got {self.lr_factor}")
        if not 0 <= self.momentum < 1:      # torch refuses < 0 only when training starts; >= 1 diverges
            raise ParamsError(f"{where}.momentum must be in [0, 1) (SGD's momentum, e.g. 0.9), got {self.momentum}")
        if self.weight_decay < 0:
            raise ParamsError(f"{where}.weight_decay must be >= 0 (0: off), got {self.weight_decay}")
        _check_seed(self.seed, f"{where}.seed")
        if self.workers < 0 or self.patience < 0:
            raise ParamsError(f"{where}.workers and {where}.patience must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ParamsError(f"{where}.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.nproc_per_node < 1:
            raise ParamsError(f"{where}.nproc_per_node must be >= 1 (1: one process; N: N data-parallel processes, "
                              f"e.g. one per GPU), got {self.nproc_per_node}")
        if self.dist_timeout_s < 1:
            raise ParamsError(f"{where}.dist_timeout_s must be >= 1 second (longer than a validation pass), got "
                              f"{self.dist_timeout_s}")


@dataclass(frozen=True)
class EvaluateParams:
    split: Literal["val", "test"] = "test"
    flip_test: bool = False
    use_gt_bbox: bool = True
    batch_size: int = 32
    pck_thresholds: tuple[float, ...] = (0.1, 0.2)   # fractions of the box size (standard PCK)
    oks_nms: bool = True          # rescoring + per-image OKS-NMS as the original (GT boxes too: a no-op there)
    oks_thre: float = 0.9
    in_vis_thre: float = 0.2
    image_thre: float = 0.0
    num_images: int = 4           # test images drawn with predicted vs ground-truth skeletons
    device: Literal["auto", "cpu", "cuda"] = "auto"   # where the model runs (auto: cuda when torch sees a GPU)
    precision: Precision = "fp32"      # autocast of the model: fp32 (the reference), bf16, fp16 (CUDA) or auto
    # anytime (early-exit) sweep: exit thresholds τ on the confidence (0 and inf are always added)
    anytime_thresholds: tuple[float, ...] = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
    anytime_confidence: Literal["mean_max", "min_max", "median_max"] = "mean_max"

    def validate(self, where: str) -> None:
        if self.batch_size < 1:
            raise ParamsError(f"{where}.batch_size must be >= 1, got {self.batch_size}")
        if any(not (math.isfinite(t) and t >= 0) for t in self.anytime_thresholds):
            raise ParamsError(f"{where}.anytime_thresholds must be finite numbers >= 0 (0 and inf are always "
                              f"added), got {list(self.anytime_thresholds)}")
        if not self.pck_thresholds or any(not 0 < t <= 1 for t in self.pck_thresholds):
            raise ParamsError(f"{where}.pck_thresholds must be fractions in (0, 1], got {list(self.pck_thresholds)}")
        for key in ("oks_thre", "in_vis_thre", "image_thre"):
            _check_prob(getattr(self, key), f"{where}.{key}")
        if self.num_images < 0:
            raise ParamsError(f"{where}.num_images must be >= 0, got {self.num_images}")


@dataclass(frozen=True)
class ExplainParams:
    split: Literal["val", "test"] = "test"
    num_images: int = 8
    stages: Optional[tuple[int, ...]] = None    # 1-based; null = every stage output
    heads: bool = True                          # also explain each head's output
    layers: tuple[str, ...] = ()                # extra target layers by dotted module name
    seed: int = 0
    pointing_radius: float = 0.1                # pointing-game hit radius, fraction of max(box w, h) (as PCK)
    device: Literal["auto", "cpu", "cuda"] = "auto"   # where the model runs (auto: cuda when torch sees a GPU)
    sign: Literal["oriented", "stock"] = "oriented"   # EigenCAM component sign: oriented to the activations, or grad-cam's
    methods: tuple[CamMethod, ...] = ("eigencam",)    # grad-cam methods, each on every stage's feature layer
    target_peak: Literal["predicted", "gt"] = "predicted"   # where a joint's target reads its heatmap
    road: bool = False                          # also ROAD faithfulness (grad-cam's; ~0.25 s per map on a 2-core CPU)
    grid_images: int = 2                        # images that get a joints x methods picture per stage
    precision: Precision = "fp32"               # autocast of the model's forward (CAM maths stay fp32): fp32, bf16, fp16 (CUDA) or auto

    def validate(self, where: str) -> None:
        if self.num_images < 1:
            raise ParamsError(f"{where}.num_images must be >= 1, got {self.num_images}")
        _check_seed(self.seed, f"{where}.seed")
        if not 0 < self.pointing_radius <= 1:
            raise ParamsError(f"{where}.pointing_radius must be a fraction of the box size in (0, 1], "
                              f"got {self.pointing_radius}")
        if self.grid_images < 0:
            raise ParamsError(f"{where}.grid_images must be >= 0, got {self.grid_images}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ParamsError(f"{where}.methods must list each method once, at least one, got {list(self.methods)}; "
                              f"e.g. [eigencam, gradcam]")


CAM_METHODS = ("eigencam", "gradcam", "hirescam", "gradcampp", "xgradcam", "layercam", "eigengradcam",
               "scorecam", "ablationcam")
CamMethod = Literal["eigencam", "gradcam", "hirescam", "gradcampp", "xgradcam", "layercam", "eigengradcam",
                    "scorecam", "ablationcam"]


EXPORT_FORMATS = ("onnx", "torchscript")
ExportPrecision = Literal["auto", "fp32", "fp16", "bf16"]
ONNX_OPSETS = (11, 20)      # what torch's TorchScript-based ONNX exporter writes (20: its newest)


@dataclass(frozen=True)
class ExportParams:
    """The export stage: which stage outputs become standalone deployable files, how they are
    checked against PyTorch and how their cost is timed (`okdpose.export`)."""

    stages: tuple[int, ...] = (3, 4)            # 1-based outputs of the trained model (`Params.export_stages`)
    formats: tuple[Literal["onnx", "torchscript"], ...] = EXPORT_FORMATS
    opset: int = 17                              # ONNX opset
    verify_samples: int = 32                     # test crops each export is compared on
    tolerance: float = 1e-4                      # max |export - PyTorch| / max |PyTorch heatmap|
    max_near_ties: float = 0.05                  # share of points whose decoding may be a near-tie
    latency_batches: tuple[int, ...] = (1, 8)
    latency_repeats: int = 10                    # timed calls per cell (interleaved), median reported
    threads: int = 1                             # intra-op threads of torch and onnxruntime while timing
    precision: ExportPrecision = "fp32"          # the exports' compute dtype (I/O stays float32): fp32, fp16, bf16 (TorchScript only) or auto

    def validate(self, where: str) -> None:
        if not self.stages or len(set(self.stages)) != len(self.stages) or any(not 1 <= s <= MAX_STAGES for s in self.stages):
            raise ParamsError(f"{where}.stages must list distinct 1-based stages in 1..{MAX_STAGES}, got {list(self.stages)}")
        if not self.formats or len(set(self.formats)) != len(self.formats):
            raise ParamsError(f"{where}.formats must list some of {list(EXPORT_FORMATS)} once each, got {list(self.formats)}")
        lo, hi = ONNX_OPSETS
        if not lo <= self.opset <= hi:
            raise ParamsError(f"{where}.opset must be in {lo}..{hi} (torch's ONNX exporter), got {self.opset}")
        if self.verify_samples < 1:
            raise ParamsError(f"{where}.verify_samples must be >= 1, got {self.verify_samples}")
        if not 0 < self.tolerance < 1:
            raise ParamsError(f"{where}.tolerance is a fraction of the heatmap scale in (0, 1), e.g. 1e-4; got {self.tolerance}")
        _check_prob(self.max_near_ties, f"{where}.max_near_ties")
        if not self.latency_batches or min(self.latency_batches) < 1:
            raise ParamsError(f"{where}.latency_batches must be batch sizes >= 1, got {list(self.latency_batches)}")
        if self.latency_repeats < 1 or self.threads < 1:
            raise ParamsError(f"{where}.latency_repeats and {where}.threads must be >= 1, got "
                              f"{self.latency_repeats} and {self.threads}")
        if self.precision == "bf16" and "onnx" in self.formats:
            # ONNX Conv has no tensor(bfloat16) up to opset 20: onnxruntime rejects such a graph
            raise ParamsError(f"{where}.precision is bf16, which ONNX cannot hold (its Conv has no bfloat16 type up "
                              f"to opset 20; onnxruntime rejects the graph): set {where}.formats: [torchscript] for a "
                              f"bf16 TorchScript export, or {where}.precision: fp16 or fp32 to keep the ONNX file "
                              f"({where}.precision: auto picks bf16 for TorchScript only where the CPU's bf16 units "
                              "are measured faster)")


@dataclass(frozen=True)
class TrackingParams:
    """MLflow (`okdpose.tracking`): the experiment, the run's name and the grid tags."""

    enabled: bool = True
    experiment: str = "okdpose"
    run_name: Optional[str] = None       # null: the DVC experiment's name, else the git commit (short, "+dirty")
    grid_row: Optional[str] = None       # set by `okdpose grid queue`: the row, tagged with the seed for grouping


ENERGY_PATTERN = r"^[A-Z]{3}$"


@dataclass(frozen=True)
class EnergyParams:
    """codecarbon energy / emissions of train-okd and evaluate (`okdpose.energy`), offline."""

    enabled: bool = True
    country: str = "ITA"                 # ISO 3166 alpha-3 code whose grid carbon intensity is used
    measure_power_secs: float = 10.0     # codecarbon's sampling interval

    def validate(self, where: str) -> None:
        import re

        if not re.match(ENERGY_PATTERN, self.country):
            raise ParamsError(f"{where}.country must be an ISO 3166 alpha-3 code in capitals (e.g. ITA, FRA, USA), "
                              f"got {self.country!r}")
        if not 0.5 <= self.measure_power_secs <= 600:
            raise ParamsError(f"{where}.measure_power_secs must be in 0.5..600 s, got {self.measure_power_secs}")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    loss: LossParams = field(default_factory=LossParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    explain: ExplainParams = field(default_factory=ExplainParams)
    export: ExportParams = field(default_factory=ExportParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    energy: EnergyParams = field(default_factory=EnergyParams)

    def validate(self) -> "Params":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        self._validate_couples()
        step = 4 * 2 ** (self.model.n_stage - 1)   # stem /4, then each new branch halves again
        if any(v % step for v in self.data.image_size):
            raise ParamsError(f"data.image_size {list(self.data.image_size)} must be a multiple of {step} (w and h) for a "
                              f"{self.model.n_stage}-stage HRNet, e.g. [96, 128] or [192, 256]")
        if self.explain.stages is not None:
            for s in self.explain.stages:
                if not 1 <= s <= self.model.n_stage:
                    raise ParamsError(f"explain.stages: stage {s} is not an output of a {self.model.n_stage}-stage model (1..{self.model.n_stage})")
        return self

    def _validate_couples(self) -> None:
        loss, n = self.loss, self.model.n_stage
        if not loss.use_kld:
            return
        if not loss.kld_couples:
            raise ParamsError("loss.use_kld is true but loss.kld_couples is empty: list [student, teacher] stages or set use_kld: false")
        if not self.model.multi:
            raise ParamsError("loss.use_kld needs model.multi: true (a single-output model has no student heads); set one of them")
        seen = set()
        for i, couple in enumerate(loss.kld_couples):
            where = f"loss.kld_couples[{i}] = {list(couple)}"
            s, t = couple
            if not (1 <= s <= n and 1 <= t <= n):
                raise ParamsError(f"{where}: stages must be 1..model.n_stage ({n})")
            if t <= s:
                raise ParamsError(f"{where}: the teacher stage ({t}) must come after the student stage ({s}); write [student, teacher]")
            if (s, t) in seen:
                raise ParamsError(f"{where}: duplicate couple; list each [student, teacher] once")
            seen.add((s, t))

    # ------------------------------------------------------------------ derived views
    @property
    def joint_spec(self) -> JointSpec:
        return self.data.joint_spec

    def kd_stages(self) -> tuple[int, ...]:
        """1-based stages whose val AP selects the best model: the stages in KD couples, or the last output."""
        if self.loss.use_kld and self.model.multi:
            return tuple(sorted({s for c in self.loss.kld_couples for s in c}))
        return (self.model.n_stage,)

    def model_config(self) -> dict[str, Any]:
        """The MultiOutHRNet these params configure, as `MultiOutHRNet.config()` returns it."""
        return {"num_joints": self.joint_spec.num_joints, "width": self.model.width,
                "n_stage": self.model.n_stage, "multi": self.model.multi}

    def output_stages(self) -> tuple[int, ...]:
        """1-based stage of each model output, in forward order."""
        return tuple(range(1, self.model.n_stage + 1)) if self.model.multi else (self.model.n_stage,)

    def export_stages(self) -> tuple[int, ...]:
        """`export.stages`, each checked to be an output of the trained model (checked here, by the
        export stage, not at load: other stages' configs need not list export stages)."""
        outs = self.output_stages()
        for s in self.export.stages:
            if s not in outs:
                raise ParamsError(f"export.stages: stage {s} is not an output of the trained model (model.n_stage "
                                  f"{self.model.n_stage}, multi {str(self.model.multi).lower()}: outputs {list(outs)}); "
                                  f"export some of those, e.g. dvc exp run -S 'export.stages=[{outs[-1]}]'")
        return tuple(self.export.stages)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Dotted keys (`loss.kld_weight`) -> scalar or list values, e.g. for MLflow params."""
        return flatten(self.to_dict())


def flatten(obj: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; leaves (numbers, strings, lists, None) are kept as they are.
    The package's one flattener (params for MLflow, metrics for MLflow, fingerprint diffs)."""
    if not isinstance(obj, Mapping):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        out.update(flatten(v, f"{prefix}{sep}{k}" if prefix else str(k), sep))
    return out


# --------------------------------------------------------------------------- loading

def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read, type-check and validate params.yaml. `overrides` maps dotted keys to values."""
    path = Path(path)
    try:
        raw = _yaml_document(path)
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found (run from the repository root)") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        return params_from_dict(raw)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None


def params_from_dict(raw: dict[str, Any]) -> Params:
    return _build(Params, raw, "").validate()


def params_for_checkpoint(path: str | Path, config: Mapping[str, Any]) -> Params:
    """The `data`, `evaluate` and `tracking` sections of a params file, with the model a checkpoint
    file defines (`config`: {width, n_stage, multi, ...}); its training sections are not read.
    For commands that run a given checkpoint (`okdpose evaluate --checkpoint`, `okdpose explain`)."""
    path = Path(path)
    if not path.exists():                    # a folder is named as one by _read_text
        raise ParamsError(f"{path}: params file not found; pass --params or run from the project root")
    try:
        raw = _yaml_document(path)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    keep = {k: raw[k] for k in ("data", "evaluate", "tracking") if isinstance(raw, dict) and k in raw}
    model = {k: config[k] for k in ("width", "n_stage", "multi")}
    try:
        return params_from_dict({**keep, "model": model, "loss": {"use_kld": False, "kld_couples": []}})
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None


def _yaml_document(path: Path) -> Any:
    """The YAML document in the file; none (empty, blanks or comments only: a truncated or clobbered
    file, e.g. after `> params.yaml`) is refused instead of read as every default."""
    raw = yaml.safe_load(_read_text(path))
    if raw is None:
        raise ParamsError(f"{path}: holds no params (empty, blank lines and comments only, or null): restore it "
                          "(git checkout -- params.yaml) or write {} to mean every default")
    return raw


def _read_text(path: Path) -> str:
    """The file's text; a folder, an unreadable or a binary file -> ParamsError naming it
    (FileNotFoundError passes through for the caller's own message)."""
    if path.is_dir():
        raise ParamsError(f"{path}: is a folder, not a params file; pass the params.yaml inside it")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}): is it a params YAML file? "
                          f"Save it as UTF-8") from None
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ParamsError(f"{path}: cannot be read ({e.strerror or e}); check its permissions") from None


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where or 'params'} must be a mapping, got {raw!r}")
    odd = [k for k in raw if not isinstance(k, str)]
    if odd:     # YAML 1.1 reads on/off/yes/no/null and numbers as non-strings
        raise ParamsError(f"{where or 'params'}: key {odd[0]!r} ({type(odd[0]).__name__}) is not a name; YAML reads "
                          f"unquoted on, off, yes, no, null and numbers as values; quote it or fix the spelling")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    renamed = [f"{_join(where, u)} is now {RENAMED[_join(where, u)]}" for u in unknown if _join(where, u) in RENAMED]
    if renamed:
        raise ParamsError("; ".join(renamed))
    if unknown:
        raise ParamsError(
            f"unknown key(s) {', '.join(_join(where, u) for u in unknown)}; valid keys here: {sorted(names)}"
        )
    kwargs = {name: _convert(hints[name], raw[name], _join(where, name)) for name in raw}
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, where)
        for a in inner:                     # e.g. bool | Literal["auto"]: the first that takes the value
            try:
                return _convert(a, value, where)
            except ParamsError:
                pass
        kinds = [" or ".join(repr(x) for x in typing.get_args(a)) if typing.get_origin(a) is Literal
                 else "true or false" if a is bool else getattr(a, "__name__", str(a)) for a in inner]
        raise ParamsError(f"{where} is {value!r}; it must be {', or '.join(kinds)}")
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{where} is {value!r}; choose one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ParamsError(f"{where} must have {len(args)} items, got {list(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where} must be an integer, got {value!r}")
        if abs(value) > MAX_INT:    # numpy / torch take 64-bit integers
            raise ParamsError(f"{where} is {value}; it must be an integer below 2**63 in size")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where} must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):   # NaN passes every `<` check below; no param means "infinite"
            raise ParamsError(f"{where} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"params.py: unsupported field type {tp!r} at {where}")  # programming error


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _check_seed(value: int, where: str) -> None:
    if not 0 <= value < 2 ** 32:     # numpy's SeedSequence refuses negatives; 32 bits for every RNG we seed
        raise ParamsError(f"{where} must be an integer in 0..2**32-1, got {value}")


def _check_prob(value: float, where: str) -> None:
    if not 0 <= value <= 1:
        raise ParamsError(f"{where} must be a probability in [0, 1], got {value}")
