import contextlib
import csv
import io
import json
import logging
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from okdpose.evaluation import METRIC_KEYS
from okdpose.joints import BABYPOSE12
from okdpose.model import MultiOutHRNet, save_checkpoint
from okdpose.reports import eval_headline

STAGE = Path(__file__).resolve().parents[1] / "stages" / "evaluate.py"
DVC_ENV = ("OKDPOSE_TRACKING", "MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE", "DVC_EXP_BASELINE_REV")
COST_KEYS = ("params_M", "gflops", "latency_ms")


def setup_root(root: Path, prepared: Path, *, multi=True, n_stage=2, tracking=False, save_model=True, **evaluate):
    params = {"data": {"image_size": [48, 64], "heatmap_size": [12, 16], "sigma": 1.0},
              "model": {"width": 4, "n_stage": n_stage, "multi": multi},
              "loss": {"kld_couples": [[1, n_stage]], "use_kld": multi},
              "evaluate": {"batch_size": 2, "num_images": 2, **evaluate},
              "tracking": {"enabled": tracking}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data").mkdir()
    (root / "data" / "prepared").symlink_to(prepared)
    if save_model:
        torch.manual_seed(0)
        save_checkpoint(root / "models" / "model.pt", MultiOutHRNet(BABYPOSE12.num_joints, 4, n_stage, multi))


def run_stage(root: Path, monkeypatch) -> dict:
    for name in DVC_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(root)
    runpy.run_path(str(STAGE), run_name="__main__")
    report = json.loads((root / "reports" / "eval.json").read_text())
    assert json.loads((root / "metrics" / "eval.json").read_text()) == eval_headline(report)
    return report


def direct_pycocotools_ap(gt_path: Path, results_path: Path) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(str(results_path)), "keypoints")
        ev.params.kpt_oks_sigmas = np.array([.62, .72, .79, .79, .72, .62, .89, .87, 1.07, 1.07, .87, .89]) / 10.0
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_stage_writes_every_output_and_its_ap_is_pycocotools(tmp_path, tiny_prepared, monkeypatch, capsys):
    import okdpose.inference as inference

    real_predict = inference.predict

    def near_ground_truth(model, dataset, **kw):
        """The untrained model's scores, keypoints = ground truth + noise growing per row and stage,
        so that AP is neither 0 nor 1 and depends on the ranking."""
        preds = real_predict(model, dataset, **kw)
        gt = dataset.records.joints[preds.indices, :, :2]
        rng = np.random.default_rng(0)
        spread = 4.0 * (1 + np.arange(len(preds)))[None, :, None, None] * (3 - np.arange(2))[:, None, None, None]
        preds.coords[:] = gt[None] + rng.normal(size=preds.coords.shape) * spread
        return preds

    monkeypatch.setattr(inference, "predict", near_ground_truth)
    setup_root(tmp_path, tiny_prepared)
    metrics = run_stage(tmp_path, monkeypatch)
    assert "not logged to MLflow (tracking is off)" in capsys.readouterr().err
    assert {k: metrics[k] for k in ("split", "use_gt_bbox", "flip_test")} == \
        {"split": "test", "use_gt_bbox": True, "flip_test": False}
    assert [k for k in metrics if k.startswith("stage")] == ["stage1", "stage2"]
    for name in ("stage1", "stage2"):
        assert tuple(metrics[name]) == METRIC_KEYS + COST_KEYS
        saved = tmp_path / "results" / "eval" / f"predictions_{name}.json"
        # the AP the stage reports is pycocotools' on the file it saved (and predictions cover the split)
        assert 0.0 < metrics[name]["AP"] < 1.0
        assert metrics[name]["AP"] == pytest.approx(direct_pycocotools_ap(tiny_prepared / "test_gt.json", saved), abs=1e-12)
        assert len(json.loads(saved.read_text())) == len(json.loads((tiny_prepared / "test_gt.json").read_text())["images"])
    assert metrics["stage1"]["gflops"] < metrics["stage2"]["gflops"]
    assert metrics["stage1"]["params_M"] < metrics["stage2"]["params_M"]
    # the anytime sweep: tau = 0 is the first stage, tau = inf the teacher, exactly
    anytime = metrics["anytime"]
    assert anytime["confidence"] == "mean_max" and anytime["curve"][0]["threshold"] == 0.0
    assert anytime["curve"][0]["AP"] == metrics["stage1"]["AP"] != metrics["stage2"]["AP"]
    assert anytime["curve"][-1]["threshold"] == "inf" and anytime["curve"][-1]["AP"] == metrics["stage2"]["AP"]
    plots = tmp_path / "plots" / "eval"
    with open(plots / "anytime.csv") as f:
        assert len(list(csv.DictReader(f))) == len(anytime["curve"])
    with open(plots / "stages.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["1", "2"] and float(rows[1]["AP"]) == pytest.approx(metrics["stage2"]["AP"])
    with open(plots / "per_joint.csv") as f:
        joints = list(csv.DictReader(f))
    assert len(joints) == 2 * BABYPOSE12.num_joints and joints[0]["joint"] == "right_hand"
    pngs = sorted(plots.glob("*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size < 300_000 for p in pngs)


def test_single_output_model_detection_boxes_and_flip_test(tmp_path, tiny_prepared, monkeypatch):
    setup_root(tmp_path, tiny_prepared, multi=False, n_stage=2, use_gt_bbox=False, flip_test=True, num_images=0)
    metrics = run_stage(tmp_path, monkeypatch)
    assert [k for k in metrics if k.startswith("stage")] == ["stage2"]
    assert metrics["use_gt_bbox"] is False and metrics["flip_test"] is True
    assert "anytime" not in metrics                    # one output: nothing to exit early from
    assert sorted(p.name for p in (tmp_path / "results" / "eval").iterdir()) == ["predictions_stage2.json"]
    assert not list((tmp_path / "plots" / "eval").glob("*.png"))


def test_missing_or_mismatched_model_says_what_to_run(tmp_path, tiny_prepared, monkeypatch):
    setup_root(tmp_path, tiny_prepared, save_model=False)
    with pytest.raises(SystemExit) as err:
        run_stage(tmp_path, monkeypatch)
    assert "models/model.pt" in str(err.value) and "dvc repro train-okd" in str(err.value)
    save_checkpoint(tmp_path / "models" / "model.pt", MultiOutHRNet(BABYPOSE12.num_joints, 4, 3))
    with pytest.raises(SystemExit) as err:
        run_stage(tmp_path, monkeypatch)
    assert "'n_stage': 3" in str(err.value) and "dvc repro train-okd" in str(err.value)
    assert not (tmp_path / "metrics" / "eval.json").exists() and not (tmp_path / "reports" / "eval.json").exists()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")     # the decoding of the inf heatmaps
def test_damaged_ground_truth_or_non_finite_heatmaps_stop_before_any_output(tmp_path, tiny_prepared, monkeypatch):
    import shutil

    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, prepared)
    root = tmp_path / "root"
    root.mkdir()
    setup_root(root, prepared)
    (prepared / "test_gt.json").write_text("")
    with pytest.raises(SystemExit) as err:
        run_stage(root, monkeypatch)
    assert "test_gt.json" in str(err.value) and "re-run preprocess (dvc repro preprocess)" in str(err.value)
    shutil.copy(tiny_prepared / "test_gt.json", prepared / "test_gt.json")
    torch.manual_seed(0)
    model = MultiOutHRNet(BABYPOSE12.num_joints, 4, 2)
    with torch.no_grad():                # finite weights whose stage-2 heatmaps overflow float32
        for name, m in model.named_modules():
            if name.startswith("stage2") and isinstance(m, torch.nn.BatchNorm2d):
                m.bias.fill_(1.0)
        model.intermediate_layers["1"].weight.fill_(3e38)
    save_checkpoint(root / "models" / "model.pt", model)
    with pytest.raises(SystemExit) as err:
        run_stage(root, monkeypatch)
    assert "models/model.pt: output stage 2 (of 2)" in str(err.value) and "non-finite" in str(err.value)
    assert not any((root / d).exists() for d in ("results", "plots", "reports", "metrics"))


def test_logs_into_the_training_run(tmp_path, tiny_prepared, monkeypatch):
    from okdpose.tracking import Tracker

    setup_root(tmp_path, tiny_prepared, tracking=True, num_images=1)
    for name in DVC_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    with Tracker(root=tmp_path).run() as run:          # what train-okd does
        run_id = run.id
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "train.json").write_text(json.dumps({"mlflow_run_id": run_id}))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(STAGE), run_name="__main__")
    metrics = json.loads((tmp_path / "reports" / "eval.json").read_text())

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.metrics["eval.test.stage2.AP"] == pytest.approx(metrics["stage2"]["AP"])
    assert logged.data.metrics["eval.test.stage1.latency_ms"] == pytest.approx(metrics["stage1"]["latency_ms"])
    assert logged.data.tags["eval.split"] == "test"
    names = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/metrics", "eval/reports", "eval/plots", "eval/results"} <= names
    assert len(client.search_runs([logged.info.experiment_id])) == 1     # no new run


