"""One evaluation of a model on a prepared split, as the evaluate stage and `okdpose evaluate
--checkpoint` both run it: predictions of every stage, per-stage metrics with their cost, the
anytime (early-exit) curve, and the files that record them.

    run = run_evaluation(model, p.evaluate, p.data, p.joint_spec, Path("data/prepared"), device="cpu")
    write_evaluation(run, metrics=Path("reports/eval.json"), results=Path("results/eval"),
                     plots=Path("plots/eval"), num_images=p.evaluate.num_images,
                     headline=Path("metrics/eval.json"))

reports/eval.json (the full document): {split, use_gt_bbox, flip_test, stage{k}: {AP, AR, ..., params_M, gflops,
latency_ms}, anytime: {confidence, curve: [{threshold, AP, gflops, exit_stage{k}, ...}]},
energy: {inference: codecarbon record of the forward passes over the split, with kwh_per_image}}; JSON
has no NaN or infinity: "no value" is null and τ = inf is "inf". metrics/eval.json (what `dvc exp
show` compares): its headline subset, `okdpose.reports.eval_headline`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from okdpose.anytime import anytime_curve, exit_costs
from okdpose.data.coco import DataError
from okdpose.data.dataset import REPREPARE, PoseDataset
from okdpose.device import precision_record
from okdpose.energy import measure_energy
from okdpose.evaluation import EvalReport, evaluate_report, per_joint_rows
from okdpose.files import atomic_dir, write_csv, write_json
from okdpose import inference
from okdpose.inference import Predictions
from okdpose.joints import JointSpec
from okdpose.model.checkpoint import CheckpointError
from okdpose.model.cost import stage_costs_table
from okdpose.model.multi_out import MultiOutHRNet
from okdpose.params import EnergyParams
from okdpose.reports import eval_headline
from okdpose.viz import pose_examples, write_png_palette

if TYPE_CHECKING:
    import torch

    from okdpose.params import DataParams, EvaluateParams


@dataclass
class EvalRun:
    """What one evaluation computed (stages are 1-based ints)."""

    dataset: PoseDataset
    preds: Predictions
    report: EvalReport
    stages: dict[int, dict[str, float]]      # per-stage metrics and cost (params_M, gflops, latency_ms)
    anytime: list[dict[str, Any]]            # the τ sweep (`anytime.anytime_curve`); [] for one output
    flags: dict[str, Any]                    # split, use_gt_bbox, flip_test
    confidence: str
    energy: Optional[dict[str, Any]] = None  # {"inference": record} (`okdpose.energy`)

    def summary(self) -> dict[str, Any]:
        """The full evaluation document (reports/eval.json)."""
        named = {f"stage{k}": _finite(m) for k, m in self.stages.items()}
        out: dict[str, Any] = {**self.flags, **named}
        if self.anytime:
            out["anytime"] = {"confidence": self.confidence, "curve": [_finite(r) for r in self.anytime]}
        if self.energy:
            out["energy"] = self.energy
        return out


def _finite(m: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()}


def precision_shift(preds: Predictions, ref: Predictions) -> dict[str, dict[str, float]]:
    """Per stage: mean / max distance (frame px) of each decoded joint from its fp32 position
    `ref` (same crops), and the share of joints that moved at all."""
    d = np.linalg.norm(preds.coords - ref.coords, axis=-1)          # (S, N, J)
    return {f"stage{k}": {"mean_px": round(float(d[i].mean()), 4), "max_px": round(float(d[i].max()), 4),
                          "moved": round(float((d[i] > 0).mean()), 4)} for i, k in enumerate(preds.stages)}


def read_ground_truth(path: Path) -> dict[str, Any]:
    """`{split}_gt.json` of the prepared data (COCO keypoints), or an error naming it and the fix."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ground truth not found; run the preprocess stage (dvc repro preprocess)")
    try:
        gt = json.loads(path.read_text())
    except (OSError, ValueError) as err:      # ValueError: not JSON, not UTF-8
        raise DataError(f"{path}: cannot be read as JSON ({err}); {REPREPARE}") from None
    if not isinstance(gt, dict) or not all(isinstance(gt.get(k), list) for k in ("images", "annotations")):
        raise DataError(f"{path}: not a COCO ground truth (no 'images' and 'annotations' lists); {REPREPARE}")
    return gt


def check_finite(preds: Predictions, name: str, autocast: "Optional[torch.dtype]") -> None:
    """Stop on NaN / infinite heatmaps (broken weights, or an overflow in them or in a lower
    precision): no metric or file could be computed from them."""
    bad = [k for i, k in enumerate(preds.stages)
           if not (np.isfinite(preds.maxvals[i]).all() and np.isfinite(preds.coords[i]).all())]
    if bad:
        under = f" under {str(autocast).removeprefix('torch.')} autocast" if autocast is not None else ""
        fix = ("evaluate in fp32 (--precision fp32 / evaluate.precision: fp32)" if autocast is not None
               else "its weights are broken or overflow: retrain it or use another checkpoint")
        one = len(bad) == 1
        raise CheckpointError(f"{name}: output stage{'' if one else 's'} {', '.join(map(str, bad))} (of "
                              f"{len(preds.stages)}) predict{'s' if one else ''} non-finite heatmaps (NaN or "
                              f"infinity){under}; {fix}; nothing was written")


