"""What a deployed pose model must carry to be used without this repository's params: its joints,
input and output sizes, input normalisation, depth mapping and where it came from.

Stored as JSON inside every exported file (ONNX `metadata_props["okdpose"]`, TorchScript extra
file `okdpose.json`) and rebuilt from params.yaml for a `models/model.pt` stage, so `okdpose
predict` treats every model the same way. Sizes are [w, h]; joints are 0-based.

    meta = DeployMeta.for_model(p, model, stage=3, test_ap=0.41, source={"commit": "abc123"})
    DeployMeta.from_json(meta.to_json()) == meta
    replace(meta, precision="fp16").precision      # what the model computes in (its I/O is float32 always)

`precision` is written only when it is not fp32, so fp32 exports carry the same JSON as before the
field existed, and a reader that predates it still runs a lower-precision file correctly (its
input and output are float32 either way).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from okdpose.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from okdpose.joints import JointSpec, get_joint_spec

if TYPE_CHECKING:
    from okdpose.params import Params

META_KEY = "okdpose"            # ONNX metadata_props key; TorchScript extra file META_KEY + ".json"
META_VERSION = 1
PRECISIONS = ("fp32", "fp16", "bf16")   # compute dtypes an export may have (`okdpose.export`)


class MetaError(ValueError):
    """Metadata that is missing, of another version, or does not fit the input."""


@dataclass(frozen=True)
class DeployMeta:
    """Everything `predict` needs to turn frames into keypoints with one stage's heatmaps."""

    joints: str                             # joint spec name (okdpose.joints), e.g. babypose12
    joint_names: tuple[str, ...]            # output channel order
    flip_pairs: tuple[tuple[int, int], ...]
    skeleton: tuple[tuple[int, int], ...]   # 1-based, COCO style
    image_size: tuple[int, int]             # model input [w, h]
    heatmap_size: tuple[int, int]           # model output [w, h]
    sigma: float                            # training target sigma (heatmap px)
    mean: tuple[float, float, float]        # RGB, applied to [0, 1] pixels
    std: tuple[float, float, float]
    depth_range: tuple[float, float]        # mm mapped to 255..0 for 16-bit depth frames
    stage: int                              # 1-based output stage this model computes
    width: int                              # HRNet width
    n_stage_trained: int                    # stages of the network it was cut from
    test_ap: float | None = None            # the stage's test AP (metrics/eval.json) when known
    source: dict[str, Any] = field(default_factory=dict)   # commit, dvc experiment, checkpoint file
    version: int = META_VERSION
    precision: str = "fp32"                 # compute dtype inside the model (PRECISIONS); I/O is float32

    @classmethod
    def from_params(cls, p: "Params", *, stage: int, test_ap: float | None = None,
                    source: dict[str, Any] | None = None) -> "DeployMeta":
        spec, d = p.joint_spec, p.data
        return cls(joints=spec.name, joint_names=tuple(spec.names), flip_pairs=tuple(map(tuple, spec.flip_pairs)),
                   skeleton=tuple(map(tuple, spec.skeleton)), image_size=tuple(d.image_size),
                   heatmap_size=tuple(d.heatmap_size), sigma=float(d.sigma),
                   mean=tuple(float(v) for v in IMAGENET_MEAN), std=tuple(float(v) for v in IMAGENET_STD),
                   depth_range=tuple(float(v) for v in d.depth_range), stage=int(stage), width=p.model.width,
                   n_stage_trained=p.model.n_stage, test_ap=test_ap, source=dict(source or {}))

    @classmethod
    def for_model(cls, p: "Params", model: Any, *, stage: int, test_ap: float | None = None,
                  source: dict[str, Any] | None = None) -> "DeployMeta":
        """`from_params` with the width and stage count of `model` (a MultiOutHRNet: the file, not
        the params, defines it); MetaError when its joints are not the params' data.joints."""
        if model.num_joints != p.joint_spec.num_joints:
            raise MetaError(f"the model predicts {model.num_joints} joints, data.joints {p.data.joints!r} has "
                            f"{p.joint_spec.num_joints}; use the params the model was trained with")
        meta = cls.from_params(p, stage=stage, test_ap=test_ap, source=source)
        return replace(meta, width=model.width, n_stage_trained=model.n_stage)

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    def joint_spec(self) -> JointSpec:
        """The named spec; MetaError when this code's spec of that name has other joints."""
        spec = get_joint_spec(self.joints)
        if tuple(spec.names) != tuple(self.joint_names):
            raise MetaError(f"model joints {list(self.joint_names)} differ from okdpose's {self.joints!r} spec "
                            f"{list(spec.names)}")
        return spec

    def to_json(self) -> str:
        d = asdict(self)
        if d["precision"] == "fp32":        # the default: fp32 files stay byte-identical to those before the field
            del d["precision"]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "model metadata") -> "DeployMeta":
        try:
            raw = json.loads(text)
        except (TypeError, ValueError) as e:
            raise MetaError(f"{where}: not JSON ({e})") from None
        if not isinstance(raw, dict):
            raise MetaError(f"{where}: expected a JSON object")
        if raw.get("version") != META_VERSION:
            raise MetaError(f"{where}: metadata version {raw.get('version')!r}, this code reads {META_VERSION}; "
                            "re-export the model with this version (dvc repro export)")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - raw.keys() - {"test_ap", "source", "version", "precision"})
        if missing:
            raise MetaError(f"{where}: missing fields {missing}")
        if raw.get("precision", "fp32") not in PRECISIONS:
            raise MetaError(f"{where}: precision {raw['precision']!r}, this code knows {list(PRECISIONS)}; "
                            "re-export the model with this version (dvc repro export)")
        tuples = {"joint_names", "image_size", "heatmap_size", "mean", "std", "depth_range"}
        vals = {k: (tuple(v) if k in tuples else v) for k, v in raw.items() if k in names}
        vals["flip_pairs"] = tuple(tuple(p) for p in raw["flip_pairs"])
        vals["skeleton"] = tuple(tuple(p) for p in raw["skeleton"])
        return cls(**vals)
