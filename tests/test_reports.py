"""okdpose.reports: int stages become "stage{k}" names; KD diagnostics from the couples; the headlines."""
import pytest

from okdpose.reports import (curve_tables, epoch_metrics, eval_headline, final_metrics, kd_diagnostics, named_stages,
                             train_headline)


def _record(epoch, teacher_ap, total, kl, kl_weight):
    train = {"total": total, "mse_teacher": total / 2, "kl_weight": kl_weight}
    if kl is not None:
        train["kl_3_4"] = kl
    return {"epoch": epoch, "lr": 1e-3, "img_per_s": 2.0, "score": teacher_ap, "train": train,
            "val": {3: {"AP": 0.1}, 4: {"AP": teacher_ap}}}


def test_kd_diagnostics_report_kl_and_the_teacher_lead():
    assert kd_diagnostics([_record(1, 0.5, 1.0, None, 0.0)], ((3, 4),)) is None    # no KL term: nothing to say
    assert kd_diagnostics([_record(1, 0.5, 1.0, 0.1, 1.0)], ()) is None             # no couples
    kd = kd_diagnostics([_record(1, 0.3, 1.0, 0.1, 1.0), _record(2, 0.5, 1.0, 0.1, 2.0)], ((3, 4),))
    assert kd == pytest.approx({"kl_share": 0.2, "kl": 0.1, "teacher_AP_peak": 0.5, "teacher_AP_final": 0.5,
                                "teacher_lead": 0.4})                     # student stage3 at 0.1
    kd = kd_diagnostics([_record(1, 0.4, 1.0, 0.1, 8.0), _record(2, 0.2, 1.0, 0.001, 8.0)], ((3, 4),))
    assert kd["teacher_AP_peak"] == 0.4 and kd["teacher_AP_final"] == 0.2
    assert kd["teacher_lead"] == pytest.approx(0.1) and kd["kl"] == 0.001


def test_files_and_tracking_name_the_stages():
    record = _record(1, 0.5, 1.0, 0.1, 1.0)
    assert named_stages({3: "x", 4: "y"}) == {"stage3": "x", "stage4": "y"}
    metrics = epoch_metrics(record)
    assert metrics["val/stage4/AP"] == 0.5 and metrics["train/kl_3_4"] == 0.1 and metrics["val/score"] == 0.5
    tables = curve_tables([record])
    assert list(tables["val_ap"][0]) == ["epoch", "stage3", "stage4", "score"]
    assert [r["stage"] for r in tables["val"]] == ["stage3", "stage4"]
    assert tables["losses"][0]["kl"] == 0.1 and tables["losses"][0]["mse_students"] == 0
    summary = {"best": {"epoch": 2, "score": 0.4, "stage3": {"AP": 0.1}, "stage4": {"AP": 0.7}}}
    assert final_metrics(summary) == {"best/stage3/AP": 0.1, "best/stage4/AP": 0.7, "best/epoch": 2,
                                      "best/score": 0.4}


def _eval_doc(energy):
    stage = {"AP": 0.5, "AP50": 0.9, "AP75": 0.4, "APm": 0.3, "APl": 0.6, "AR": 0.55, "hmPCK50": 0.7, "PCK10": 0.2,
             "PCK20": 0.6, "err_mean_px": 3.0, "err_median_px": 2.0, "params_M": 1.2, "gflops": 0.8,
             "latency_ms": 4.0}
    doc = {"split": "test", "use_gt_bbox": False, "flip_test": True, "stage1": dict(stage), "stage2": dict(stage),
           "anytime": {"confidence": "max", "curve": [{"threshold": 0.5, "AP": 0.5}]}}
    if energy is not None:
        doc["energy"] = {"inference": energy}
    return doc


def test_eval_headline_keeps_what_people_compare():
    ok = {"status": "ok", "kwh": 1e-4, "g_co2eq": 0.05, "kwh_per_image": 1e-6, "g_co2eq_per_image": 5e-4,
          "measured": True, "images": 100, "mode": {"cpu": "tdp"}}
    head = eval_headline(_eval_doc(ok))
    assert set(head) == {"split", "stage1", "stage2", "energy"} and head["split"] == "test"
    assert list(head["stage2"]) == ["AP", "AR", "hmPCK50", "PCK10", "PCK20", "err_median_px", "gflops", "latency_ms"]
    assert head["energy"] == {"kwh_per_image": 1e-6, "g_co2eq_per_image": 5e-4, "measured": True}
    assert "energy" not in eval_headline(_eval_doc({"status": "off"}))      # off / unavailable: no numbers
    assert "energy" not in eval_headline(_eval_doc(None))
    assert "energy" not in eval_headline({**_eval_doc(None), "energy": {}})
    assert set(eval_headline({"split": "val", "stage3": {"AP": 0.1}})) == {"split", "stage3"}   # no anytime, one stage


def test_train_headline_keeps_best_kd_time_energy_and_run_id():
    kd = {"kl_share": 0.1, "kl": 0.2, "teacher_AP_peak": 0.5, "teacher_AP_final": 0.4, "teacher_lead": 0.1}
    doc = {"best": {"epoch": 3, "score": 0.4, "stage1": {"AP": 0.3, "AR": 0.4, "hmPCK50": 0.5},
                    "stage2": {"AP": 0.5, "AR": 0.6, "hmPCK50": 0.7}},
           "final": {"epoch": 4, "score": 0.3, "loss": {"total": 1.0}}, "selection": {"stages": [1, 2]},
           "epochs_run": 4, "stopped_early": False, "resumed_from_epoch": None, "train_img_per_s": 10.0,
           "train_seconds": 40.0, "kd": kd, "world_size": 1, "threads": 2, "mlflow_run_id": "r1",
           "energy": {"status": "ok", "kwh": 0.01, "g_co2eq": 5.0, "duration_s": 40.0, "measured": False,
                      "mode": {"cpu": "tdp"}}}
    head = train_headline(doc)
    assert head == {"best": {"epoch": 3, "score": 0.4, "stage1": {"AP": 0.3}, "stage2": {"AP": 0.5}}, "kd": kd,
                    "train_seconds": 40.0, "train_img_per_s": 10.0, "mlflow_run_id": "r1",
                    "energy": {"kwh": 0.01, "g_co2eq": 5.0, "duration_s": 40.0, "measured": False}}
    # a given model (okdpose.given_model): no training facts, no KD, tracking off
    given = {"trained": False, "checkpoint": {"kind": "checkpoint"}, "best": {"epoch": 0, "score": 0.2,
             "stage2": {"AP": 0.2, "AR": 0.3}}, "final": {}, "epochs_run": 0, "mlflow_run_id": None,
             "energy": {"status": "unavailable"}}
    assert train_headline(given) == {"best": {"epoch": 0, "score": 0.2, "stage2": {"AP": 0.2}}, "mlflow_run_id": None}