def run_evaluation(model: MultiOutHRNet, e: "EvaluateParams", d: "DataParams", spec: JointSpec, prepared: Path, *,
                   device: "torch.device | str" = "cpu", progress: bool = False, latency_repeats: int = 5,
                   energy: "Optional[EnergyParams]" = None, autocast: "Optional[torch.dtype]" = None,
                   name: str = "the model") -> EvalRun:
    """Predict every stage of `model` (already on `device`) on split `e.split` of `prepared`,
    evaluate each stage and the anytime sweep, and measure each stage's cost; with `energy`,
    the energy of the predictions (all stages: one forward of the whole model per crop);
    `autocast`: the predictions' precision (`okdpose.device.autocast_dtype` of evaluate.precision).
    `name`: the model in messages (its file). A model with non-finite outputs stops with
    CheckpointError before anything is evaluated or written."""
    gt_path = prepared / f"{e.split}_gt.json"
    ds = PoseDataset(prepared, e.split, spec, d.codec, use_gt_bbox=e.use_gt_bbox)
    ground_truth = read_ground_truth(gt_path)     # read once, before the predictions: every stage and the sweep
    # energy off (None): the same call, measured by nothing and recorded nowhere
    with measure_energy(energy or EnergyParams(enabled=False), "inference") as meter:
        preds = inference.predict(model, ds, batch_size=e.batch_size, device=device, flip_test=e.flip_test,
                                  progress=progress, autocast=autocast)
    check_finite(preds, name, autocast)
    record = None
    if energy is not None:
        n = len(ds)
        record = {**meter.record, "images": n, "batch_size": e.batch_size}
        if meter.record.get("status") == "ok":
            record.update(kwh_per_image=meter.per_item(n), g_co2eq_per_image=meter.per_item(n, "g_co2eq"))
    shift = None
    if autocast is not None:     # not traded silently: how far the lower precision moved the keypoints
        ref = inference.predict(model, ds, batch_size=e.batch_size, device=device, flip_test=e.flip_test)
        check_finite(ref, name, None)
        shift = precision_shift(preds, ref)
    options = dict(use_gt_bbox=e.use_gt_bbox, pck_thresholds=e.pck_thresholds, oks_nms=e.oks_nms,
                   oks_thre=e.oks_thre, in_vis_thre=e.in_vis_thre, image_thre=e.image_thre)
    report = evaluate_report(preds, gt_path, spec, ground_truth=ground_truth, **options)
    costs = stage_costs_table(model, d.image_size, repeats=latency_repeats)
    stages = {k: {**m, **costs[k]} for k, m in report.metrics.items()}
    curve: list[dict[str, Any]] = []
    if len(preds.stages) > 1 and model.multi:
        cfg = model.config()
        curve = anytime_curve(
            preds, e.anytime_thresholds, exit_costs(cfg["num_joints"], cfg["width"], cfg["n_stage"], tuple(d.image_size)),
            lambda pr: evaluate_report(pr, gt_path, spec, ground_truth=ground_truth, **options).metrics,
            kind=e.anytime_confidence)
    flags = {"split": e.split, "use_gt_bbox": e.use_gt_bbox, "flip_test": e.flip_test,
             **precision_record(device, autocast, e.precision)}
    if shift is not None:
        flags["precision_shift_px"] = shift
    return EvalRun(ds, preds, report, stages, curve, flags, e.anytime_confidence,
                   energy={"inference": record} if record else None)


# what write_evaluation puts in its results and plots folders (nothing else: they are replaced whole)
OUTPUT_NAMES = {"results": re.compile(r"predictions_stage\d+\.json"),
                "plots": re.compile(r"(stages|per_joint|anytime)\.csv|example_\d+\.png")}


def foreign_files(folder: Path, kind: str) -> list[str]:
    """Entries of `folder` (a results or plots folder, `kind`) that write_evaluation does not
    write, which replacing the folder would delete; [] for a missing folder."""
    if not folder.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                  if p.is_dir() or not OUTPUT_NAMES[kind].fullmatch(p.name))


def write_evaluation(run: EvalRun, *, metrics: Path, results: Path, plots: Path, num_images: int,
                     extra: Optional[dict[str, Any]] = None, headline: Optional[Path] = None) -> None:
    """COCO results per stage (results/), CSV tables and example pictures (plots/), then the
    full JSON document (`metrics`), then its `eval_headline` subset (`headline`, when given)
    last: each exists only for a complete run, a headline never without its report. `extra`:
    more top-level JSON keys of the full document."""
    # both built before either replaces its folder: a failure in the plots leaves the old results too
    with atomic_dir(results) as res_tmp, atomic_dir(plots) as tmp:
        for k, res in run.report.results.items():
            write_json(res_tmp / f"predictions_stage{k}.json", res, indent=None)
        write_csv(tmp / "stages.csv", [{"stage": k, **m} for k, m in run.stages.items()])
        write_csv(tmp / "per_joint.csv", per_joint_rows(run.report, run.dataset.spec))
        if run.anytime:
            write_csv(tmp / "anytime.csv", run.anytime)
        for i, picture in enumerate(pose_examples(run.dataset, run.preds, run.report, num_images)):
            write_png_palette(tmp / f"example_{i}.png", picture)   # palette: ~20 KB each
    doc = {**run.summary(), **(extra or {})}
    write_json(metrics, doc)
    if headline is not None:
        write_json(headline, eval_headline(doc))
