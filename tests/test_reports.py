"""okdpose.reports: int stages become "stage{k}" names; KD diagnostics from the couples."""
import pytest

from okdpose.reports import curve_tables, epoch_metrics, final_metrics, kd_diagnostics, named_stages


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
