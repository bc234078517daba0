"""Training history as reports: the reports/train.json summary, KD diagnostics, per-epoch tracking
metrics and the plots/train tables; and the headline subsets of the train and eval reports that
DVC compares (metrics/train.json, metrics/eval.json: the columns of `dvc exp show`). History
records key stages by int (1-based); here they become the "stage{k}" names of the written files
and MLflow keys.

A history record (see `okdpose.train.Trainer.fit`): epoch, lr, train {term: mean}, val
{stage: {metric: value}}, score, images, train_seconds, val_seconds, img_per_s.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from okdpose.train import TrainResult

Record = Mapping[str, Any]


def stage_name(stage: int) -> str:
    """The name of 1-based output stage `stage` in files and MLflow keys: 'stage3'."""
    return f"stage{stage}"


def named_stages(by_stage: Mapping[int, Any]) -> dict[str, Any]:
    """{3: x} -> {"stage3": x}."""
    return {stage_name(s): v for s, v in by_stage.items()}


def summarize(result: "TrainResult", select_stages: Sequence[int], couples: Sequence[tuple[int, int]] = (),
              keys: Sequence[str] = ("AP", "AR", "hmPCK50")) -> dict[str, Any]:
    """reports/train.json content: best and final val metrics per stage, and run facts; `couples`
    (1-based (student, teacher) stages of the KL terms) add the `kd` diagnostics."""
    by_epoch = {r["epoch"]: r for r in result.history}
    best, final = by_epoch[result.best_epoch], result.history[-1]
    images = sum(r["images"] for r in result.history)
    seconds = sum(r["train_seconds"] for r in result.history)

    def stages(rec: Record) -> dict[str, Any]:
        return named_stages({s: {k: v[k] for k in keys if k in v} for s, v in rec["val"].items()})

    out = {
        "best": {"epoch": result.best_epoch, "score": result.best_score, **stages(best)},
        "final": {"epoch": final["epoch"], "score": final["score"], **stages(final),
                  "loss": dict(final["train"])},
        "selection": {"metric": "mean val AP", "stages": list(select_stages)},
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from,
        "train_img_per_s": round(images / seconds, 3) if seconds > 0 else None,
        "train_seconds": round(seconds, 1),
    }
    kd = kd_diagnostics(result.history, couples)
    if kd is not None:
        out["kd"] = kd
    return out


def final_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The run-level tracking metrics of a `summarize` result: best/stage{k}/AP, best/epoch, best/score."""
    best = summary["best"]
    return ({f"best/{s}/AP": m["AP"] for s, m in best.items() if isinstance(m, dict)}
            | {"best/epoch": best["epoch"], "best/score": best["score"]})


def kd_diagnostics(history: Sequence[Record], couples: Sequence[tuple[int, int]]) -> Optional[dict[str, float]]:
    """What the distillation did, as numbers `dvc exp show` can compare (None without KL terms).

    kl_share: kl_weight x sum of KL over couples / total loss in the final epoch; kl: the
    unweighted sum of KL over couples in the final epoch (student-teacher disagreement);
    teacher_AP_peak / teacher_AP_final: the last stage's val AP at its best epoch and at the end;
    teacher_lead: final teacher val AP minus the mean val AP of the students in couples.

    Measured on the built-in data (README): a too strong KD weight does not show as a large
    kl_share (the students and the teacher agree, so the KL stays small) but as a tiny `kl`, a
    teacher barely ahead of a much smaller student (small teacher_lead) and a teacher AP below
    the `-S loss.use_kld=false` baseline's; compare against that baseline before trusting KD."""
    final = history[-1]["train"]
    kl_terms = {(s, t): final[f"kl_{s}_{t}"] for s, t in couples if f"kl_{s}_{t}" in final}
    if not kl_terms:
        return None
    total = float(final.get("total", 0.0))
    kl = float(sum(kl_terms.values()))
    share = float(final.get("kl_weight", 0.0)) * kl / total if total > 0 else 0.0

    def ap(stage: int, record: Record) -> float:
        v = float(record["val"][stage]["AP"])
        return v if math.isfinite(v) and v >= 0 else 0.0

    stages = sorted(history[-1]["val"])
    teacher = stages[-1]
    students = sorted({s for s, _ in kl_terms} & set(stages))
    curve = [ap(teacher, r) for r in history]
    lead = curve[-1] - float(np.mean([ap(s, history[-1]) for s in students])) if students else 0.0
    return {"kl_share": round(share, 4), "kl": kl, "teacher_AP_peak": max(curve),
            "teacher_AP_final": curve[-1], "teacher_lead": lead}


