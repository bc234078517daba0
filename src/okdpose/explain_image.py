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
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from okdpose.data.coco import DataError, read_frame
from okdpose.files import atomic_path
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
    ap.add_argument("--out", type=Path, default=None, help="picture file, in the format its suffix names: .png, .jpg, ... "
                    "(default: <image>_cam.png beside the image)")
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
        p = params_for_checkpoint(params_path, arch.config())
        _check_joint_count(path, model, p, f"{params_path} data.joints",
                           "set data.joints: {} there, or pass --params of that model")
        return model.eval(), p
    raw = ckpt.get("params")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds no training params (data sizes, joints); re-save it with okdpose train")
    try:
        # only what a frame needs (sizes, joints, depth range); the loss is not this command's business
        p = params_from_dict({**{k: raw[k] for k in ("data", "model") if k in raw}, "loss": {"use_kld": False}})
    except ParamsError as e:
        raise CheckpointError(f"{path}: its stored params do not load ({e})") from None
    _check_joint_count(path, model, p, "its stored data.joints",
                       "its heads and its params disagree; re-save it with okdpose train")
    return model.eval(), p


def _check_joint_count(path: Path, model, p: Params, where: str, fix: str) -> None:
    """CheckpointError naming the file, both joint counts and the fix when the model's heads predict
    another number of joints than the joint set the frame is drawn with (`where`: its source;
    `fix`: what to do, {} = the joint sets of the model's count)."""
    from okdpose.joints import JOINT_SPECS
    from okdpose.model import CheckpointError

    n, spec = model.num_joints, p.data.joint_spec
    if n == spec.num_joints:
        return
    fits = [s.name for s in JOINT_SPECS.values() if s.num_joints == n]
    fix = (fix.format(" or ".join(fits)) if fits else
           "no okdpose joint set has that many ("
           + ", ".join(f"{s.name}: {s.num_joints}" for s in JOINT_SPECS.values()) + "); it cannot be explained")
    raise CheckpointError(f"{path} predicts {n} joints, {where} ({p.data.joints}) has {spec.num_joints}; {fix}")


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or n.endswith("code/") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def explain_frame(model, p: Params, frame: np.ndarray, box: Optional[Sequence[float]], stages: Sequence[int],
                  methods: Sequence[str], joint: Optional[str], sign: str = "oriented",
                  source: str = "the model") -> np.ndarray:
    """uint8 (H, W, C) frame -> the picture (uint8 BGR): a row per stage, the crop with the stage's
    predicted skeleton, then each method's map for `joint` (a name; None = the whole pose).
    ValueError for a box that is not a person box on this frame, or non-finite outputs of the model
    (`source`: its file, named in the message)."""
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
        _check_box(box, w, h)
        center, scale = box_to_center_scale(tuple(float(v) for v in box), aspect)
    crop = crop_image(frame, center, scale, d.image_size).reshape(d.image_size[1], d.image_size[0], -1)
    crop = np.repeat(crop, 3, axis=2) if crop.shape[2] == 1 else crop[..., :3]
    x = torch.from_numpy(((crop / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32).transpose(2, 0, 1))[None]
    with torch.no_grad():
        heatmaps = dict(zip(model.output_stages, (o.numpy() for o in model(x))))
    for stage in stages:
        _check_finite(heatmaps[stage], f"{source}: stage {stage} heatmaps on this frame")
    k = TILE_WIDTH / crop.shape[1]
    big = _resize(crop[..., ::-1], k)
    rows = []
    for stage in stages:
        hm = heatmaps[stage]
        coords, _ = d.codec.decode_crop(hm)
        pred = np.concatenate([(coords[0] + 0.5) * k - 0.5, np.full((len(coords[0]), 1), 2.0)], axis=1)
        _check_finite(pred, f"{source}: stage {stage} keypoints on this frame")
        net = StageHeatmaps(model, stage)
        layer = model.feature_layer_names()[model.output_stages.index(stage)]
        row = [draw_skeleton(big, pred, spec, label=f"S{stage} pred")]
        for method in methods:
            maps = joint_cams(net, method, layer, x, predicted_peaks(hm), joints=[] if j is None else [j], sign=sign)
            _check_finite(maps[0, 0], f"{source}: stage {stage} {method} map on this frame")
            target = "" if method in CLASS_AGNOSTIC else f" {joint or 'pose'}"     # EigenCAM has no target
            tile = cam_overlay(big, maps[0, 0], label=f"S{stage} {method}{target}")   # the joint's, or the pose's
            if j is not None:
                _marker(tile, pred[j], (255, 255, 255), filled=True)
            row.append(tile)
        rows.append(row)
    return tile_table(rows)


def _check_box(box: Sequence[float], w: int, h: int) -> None:
    """ValueError naming --box and the frame size unless `box` (x y w h frame px) is four finite
    numbers, at least 1 px wide and high, and at least half on the w x h frame."""
    given, frame = "--box " + " ".join(f"{v:g}" for v in box), f"the frame is {w}x{h} px"
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"{given}: not four finite numbers; give X Y W H in frame px ({frame})")
    x, y, bw, bh = box
    if bw < 1 or bh < 1:
        raise ValueError(f"{given}: width and height must be at least 1 px; give the person box X Y W H in "
                         f"frame px ({frame})")
    if x >= w or y >= h or x + bw <= 0 or y + bh <= 0:
        raise ValueError(f"{given}: lies outside the frame ({frame}); give a box that overlaps it, or leave "
                         "--box out for the whole frame")
    # A box mostly off the frame crops mostly padding: the model then "finds" a pose in nothing.
    on = (min(x + bw, w) - max(x, 0.0)) * (min(y + bh, h) - max(y, 0.0)) / (bw * bh)
    if on < 0.5:
        raise ValueError(f"{given}: only {on:.1%} of it lies on the frame ({frame}); a person box must lie "
                         "mostly (at least half) on the frame")