def test_tracking_enabled_without_a_training_run_starts_no_run(tmp_path, tiny_prepared, monkeypatch, capsys):
    setup_root(tmp_path, tiny_prepared, tracking=True, num_images=0)
    run_stage(tmp_path, monkeypatch)
    assert "no mlflow_run_id" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_runs_on_the_resolved_device_and_says_so(tmp_path, tiny_prepared, monkeypatch, caplog):
    import okdpose.device

    setup_root(tmp_path, tiny_prepared, num_images=0, device="cpu")
    asked, moved, real_resolve, real_to = [], [], okdpose.device.resolve_device, MultiOutHRNet.to
    monkeypatch.setattr(okdpose.device, "resolve_device", lambda d, key: asked.append((d, key)) or real_resolve(d, key))
    monkeypatch.setattr(MultiOutHRNet, "to", lambda self, *a, **k: moved.append(a[0] if a else None)
                        or real_to(self, *a, **k))
    with caplog.at_level(logging.INFO):
        run_stage(tmp_path, monkeypatch)
    assert asked == [("cpu", "evaluate.device")] and moved[0] == torch.device("cpu")
    assert "evaluate: device cpu (" in caplog.text and "precision fp32, memory format channels-last" in caplog.text


def test_cuda_without_gpu_stops_naming_the_param(tmp_path, tiny_prepared, monkeypatch):
    setup_root(tmp_path, tiny_prepared, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="evaluate.device is 'cuda' but torch sees no GPU"):
        run_stage(tmp_path, monkeypatch)


