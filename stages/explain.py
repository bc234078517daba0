"""explain: CAMs of every stage output of models/model.pt on `explain.num_images` crops of
`explain.split` (drawn with `explain.seed`): EigenCAM of each stage's feature and head (one
forward pass), and each of `explain.methods` with keypoint targets. Writes plots/explain/<image>.png
(crop, ground truth, per-stage skeleton and EigenCAM overlays), <image>_stage<k>.png (joints x
methods, first `explain.grid_images` images, joint-targeted methods only), plots/explain_scores/
stages.csv (scores per stage and method), results/explain/<image>.npz (raw maps) and scores.json (per-image scores),
reports/explain.json (means per stage and method) and logs them into the training MLflow run."""
from __future__ import annotations

import sys
from pathlib import Path

# this tree's okdpose before an installed (editable) copy: a queued `dvc exp run` runs the stage in a
# copy of the repository whose src/ is the code it was queued with (README "grid"; test_this_tree.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import logging

import numpy as np
import torch

from okdpose.cam_scores import score_report, stage_table
from okdpose.data.coco import DataError
from okdpose.data.dataset import PoseDataset
from okdpose.device import autocast_dtype, describe, precision_record, resolve_device
from okdpose.explain import LayerError, cam_targets, explain_samples, precision_shift
from okdpose.files import atomic_dir, write_csv, write_json
from okdpose.keypoint_cam import CLASS_AGNOSTIC, explain_methods
from okdpose.model import CheckpointError, load_model
from okdpose.params import ParamsError, load_params
from okdpose.tracking import log_to_pipeline_run
from okdpose.viz import explain_picture, joint_method_grid, write_png_palette

PREPARED, MODEL, TRAIN_METRICS = Path("data/prepared"), Path("models/model.pt"), Path("metrics/train.json")
RESULTS, PLOTS, REPORT = Path("results/explain"), Path("plots/explain"), Path("reports/explain.json")
SCORES = Path("plots/explain_scores")     # the score table, drawn by dvc.yaml's top-level plots


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = load_params()
    e, d = p.explain, p.data
    model, _ = load_model(MODEL, expect=p.model_config(), fix="train the model first (dvc repro train-okd)")
    device = resolve_device(e.device, "explain.device")
    dtype = autocast_dtype(device, e.precision, key="explain.precision")
    logging.info("explain: %s", describe(device, dtype, torch.contiguous_format))
    model.to(device)                 # the crops follow the model (grad-cam moves them), the maps come back to the CPU
    ds = PoseDataset(PREPARED, e.split, d.joint_spec, d.codec)
    rows = np.sort(np.random.default_rng(e.seed).choice(len(ds), size=min(e.num_images, len(ds)), replace=False))
    targets = cam_targets(model, e.stages, e.heads, e.layers)
    s = explain_samples(model, ds, rows, targets, e.pointing_radius, e.sign, dtype)
    features = {t.stage: s.cams[t.key] for t in targets if t.kind == "feature"}
    mm = explain_methods(model, s.inputs, {k: s.heatmaps[k] for k in features}, s.joints, d.codec.stride,
                         e.methods, e.target_peak, features, e.road, e.sign, dtype)
    summary, per_image = score_report(s.cams, mm, s.boxes, s.joints, s.radius)
    with atomic_dir(PLOTS) as plots, atomic_dir(RESULTS) as results:
        for b, name in enumerate(s.names):
            cams, preds = {k: v[b] for k, v in s.cams.items()}, {k: v[b] for k, v in s.preds.items()}
            write_png_palette(plots / f"{name}.png", explain_picture(
                s.crops[b], s.joints[b], s.boxes[b], preds, cams, targets, d.joint_spec))
            if b < e.grid_images and set(e.methods) - CLASS_AGNOSTIC:
                for k, by in mm.items():
                    write_png_palette(plots / f"{name}_stage{k}.png", joint_method_grid(
                        s.crops[b], s.joints[b], preds[k], {m: v.pose[b] for m, v in by.items()},
                        {m: None if v.joints is None else v.joints[b] for m, v in by.items()}, d.joint_spec, k))
            np.savez_compressed(results / f"{name}.npz", crop=s.crops[b], box=s.boxes[b], joints=s.joints[b],
                                **{t.layer: cams[t.key] for t in targets},
                                **{f"pred_stage{k}": v for k, v in preds.items()},
                                **{f"stage{k}_{m}": v.pose[b] if v.joints is None else
                                   np.concatenate([v.joints[b], v.pose[b][None]]) for k, by in mm.items()
                                   for m, v in by.items() if m not in CLASS_AGNOSTIC})
        write_json(results / "scores.json", {"images": s.names, **per_image})
    with atomic_dir(SCORES) as tmp:
        write_csv(tmp / "stages.csv", stage_table(summary))
    metrics = {"split": e.split, "pointing_radius": e.pointing_radius, "sign": e.sign,
               "target_peak": e.target_peak, **precision_record(device, dtype, e.precision), **summary}
    if dtype is not None:     # not traded silently: how far the lower precision moved maps and joints
        metrics["precision_shift"] = precision_shift(model, s, targets, d.codec, e.sign)
    write_json(REPORT, metrics)
    log_to_pipeline_run(p.tracking, TRAIN_METRICS, "explain", metrics,
                        artifacts=[("explain", PLOTS), ("explain", SCORES), ("explain", REPORT)])
    print(f"explain: {len(rows)} {e.split} images x {len(targets)} EigenCAM layers, methods "
          f"{', '.join(e.methods)} -> {PLOTS}/, {RESULTS}/, {REPORT}")


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, DataError, CheckpointError, LayerError, FileNotFoundError) as err:
        sys.exit(f"explain: {err}")
