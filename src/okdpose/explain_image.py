"""One image, one command (`okdpose explain`): the CAMs of a trained okdpose model on one frame,
per stage and method, for one joint's target or the whole pose, as one picture.

    okdpose explain data/raw/babypose/images/test/000000110001.png --model models/model.pt \\
        --stage 4 --method gradcam --joint right_hand [--all-stages] [--box x y w h] [--out cam.png]

The frame is read as preprocess reads it (8-bit gray/colour or 16-bit depth mapped with the
checkpoint's `data.depth_range`), cropped around the box (COCO x y w h frame px; the whole frame by
default) as the data set crops, and explained with `okdpose.keypoint_cam` (targets at the stage's
predicted peaks). Picture: a row per stage: the crop with the stage's predicted skeleton, then one
CAM overlay per method with the target joint's predicted position (filled dot).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from okdpose.data.coco import DataError, read_frame
from okdpose.params import CAM_METHODS, ParamsError, Params, params_for_checkpoint, params_from_dict

EXPORTED = (".onnx", ".ts", ".torchscript")


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="CAMs of a trained okdpose model on one frame.")
    ap.add_argument("image", type=Path, help="frame file: 8-bit gray/colour or 16-bit depth (PNG, ...)")
    ap.add_argument("--model", type=Path, default=Path("models/model.pt"),
                    help="okdpose checkpoint (models/model.pt) or an original OKD-HRNet / HRNet file")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"),
                    help="data settings (joints, sizes, depth range) for files that do not store them: released ones")
    ap.add_argument("--stage", type=int, default=None, help="1-based stage output to explain (default: the last)")
    ap.add_argument("--all-stages", action="store_true", help="explain every stage output (one row each)")
    ap.add_argument("--method", nargs="+", default=["eigencam"], choices=CAM_METHODS, metavar="METHOD",
                    help=f"one or more of {', '.join(CAM_METHODS)} (default eigencam)")
    ap.add_argument("--joint", default=None, help="target joint name (default: the whole pose, sum over joints)")
    ap.add_argument("--box", nargs=4, type=float, default=None, metavar=("X", "Y", "W", "H"),
                    help="person box in frame px (default: the whole frame)")
    ap.add_argument("--sign", choices=("oriented", "stock"), default="oriented", help="EigenCAM sign (default oriented)")
    ap.add_argument("--out", type=Path, default=None, help="picture file (default: <image>_cam.png beside the image)")
    return ap


def load_explainable(path: Path, params_path: Path = Path("params.yaml")) -> tuple["object", Params]:
    """An okdpose checkpoint -> (model in eval mode, the params it was trained with); an original
    OKD-HRNet / HRNet file -> (its model inferred from its keys, `params_path`'s data settings).
    Exported students (ONNX, TorchScript) are refused with the fix: CAMs need the PyTorch modules."""
    from okdpose.model import CheckpointError, load_model

    why = ("an exported student cannot be explained (CAMs hook the PyTorch modules and need their "
           "gradients); explain the okdpose checkpoint it was exported from, e.g. --model models/model.pt --stage K")
    if path.suffix.lower() in EXPORTED:
        raise CheckpointError(f"{path}: {why}")
    try:
        model, ckpt = load_model(path, fix="pass an okdpose checkpoint such as models/model.pt")
    except CheckpointError as e:
        if path.is_file() and _is_torchscript(path):
            raise CheckpointError(f"{path}: a TorchScript file: {why}") from None
        if not path.is_file() or "not an okdpose checkpoint" not in str(e):
            raise e from None
        # an original OKD-HRNet / HRNet file: the model from its keys, the frame settings from --params
        from okdpose.model import load_released

        model, arch, _ = load_released(path)
        print(f"{path}: {arch.describe()}; data settings from {params_path}")
        return model.eval(), params_for_checkpoint(params_path, arch.config())
    raw = ckpt.get("params")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds no training params (data sizes, joints); re-save it with okdpose train")
    try:
        # only what a frame needs (sizes, joints, depth range); the loss is not this command's business
        p = params_from_dict({**{k: raw[k] for k in ("data", "model") if k in raw}, "loss": {"use_kld": False}})
    except ParamsError as e:
        raise CheckpointError(f"{path}: its stored params do not load ({e})") from None
    return model.eval(), p


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or n.endswith("code/") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def explain_frame(model, p: Params, frame: np.ndarray, box: Optional[Sequence[float]], stages: Sequence[int],
                  methods: Sequence[str], joint: Optional[str], sign: str = "oriented") -> np.ndarray:
    """uint8 (H, W, C) frame -> the picture (uint8 BGR): a row per stage, the crop with the stage's
    predicted skeleton, then each method's map for `joint` (a name; None = the whole pose)."""
    import torch

    from okdpose.data.dataset import IMAGENET_MEAN, IMAGENET_STD
    from okdpose.geometry import box_to_center_scale, crop_image
    from okdpose.keypoint_cam import CLASS_AGNOSTIC, StageHeatmaps, joint_cams, predicted_peaks
    from okdpose.viz import TILE_WIDTH, _marker, cam_overlay, draw_skeleton, tile_table

    d, spec = p.data, p.data.joint_spec
    j = None if joint is None else _joint_index(spec.names, joint)
    h, w = frame.shape[:2]
    aspect = d.image_size[0] / d.image_size[1]
    if box is None:                 # the whole frame, unpadded
        center, scale = box_to_center_scale((0.0, 0.0, float(w), float(h)), aspect, padding=1.0)
    else:                           # a person box, padded as the data set pads
        if box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"--box {list(box)}: width and height must be > 0")
        center, scale = box_to_center_scale(tuple(float(v) for v in box), aspect)
    crop = crop_image(frame, center, scale, d.image_size).reshape(d.image_size[1], d.image_size[0], -1)
    crop = np.repeat(crop, 3, axis=2) if crop.shape[2] == 1 else crop[..., :3]
    x = torch.from_numpy(((crop / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32).transpose(2, 0, 1))[None]
    with torch.no_grad():
        heatmaps = dict(zip(model.output_stages, (o.numpy() for o in model(x))))
    k = TILE_WIDTH / crop.shape[1]
    big = _resize(crop[..., ::-1], k)
    rows = []
    for stage in stages:
        hm = heatmaps[stage]
        coords, _ = d.codec.decode_crop(hm)
        pred = np.concatenate([(coords[0] + 0.5) * k - 0.5, np.full((len(coords[0]), 1), 2.0)], axis=1)
        net = StageHeatmaps(model, stage)
        layer = model.feature_layer_names()[model.output_stages.index(stage)]
        row = [draw_skeleton(big, pred, spec, label=f"S{stage} pred")]
        for method in methods:
            maps = joint_cams(net, method, layer, x, predicted_peaks(hm), joints=[] if j is None else [j], sign=sign)
            target = "" if method in CLASS_AGNOSTIC else f" {joint or 'pose'}"     # EigenCAM has no target
            tile = cam_overlay(big, maps[0, 0], label=f"S{stage} {method}{target}")   # the joint's, or the pose's
            if j is not None:
                _marker(tile, pred[j], (255, 255, 255), filled=True)
            row.append(tile)
        rows.append(row)
    return tile_table(rows)


def _resize(image: np.ndarray, k: float) -> np.ndarray:
    import cv2

    size = (round(image.shape[1] * k), round(image.shape[0] * k))
    return cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_LINEAR if k > 1 else cv2.INTER_AREA)


def _joint_index(names: Sequence[str], joint: str) -> int:
    if joint not in names:
        raise ValueError(f"--joint {joint!r} is not a joint of this model; choose among {', '.join(names)}")
    return list(names).index(joint)


def main(argv: Optional[Sequence[str]] = None, prog: str = "okdpose explain") -> int:
    args = build_parser(prog).parse_args(argv)
    from okdpose.model import CheckpointError
    from okdpose.viz import write_png

    try:
        model, p = load_explainable(args.model, args.params)
        stages = list(model.output_stages) if args.all_stages else [args.stage or model.output_stages[-1]]
        bad = [s for s in stages if s not in model.output_stages]
        if bad:
            raise ValueError(f"--stage {bad[0]}: {args.model} outputs stages {list(model.output_stages)}")
        frame = read_frame(args.image, p.data.depth_range)
        picture = explain_frame(model, p, frame, args.box, stages, list(dict.fromkeys(args.method)), args.joint, args.sign)
    except (DataError, CheckpointError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    out = args.out or args.image.with_name(f"{args.image.stem}_cam.png")
    write_png(out, picture)
    print(f"{prog}: stages {stages}, methods {', '.join(dict.fromkeys(args.method))}, "
          f"target {args.joint or 'pose'} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