def test_bf16_evaluation_says_how_far_it_moved_the_keypoints(tmp_path, tiny_prepared, monkeypatch):
    # bf16 runs on any CPU (emulated where it has no bf16 units); fp32 is the default and records no shift
    setup_root(tmp_path, tiny_prepared, precision="bf16")
    report = run_stage(tmp_path, monkeypatch)
    assert report["precision"] == "bf16" and report["precision_asked"] == "bf16"
    assert json.loads((tmp_path / "metrics" / "eval.json").read_text())["precision"] == "bf16"
    shift = report["precision_shift_px"]
    assert set(shift) == {"stage1", "stage2"}
    for s in shift.values():
        assert 0 <= s["mean_px"] <= s["max_px"] and 0 <= s["moved"] <= 1
    fp32 = tmp_path / "fp32"
    fp32.mkdir()
    setup_root(fp32, tiny_prepared)
    report = run_stage(fp32, monkeypatch)
    assert report["precision"] == "fp32" and "precision_shift_px" not in report


def test_fp16_on_the_cpu_is_refused_naming_the_param(tmp_path, tiny_prepared, monkeypatch):
    setup_root(tmp_path, tiny_prepared, precision="fp16")
    with pytest.raises(SystemExit) as e:
        run_stage(tmp_path, monkeypatch)
    assert "evaluate.precision is fp16, which runs on CUDA only" in str(e.value)
