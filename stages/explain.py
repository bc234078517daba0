"""explain: EigenCAM of every stage output of models/model.pt on `explain.num_images` crops of
`explain.split` (drawn with `explain.seed`). Writes plots/explain/<image>.png (crop, ground truth,
per-stage predicted skeleton and CAM overlays), results/explain/<image>.npz (raw maps, crop,
boxes, joints), metrics/explain.json (CAM scores per stage and layer, averaged over the images)
and logs pictures and scores into the training MLflow run (`mlflow_run_id` of metrics/train.json)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from okdpose.data.coco import DataError
from okdpose.data.dataset import PoseDataset, denormalize
from okdpose.explain import (LayerError, box_in_crop, cam_scores, cam_targets, eigencam_with_outputs,
                             explain_picture, joints_in_crop, pointing_radius, predictions_in_crop)
from okdpose.files import atomic_dir, write_json
from okdpose.model import CheckpointError, load_model
from okdpose.params import ParamsError, load_params
from okdpose.tracking import Tracker
from okdpose.viz import write_png_palette

PREPARED, MODEL, TRAIN_METRICS = Path("data/prepared"), Path("models/model.pt"), Path("metrics/train.json")
RESULTS, PLOTS, METRICS = Path("results/explain"), Path("plots/explain"), Path("metrics/explain.json")


def main() -> None:
    p = load_params()
    e, d = p.explain, p.data
    if not MODEL.is_file():
        raise FileNotFoundError(f"{MODEL}: no trained model yet; run `dvc repro train-okd` first")
    model, _ = load_model(MODEL)
    ds = PoseDataset(PREPARED, e.split, d.joint_spec, d.image_size, d.heatmap_size, d.sigma)
    rows = np.sort(np.random.default_rng(e.seed).choice(len(ds), size=min(e.num_images, len(ds)), replace=False))
    samples = [ds[int(i)] for i in rows]
    images = torch.stack([s[0] for s in samples])
    center, scale = np.stack([s[3]["center"] for s in samples]), np.stack([s[3]["scale"] for s in samples])
    bbox = ds.records.bbox[rows]
    targets = cam_targets(model, e.stages, e.heads, e.layers)
    maps, heatmaps = eigencam_with_outputs(model, images, [t.layer for t in targets])
    cams = {t.key: maps[t.layer] for t in targets}
    boxes = box_in_crop(bbox, center, scale, d.image_size)
    joints = joints_in_crop(np.stack([s[3]["joints"] for s in samples]), center, scale, d.image_size)
    preds = {s: predictions_in_crop(hm, center, scale, d.image_size) for s, hm in zip(model.output_stages, heatmaps)}
    scores = cam_scores(cams, boxes, joints, pointing_radius(bbox, scale, d.image_size, e.pointing_radius))

    names = [f"{ds.records.image_id[i]:012d}_{ds.records.ann_id[i]}" for i in rows]
    with atomic_dir(PLOTS) as plots, atomic_dir(RESULTS) as results:
        for b, name in enumerate(names):
            crop = denormalize(images[b])
            write_png_palette(plots / f"{name}.png", explain_picture(
                crop, joints[b], boxes[b], {s: v[b] for s, v in preds.items()}, {k: v[b] for k, v in cams.items()},
                targets, d.joint_spec))
            np.savez_compressed(results / f"{name}.npz", crop=crop, box=boxes[b], joints=joints[b],
                                **{t.layer: cams[t.key][b] for t in targets},
                                **{f"pred_stage{s}": v[b] for s, v in preds.items()})
    metrics = {"split": e.split, "pointing_radius": e.pointing_radius, **scores}
    write_json(METRICS, metrics)
    log_to_training_run(p, metrics)
    print(f"explain: {len(rows)} {e.split} images x {len(targets)} layers -> {PLOTS}/, {RESULTS}/, {METRICS}")


def log_to_training_run(p, metrics: dict) -> None:
    """Pictures and scores go into the run train-okd opened; without one, nothing is logged."""
    try:
        run_id = json.loads(TRAIN_METRICS.read_text()).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        run_id = None
    if not run_id:
        print(f"explain: no mlflow_run_id in {TRAIN_METRICS}; nothing logged to MLflow")
        return
    with Tracker.from_params(p.tracking).run(run_id=run_id) as run:
        run.log_metrics(_flat("explain", metrics))
        run.log_artifact(PLOTS, "explain")
        run.log_artifact(METRICS, "explain")


def _flat(prefix: str, obj: object) -> dict[str, float]:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(f"{prefix}.{key}", val).items()}
    return {prefix: obj} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, DataError, CheckpointError, LayerError, FileNotFoundError) as err:
        sys.exit(f"explain: {err}")
