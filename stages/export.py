"""export: each stage of `export.stages` of models/model.pt as a standalone model (only what that
stage needs, BN folded) in models/export/stage{k}.onnx and .pt with its DeployMeta inside (joints,
sizes, normalisation, depth range, the stage's test AP from metrics/eval.json, commit / DVC
experiment, precision), in `export.precision` (float32 in and out), each verified against PyTorch
in the file's precision on `export.verify_samples` test crops (a mismatch fails the stage);
reports/export.json: the precision asked and per format, the CPU flags, per stage params, GFLOPs,
file sizes, verification (with what a lower precision moves against fp32), and the latency of
PyTorch / TorchScript / onnxruntime (each with its precision) at `export.latency_batches` timed
side by side with the teacher's, speed-up next to FLOP ratio; the numbers are logged into the
training MLflow run (`mlflow_run_id` of metrics/train.json) when there is one."""
from __future__ import annotations

import sys
from pathlib import Path

# this tree's okdpose before an installed (editable) copy: a queued `dvc exp run` runs the stage in a
# copy of the repository whose src/ is the code it was queued with (README "grid"; test_this_tree.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import logging

from okdpose.data.coco import DataError
from okdpose.data.dataset import PoseDataset
from okdpose.deploy_meta import MetaError
from okdpose.export import (ExportError, dataset_crops, export_report, export_stages, latency_lines, precision_info,
                            source_info, stage_meta, stage_test_ap)
from okdpose.files import atomic_dir, write_json
from okdpose.model import CheckpointError, load_model
from okdpose.params import ParamsError, load_params
from okdpose.tracking import log_to_pipeline_run

MODEL, PREPARED, EVAL_METRICS = Path("models/model.pt"), Path("data/prepared"), Path("metrics/eval.json")
OUT, REPORT, TRAIN_METRICS = Path("models/export"), Path("reports/export.json"), Path("metrics/train.json")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = load_params()
    e = p.export
    stages = p.export_stages()
    model, _ = load_model(MODEL, expect=p.model_config(), fix="train the model first (dvc repro train-okd)")
    crops = dataset_crops(PoseDataset(PREPARED, "test", p.joint_spec, p.data.codec), e.verify_samples)
    metas = {k: stage_meta(p, model, k, test_ap=stage_test_ap(EVAL_METRICS, k), source=source_info(MODEL))
             for k in stages}
    with atomic_dir(OUT) as tmp:        # all stages verified, or models/export stays as it was
        exports = export_stages(model, metas, tmp, crops, formats=e.formats, opset=e.opset, tolerance=e.tolerance,
                                max_near_ties=e.max_near_ties, threads=e.threads, precision=e.precision)
        report = export_report(model, exports, crops, batches=e.latency_batches, repeats=e.latency_repeats,
                               threads=e.threads, opset=e.opset, formats=e.formats)
    metrics = {"threads": e.threads, "opset": e.opset, **precision_info(e.precision, e.formats),
               "verify_crops": crops.source, **report}
    write_json(REPORT, metrics)
    # the numbers only: the model files are DVC-cached (W32: ~0.1 GB per stage and format)
    log_to_pipeline_run(p.tracking, TRAIN_METRICS, "export", metrics, artifacts={"export": REPORT})
    print("\n".join(latency_lines(report)))
    precs = ", ".join(f"{fmt} {prec}" for fmt, prec in metrics["precision"].items())
    print(f"export: stages {list(stages)} as {precs} -> {OUT}/, {REPORT}")


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, DataError, CheckpointError, ExportError, MetaError, FileNotFoundError) as err:
        sys.exit(f"export: {err}")
