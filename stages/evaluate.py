"""evaluate: every stage output of models/model.pt on `evaluate.split` -> metrics/eval.json (per
stage: COCO AP/AR, heatmap and box PCK, pixel error, params, GFLOPs, CPU latency), COCO results
per stage in results/eval/, plots/eval/ (CSV tables, predicted vs ground-truth skeletons), all
logged into the training MLflow run (`mlflow_run_id` of metrics/train.json) when there is one."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from okdpose.data.coco import DataError
from okdpose.data.dataset import PoseDataset
from okdpose.files import atomic_dir, write_json
from okdpose.inference import evaluate_report, per_joint_rows, pose_examples, predict, stage_costs_table
from okdpose.model import CheckpointError, load_model
from okdpose.params import Params, ParamsError, load_params
from okdpose.tracking import Tracker
from okdpose.viz import write_png_palette

MODEL, PREPARED, TRAIN_METRICS = Path("models/model.pt"), Path("data/prepared"), Path("metrics/train.json")
METRICS, RESULTS, PLOTS = Path("metrics/eval.json"), Path("results/eval"), Path("plots/eval")


def main() -> None:
    p = load_params()
    e, d, spec = p.evaluate, p.data, p.joint_spec
    if not MODEL.is_file():
        raise CheckpointError(f"{MODEL}: not found; train the model first (dvc repro train-okd)")
    model, _ = load_model(MODEL)
    want = {"num_joints": spec.num_joints, "width": p.model.width, "n_stage": p.model.n_stage, "multi": p.model.multi}
    if model.config() != want:
        raise CheckpointError(f"{MODEL} holds a model {model.config()}, params.yaml asks for {want}; "
                              "re-run training (dvc repro train-okd) or fix params.yaml model / data.joints")
    ds = PoseDataset(PREPARED, e.split, spec, d.image_size, d.heatmap_size, d.sigma, use_gt_bbox=e.use_gt_bbox)
    preds = predict(model, ds, batch_size=e.batch_size, flip_test=e.flip_test, progress=sys.stderr.isatty())
    report = evaluate_report(preds, PREPARED / f"{e.split}_gt.json", spec, use_gt_bbox=e.use_gt_bbox,
                             pck_thresholds=e.pck_thresholds, oks_nms=e.oks_nms, oks_thre=e.oks_thre,
                             in_vis_thre=e.in_vis_thre, image_thre=e.image_thre)
    costs = stage_costs_table(model, d.image_size)
    stages = {name: {**m, **costs[name]} for name, m in report.metrics.items()}
    metrics = {"split": e.split, "use_gt_bbox": e.use_gt_bbox, "flip_test": e.flip_test, **stages}
    with atomic_dir(RESULTS) as tmp:
        for name, results in report.results.items():
            write_json(tmp / f"predictions_{name}.json", results, indent=None)
    with atomic_dir(PLOTS) as tmp:
        _write_csv(tmp / "stages.csv", [{"stage": int(n[5:]), **m} for n, m in stages.items()])
        _write_csv(tmp / "per_joint.csv", per_joint_rows(report, spec))
        for i, picture in enumerate(pose_examples(ds, preds, report, e.num_images)):
            write_png_palette(tmp / f"example_{i}.png", picture)   # palette: ~20 KB each
    write_json(METRICS, _finite(metrics))          # last: metrics exist only for a complete run
    _log_to_training_run(p, metrics)
    print("evaluate: " + ", ".join(f"{n} AP {m['AP']:.3f}" for n, m in stages.items())
          + f" ({e.split}) -> {METRICS}, {RESULTS}/, {PLOTS}/")


def _log_to_training_run(p: Params, metrics: dict) -> None:
    run_id = json.loads(TRAIN_METRICS.read_text()).get("mlflow_run_id") if TRAIN_METRICS.is_file() else None
    tracker = Tracker.from_params(p.tracking)
    if not (run_id and tracker.enabled):
        print(f"evaluate: not logged to MLflow ({'tracking is off' if run_id else f'no mlflow_run_id in {TRAIN_METRICS}'})")
        return
    split = metrics["split"]
    with tracker.run(run_id=run_id) as run:
        run.log_metrics({f"eval.{split}.{n}.{k}": v for n, m in metrics.items() if isinstance(m, dict)
                         for k, v in m.items() if v is not None})
        run.set_tags({f"eval.{k}": metrics[k] for k in ("split", "use_gt_bbox", "flip_test")})
        for path in (METRICS, PLOTS, RESULTS):
            run.log_artifact(path, f"eval/{path.parent.name}")        # eval/metrics, eval/results, eval/plots


def _finite(obj):
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return None if isinstance(obj, float) and not np.isfinite(obj) else obj


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if isinstance(v, float) and not np.isfinite(v) else v for k, v in r.items()} for r in rows)


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, DataError, CheckpointError, FileNotFoundError) as err:
        sys.exit(f"evaluate: {err}")