def _check_finite(a: np.ndarray, what: str) -> None:
    bad = int(np.size(a) - np.isfinite(a).sum())
    if bad:
        raise ValueError(f"{what} hold {bad} non-finite values (NaN / inf) of {np.size(a)}: the weights are broken "
                         "or overflow on this input; use an earlier checkpoint or train again")


def _check_paths(image: Path, model: Path, params: Path, out: Path) -> None:
    """Refuse, before any work, a frame or model path that is a folder and an --out that cannot be
    written or would overwrite an input (ValueError / DataError naming the path and the fix)."""
    from okdpose.model import CheckpointError

    if image.is_dir():
        raise DataError(f"{image}: is a folder, not a frame file; give an image file (PNG, ...) inside it")
    if model.is_dir():
        raise CheckpointError(f"{model}: is a folder, not a checkpoint file; give the .pt / .pth file inside it")
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a picture file, e.g. --out {out / (image.stem + '_cam.png')}")
    for name, src in (("input frame", image), ("model file", model), ("params file", params)):
        if src.exists() and (out.exists() and os.path.samefile(out, src) or out.resolve() == src.resolve()):
            raise ValueError(f"--out {out}: is the {name}; the picture would overwrite it; choose another --out")
    if out.suffix.lower() not in PICTURE_SUFFIXES:
        what = f"{out.suffix!r} is not a picture type" if out.suffix else "has no picture suffix"
        raise ValueError(f"--out {out}: {what}; end it in one of {', '.join(PICTURE_SUFFIXES)}, "
                         f"e.g. --out {out.with_suffix('.png')}")
    parent = next(d for d in (out.absolute().parent, *out.absolute().parents) if d.exists())
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: folder {parent} is not writable; choose another --out")


PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")   # what OpenCV encodes by name


def write_picture(path: Path, image: np.ndarray) -> None:
    """Write a uint8 BGR picture in the format its suffix names (PNG, JPEG, ...), atomically."""
    import cv2

    with atomic_path(path) as tmp:
        ok, buf = cv2.imencode(path.suffix.lower(), image)
        if not ok:
            raise OSError(f"OpenCV could not encode a {path.suffix} picture")
        tmp.write_bytes(buf.tobytes())


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
    out = args.out or args.image.with_name(f"{args.image.stem}_cam.png")
    try:
        _check_paths(args.image, args.model, args.params, out)
        model, p = load_explainable(args.model, args.params)
        last = model.output_stages[-1]
        stages = list(model.output_stages) if args.all_stages else [last if args.stage is None else args.stage]
        bad = [s for s in stages if s not in model.output_stages]
        if bad:
            raise ValueError(f"--stage {bad[0]}: {args.model} outputs stages {list(model.output_stages)}")
        frame = read_frame(args.image, p.data.depth_range)
        picture = explain_frame(model, p, frame, args.box, stages, list(dict.fromkeys(args.method)), args.joint,
                                args.sign, source=str(args.model))
    except (DataError, CheckpointError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    try:
        write_picture(out, picture)
    except OSError as e:
        print(f"{prog}: --out {out}: cannot be written ({e.strerror or e}); choose another --out", file=sys.stderr)
        return 2
    print(f"{prog}: stages {stages}, methods {', '.join(dict.fromkeys(args.method))}, "
          f"target {args.joint or 'pose'} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
