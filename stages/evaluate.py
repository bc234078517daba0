"""evaluate: every stage output of models/model.pt on `evaluate.split` -> metrics/eval.json (per
stage: COCO AP/AR, heatmap and box PCK, pixel error, params, GFLOPs, CPU latency), COCO results
per stage in results/eval/, plots/eval/ (CSV tables, predicted vs ground-truth skeletons), all
logged into the training MLflow run (`mlflow_run_id` of metrics/train.json) when there is one.
The model runs on `evaluate.device` (the latency column is measured on the CPU whatever it is)."""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

from okdpose.data.coco import DataError
from okdpose.data.dataset import PoseDataset
from okdpose.device import describe, input_memory_format, resolve_device
from okdpose.evaluation import evaluate_report, per_joint_rows
from okdpose.files import atomic_dir, write_csv, write_json
from okdpose.inference import predict
from okdpose.model import CheckpointError, load_model, stage_costs_table
from okdpose.params import ParamsError, load_params
from okdpose.tracking import log_to_pipeline_run
from okdpose.viz import pose_examples, write_png_palette

MODEL, PREPARED, TRAIN_METRICS = Path("models/model.pt"), Path("data/prepared"), Path("metrics/train.json")
METRICS, RESULTS, PLOTS = Path("metrics/eval.json"), Path("results/eval"), Path("plots/eval")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = load_params()
    e, d, spec = p.evaluate, p.data, p.joint_spec
    model, _ = load_model(MODEL, expect=p.model_config(), fix="train the model first (dvc repro train-okd)")
    device = resolve_device(e.device, "evaluate.device")
    logging.info("evaluate: %s", describe(device, None, input_memory_format(device)))
    ds = PoseDataset(PREPARED, e.split, spec, d.codec, use_gt_bbox=e.use_gt_bbox)
    preds = predict(model.to(device), ds, batch_size=e.batch_size, device=device, flip_test=e.flip_test,
                    progress=sys.stderr.isatty())
    report = evaluate_report(preds, PREPARED / f"{e.split}_gt.json", spec, use_gt_bbox=e.use_gt_bbox,
                             pck_thresholds=e.pck_thresholds, oks_nms=e.oks_nms, oks_thre=e.oks_thre,
                             in_vis_thre=e.in_vis_thre, image_thre=e.image_thre)
    costs = stage_costs_table(model, d.image_size)
    stages = {k: {**m, **costs[k]} for k, m in report.metrics.items()}
    named = {f"stage{k}": m for k, m in stages.items()}           # the JSON and MLflow names
    with atomic_dir(RESULTS) as tmp:
        for k, results in report.results.items():
            write_json(tmp / f"predictions_stage{k}.json", results, indent=None)
    with atomic_dir(PLOTS) as tmp:
        write_csv(tmp / "stages.csv", [{"stage": k, **m} for k, m in stages.items()])
        write_csv(tmp / "per_joint.csv", per_joint_rows(report, spec))
        for i, picture in enumerate(pose_examples(ds, preds, report, e.num_images)):
            write_png_palette(tmp / f"example_{i}.png", picture)   # palette: ~20 KB each
    flags = {"split": e.split, "use_gt_bbox": e.use_gt_bbox, "flip_test": e.flip_test}
    finite = {n: {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()}
              for n, m in named.items()}                     # JSON has no NaN: "no value" is null
    write_json(METRICS, {**flags, **finite})         # last: metrics exist only for a complete run
    log_to_pipeline_run(p.tracking, TRAIN_METRICS, "eval", {e.split: named},         # eval.{split}.stage{k}.{key}
                        artifacts={"eval/metrics": METRICS, "eval/plots": PLOTS, "eval/results": RESULTS},
                        tags={f"eval.{k}": v for k, v in flags.items()})
    print("evaluate: " + ", ".join(f"{n} AP {m['AP']:.3f}" for n, m in named.items())
          + f" ({e.split}) -> {METRICS}, {RESULTS}/, {PLOTS}/")


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, DataError, CheckpointError, FileNotFoundError) as err:
        sys.exit(f"evaluate: {err}")