def epoch_metrics(record: Record) -> dict[str, float]:
    """One history record as flat tracking metrics: train/<term>, lr, val/stage{k}/<metric>, val/score."""
    out = {f"train/{k}": v for k, v in record["train"].items()}
    out["lr"] = record["lr"]
    out["train/img_per_s"] = record["img_per_s"]
    for stage, metrics in named_stages(record["val"]).items():
        out.update({f"val/{stage}/{k}": v for k, v in metrics.items()})
    out["val/score"] = record["score"]
    return out


def curve_tables(history: Sequence[Record]) -> dict[str, list[dict[str, Any]]]:
    """Per-epoch tables for plots/train/*.csv (fixed column names whatever the couples):

    losses: epoch, total, mse_teacher, mse_students (sum), kl (sum over couples, unweighted),
            kl_weight (consistency x kld_weight), then every term (mse_stage{k}, kl_{s}_{t})
    val_ap: epoch, stage{k} (val AP per output stage), score (selection: mean AP of the KD stages)
    val:    epoch, stage, and every val metric (long form, one row per epoch and stage)
    lr:     epoch, lr
    """
    losses, val_ap, val, lr = [], [], [], []
    for r in history:
        t = r["train"]
        students = sum(v for k, v in t.items() if k.startswith("mse_stage"))
        kl = sum(v for k, v in t.items() if k.startswith("kl_") and k != "kl_weight")
        losses.append({"epoch": r["epoch"], "total": t["total"], "mse_teacher": t["mse_teacher"],
                       "mse_students": students, "kl": kl, "kl_weight": t.get("kl_weight", 0.0),
                       **{k: v for k, v in t.items() if k not in ("total", "mse_teacher", "kl_weight")}})
        named = named_stages(r["val"])
        val_ap.append({"epoch": r["epoch"], **{s: m["AP"] for s, m in named.items()}, "score": r["score"]})
        val += [{"epoch": r["epoch"], "stage": s, **m} for s, m in named.items()]
        lr.append({"epoch": r["epoch"], "lr": r["lr"]})
    return {"losses": losses, "val_ap": val_ap, "val": val, "lr": lr}


# --------------------------------------------------------------------------- headlines (DVC metrics)

_STAGE = re.compile(r"stage\d+")
EVAL_HEADLINE = ("AP", "AR", "hmPCK50", "PCK10", "PCK20", "err_median_px", "gflops", "latency_ms")
EVAL_ENERGY_HEADLINE = ("kwh_per_image", "g_co2eq_per_image", "measured")
TRAIN_ENERGY_HEADLINE = ("kwh", "g_co2eq", "duration_s", "measured")


def _pick(d: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: d[k] for k in keys if k in d}


def _energy_ok(record: Any, keys: Sequence[str]) -> Optional[dict[str, Any]]:
    """The `keys` of an energy record (`okdpose.energy`) whose status is ok, else None."""
    if isinstance(record, Mapping) and record.get("status") == "ok":
        return _pick(record, keys)
    return None


def eval_headline(doc: Mapping[str, Any]) -> dict[str, Any]:
    """metrics/eval.json from the full reports/eval.json document: split, per stage{k} the
    EVAL_HEADLINE numbers, and energy {kwh_per_image, g_co2eq_per_image, measured} of the
    inference when its record is ok (else no energy key). The rest stays in the report."""
    out: dict[str, Any] = _pick(doc, ("split", "precision"))
    out.update({k: _pick(v, EVAL_HEADLINE) for k, v in doc.items() if _STAGE.fullmatch(k) and isinstance(v, Mapping)})
    spent = _energy_ok((doc.get("energy") or {}).get("inference"), EVAL_ENERGY_HEADLINE)
    if spent is not None:
        out["energy"] = spent
    return out


def train_headline(doc: Mapping[str, Any]) -> dict[str, Any]:
    """metrics/train.json from the full reports/train.json document (a trained or a given
    model's): best {epoch, score, stage{k}: {AP}}, kd (as is), train_seconds, train_img_per_s,
    energy {kwh, g_co2eq, duration_s, measured} when its record is ok, and mlflow_run_id (read
    by the later stages: `okdpose.tracking.pipeline_run_id`); each only when the document has it."""
    best = doc["best"]
    out: dict[str, Any] = {"best": {**_pick(best, ("epoch", "score")),
                                    **{k: _pick(v, ("AP",)) for k, v in best.items()
                                       if _STAGE.fullmatch(k) and isinstance(v, Mapping)}}}
    out.update(_pick(doc, ("precision", "kd", "train_seconds", "train_img_per_s")))
    spent = _energy_ok(doc.get("energy"), TRAIN_ENERGY_HEADLINE)
    if spent is not None:
        out["energy"] = spent
    out.update(_pick(doc, ("mlflow_run_id",)))
    return out
