"""evaluate: every stage output of models/model.pt on `evaluate.split` -> reports/eval.json (per
stage: COCO AP/AR, heatmap and box PCK, pixel error, params, GFLOPs, CPU latency; the anytime
early-exit curve; energy), its headline subset metrics/eval.json (what `dvc exp show` compares:
`okdpose.reports.eval_headline`), COCO results per stage in results/eval/, plots/eval/ (CSV tables, predicted vs
ground-truth skeletons), all logged into the training MLflow run (`mlflow_run_id` of
metrics/train.json) when there is one. The model runs on `evaluate.device` (the latency column
is measured on the CPU whatever it is)."""
from __future__ import annotations

import sys
from pathlib import Path

# this tree's okdpose before an installed (editable) copy: a queued `dvc exp run` runs the stage in a
# copy of the repository whose src/ is the code it was queued with (README "grid"; test_this_tree.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import logging

from okdpose import energy
from okdpose.data.coco import DataError
from okdpose.device import autocast_dtype, describe, input_memory_format, resolve_device
from okdpose.eval_run import run_evaluation, write_evaluation
from okdpose.model import CheckpointError, load_model
from okdpose.params import ParamsError, load_params
from okdpose.tracking import log_to_pipeline_run

MODEL, PREPARED, TRAIN_METRICS = Path("models/model.pt"), Path("data/prepared"), Path("metrics/train.json")
REPORT, METRICS = Path("reports/eval.json"), Path("metrics/eval.json")
RESULTS, PLOTS = Path("results/eval"), Path("plots/eval")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = load_params()
    e = p.evaluate
    model, _ = load_model(MODEL, expect=p.model_config(), fix="train the model first (dvc repro train-okd)")
    device = resolve_device(e.device, "evaluate.device")
    dtype = autocast_dtype(device, e.precision, key="evaluate.precision")
    logging.info("evaluate: %s", describe(device, dtype, input_memory_format(device)))
    run = run_evaluation(model.to(device), e, p.data, p.joint_spec, PREPARED, device=device,
                         progress=sys.stderr.isatty(), energy=p.energy, autocast=dtype, name=str(MODEL))
    write_evaluation(run, metrics=REPORT, results=RESULTS, plots=PLOTS, num_images=e.num_images, headline=METRICS)
    summary = run.summary()
    named = {k: v for k, v in summary.items() if k.startswith("stage")}
    spent = (run.energy or {}).get("inference") or {}
    log_to_pipeline_run(p.tracking, TRAIN_METRICS, "eval", {e.split: named,         # eval.{split}.stage{k}.{key}
                                                            **energy.metric_values(spent, "energy.inference")},
                        artifacts={"eval/metrics": METRICS, "eval/reports": REPORT, "eval/plots": PLOTS,
                                   "eval/results": RESULTS},
                        tags={**{f"eval.{k}": v for k, v in run.flags.items()},
                              **(energy.tags(spent, "eval.energy") if spent else {})})
    print("evaluate: " + ", ".join(f"{n} AP {m['AP']:.3f}" for n, m in named.items())
          + f" ({e.split}) -> {REPORT}, {METRICS}, {RESULTS}/, {PLOTS}/")


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, DataError, CheckpointError, FileNotFoundError) as err:
        sys.exit(f"evaluate: {err}")
