"""explain: EigenCAM of every stage output of models/model.pt on `explain.num_images` crops of
`explain.split` (drawn with `explain.seed`). Writes plots/explain/<image>.png (crop, ground truth,
per-stage predicted skeleton and CAM overlays), results/explain/<image>.npz (raw maps, crop,
boxes, joints), metrics/explain.json (CAM scores per stage and layer, averaged over the images)
and logs pictures and scores into the training MLflow run (`mlflow_run_id` of metrics/train.json).
The model runs on `explain.device`."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import torch

from okdpose.cam_scores import cam_scores
from okdpose.data.coco import DataError
from okdpose.data.dataset import PoseDataset
from okdpose.device import describe, resolve_device
from okdpose.explain import LayerError, cam_targets, explain_samples
from okdpose.files import atomic_dir, write_json
from okdpose.model import CheckpointError, load_model
from okdpose.params import ParamsError, load_params
from okdpose.tracking import log_to_pipeline_run
from okdpose.viz import explain_picture, write_png_palette

PREPARED, MODEL, TRAIN_METRICS = Path("data/prepared"), Path("models/model.pt"), Path("metrics/train.json")
RESULTS, PLOTS, METRICS = Path("results/explain"), Path("plots/explain"), Path("metrics/explain.json")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = load_params()
    e, d = p.explain, p.data
    model, _ = load_model(MODEL, expect=p.model_config(), fix="train the model first (dvc repro train-okd)")
    device = resolve_device(e.device, "explain.device")
    logging.info("explain: %s", describe(device, None, torch.contiguous_format))
    model.to(device)                 # the crops follow the model (grad-cam moves them), the maps come back to the CPU
    ds = PoseDataset(PREPARED, e.split, d.joint_spec, d.codec)
    rows = np.sort(np.random.default_rng(e.seed).choice(len(ds), size=min(e.num_images, len(ds)), replace=False))
    targets = cam_targets(model, e.stages, e.heads, e.layers)
    s = explain_samples(model, ds, rows, targets, e.pointing_radius)
    with atomic_dir(PLOTS) as plots, atomic_dir(RESULTS) as results:
        for b, name in enumerate(s.names):
            cams, preds = {k: v[b] for k, v in s.cams.items()}, {k: v[b] for k, v in s.preds.items()}
            write_png_palette(plots / f"{name}.png", explain_picture(
                s.crops[b], s.joints[b], s.boxes[b], preds, cams, targets, d.joint_spec))
            np.savez_compressed(results / f"{name}.npz", crop=s.crops[b], box=s.boxes[b], joints=s.joints[b],
                                **{t.layer: cams[t.key] for t in targets},
                                **{f"pred_stage{k}": v for k, v in preds.items()})
    metrics = {"split": e.split, "pointing_radius": e.pointing_radius,
               **cam_scores(s.cams, s.boxes, s.joints, s.radius)}
    write_json(METRICS, metrics)
    log_to_pipeline_run(p.tracking, TRAIN_METRICS, "explain", metrics,
                        artifacts=[("explain", PLOTS), ("explain", METRICS)])
    print(f"explain: {len(rows)} {e.split} images x {len(targets)} layers -> {PLOTS}/, {RESULTS}/, {METRICS}")


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, DataError, CheckpointError, LayerError, FileNotFoundError) as err:
        sys.exit(f"explain: {err}")
