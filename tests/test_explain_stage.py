import logging
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from okdpose.model import MultiOutHRNet, save_checkpoint

from fakes import FakeTracker

STAGE = Path(__file__).resolve().parents[1] / "stages" / "explain.py"
PARAMS = {"data": {"image_size": [48, 64], "heatmap_size": [12, 16]},       # the tiny prepared crops
          "model": {"width": 4, "n_stage": 3}, "loss": {"kld_couples": [[2, 3]]},
          "explain": {"num_images": 2, "layers": ["stage3.3.branches.2"], "methods": ["eigencam", "gradcam"],
                      "grid_images": 1}}


@pytest.fixture()
def root(tmp_path, tiny_prepared, monkeypatch) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(tiny_prepared)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "models" / "model.pt", MultiOutHRNet(12, 4, 3))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("okdpose.tracking.Tracker", FakeTracker)
    FakeTracker.runs = []
    return tmp_path


def run_stage() -> None:
    runpy.run_path(str(STAGE), run_name="__main__")


def test_stage_writes_pictures_maps_scores_and_logs_to_the_training_run(root, capsys):
    run_stage()                                     # no metrics/train.json yet: nothing logged
    assert "not logged to MLflow" in capsys.readouterr().err and FakeTracker.runs == []
    plots, results = root / "plots" / "explain", root / "results" / "explain"
    npzs = sorted(results.glob("*.npz"))
    overviews = [p for p in sorted(plots.glob("*.png")) if "_stage" not in p.stem]
    assert len(overviews) == len(npzs) == 2 and [p.stem for p in overviews] == [p.stem for p in npzs]
    grids = sorted(plots.glob("*_stage*.png"))             # grid_images 1: the first image's, per stage
    assert [p.stem for p in grids] == [f"{npzs[0].stem}_stage{k}" for k in (1, 2, 3)]
    assert all(p.stat().st_size < 300_000 for p in overviews + grids)
    with np.load(npzs[0]) as z:
        assert z["crop"].shape == (64, 48, 3) and z["crop"].dtype == np.uint8
        for layer in ("feature_taps.0", "intermediate_layers.0", "feature_taps.2", "intermediate_layers.2",
                      "stage3.3.branches.2"):
            assert z[layer].shape == (64, 48) and 0 <= z[layer].min() and z[layer].max() <= 1
        assert z["pred_stage3"].shape == (12, 3) and z["box"].shape == (4,) and z["joints"].shape == (12, 3)
        assert z["stage2_gradcam"].shape == (13, 64, 48)     # 12 joints, then the pose
    m = json.loads((root / "reports" / "explain.json").read_text())
    assert list(m) == ["split", "pointing_radius", "sign", "target_peak", "precision", "precision_asked", "device",
                       "cpu_flags", "stage1", "stage2", "stage3", "extra", "chance", "images", "pointing_images"]
    assert (m["precision"], m["precision_asked"], m["device"]) == ("fp32", "fp32", "cpu")   # fp32: no precision_shift
    assert list(m["stage2"]) == ["eigencam", "gradcam", "eigencam_head"] and list(m["extra"]) == ["stage3.3.branches.2"]
    for scores in (m["stage1"]["eigencam"], m["stage3"]["eigencam_head"], m["extra"]["stage3.3.branches.2"]):
        assert 0 <= scores["energy_in_box"] <= 1
    # (this untrained model's whole-pose GradCAM maps are all zero: not scored, None)
    assert set(m["stage3"]["gradcam"]) == {"energy_in_box", "pointing_game", "joint_pointing_game",
                                           "confidence_change", "joint_confidence_change"}
    assert m["images"] == 2 and 0 < m["chance"]["energy_in_box"] < 1 and m["sign"] == "oriented"
    table = (root / "plots" / "explain_scores" / "stages.csv").read_text().splitlines()
    assert table[0] == "stage,method,energy_in_box,pointing_game,joint_pointing_game,confidence_change"
    assert [r.split(",")[:2] for r in table[1:4]] == [["1", "eigencam"], ["1", "gradcam"], ["1", "chance"]]
    detail = json.loads((results / "scores.json").read_text())
    assert detail["images"] == [p.stem for p in npzs] and len(detail["stage3"]["gradcam"]["joint_pointing_game"]) == 2

    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "train.json").write_text(json.dumps({"mlflow_run_id": "abc123"}))
    run_stage()                                     # same seed: the same images
    assert sorted(p.stem for p in (root / "plots" / "explain").glob("*.png")) == sorted(p.stem for p in overviews + grids)
    (run,) = FakeTracker.runs
    assert run.id == "abc123"
    assert run.metrics["explain.stage3.eigencam_head.energy_in_box"] == m["stage3"]["eigencam_head"]["energy_in_box"]
    assert run.metrics["explain.stage2.gradcam.joint_pointing_game"] == m["stage2"]["gradcam"]["joint_pointing_game"]
    assert run.artifacts == [("plots/explain", "explain"), ("plots/explain_scores", "explain"),
                             ("reports/explain.json", "explain")]


@pytest.mark.parametrize("change, words", [
    ("no model", ["models/model.pt", "dvc repro train-okd"]),
    ({"model": {"width": 8, "n_stage": 3}}, ["models/model.pt", "'width': 4", "'width': 8", "dvc repro train-okd"]),
    ({"explain": {"layers": ["stage3.9"]}}, ["'stage3.9'", "feature_taps.0", "stage3.3.branches.2"]),
])
def test_stage_errors_name_the_fix(root, change, words):
    if change == "no model":
        (root / "models" / "model.pt").unlink()
    else:
        (root / "params.yaml").write_text(yaml.safe_dump({**PARAMS, **change}))
    with pytest.raises(SystemExit) as err:
        run_stage()
    for w in words:
        assert w in str(err.value)
    assert not (root / "reports" / "explain.json").exists()


def test_stage_runs_on_the_resolved_device_and_says_so(root, monkeypatch, caplog):
    import okdpose.device

    asked, moved, real_resolve, real_to = [], [], okdpose.device.resolve_device, MultiOutHRNet.to
    monkeypatch.setattr(okdpose.device, "resolve_device", lambda d, key: asked.append((d, key)) or real_resolve(d, key))
    monkeypatch.setattr(MultiOutHRNet, "to", lambda self, *a, **k: moved.append(a[0]) or real_to(self, *a, **k))
    with caplog.at_level(logging.INFO):
        run_stage()
    assert asked == [("auto", "explain.device")]
    assert moved and set(map(torch.device, moved)) == {torch.device("cpu")}     # the model and its per-stage copies
    assert "explain: device cpu (" in caplog.text and "precision fp32" in caplog.text


def test_cuda_without_gpu_stops_naming_the_param(root, monkeypatch):
    (root / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "explain": {**PARAMS["explain"], "device": "cuda"}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="explain.device is 'cuda' but torch sees no GPU"):
        run_stage()


def test_bf16_is_recorded_with_how_far_it_moved_maps_and_joints_and_fp16_on_cpu_is_refused(root, caplog):
    (root / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "explain": {**PARAMS["explain"], "precision": "bf16"}}))
    with caplog.at_level(logging.INFO):
        run_stage()
    assert "precision bf16 autocast" in caplog.text
    m = json.loads((root / "reports" / "explain.json").read_text())
    assert (m["precision"], m["precision_asked"]) == ("bf16", "bf16")
    shift = m["precision_shift"]
    assert set(shift["maps"]) == {"stage1/feature", "stage1/head", "stage2/feature", "stage2/head", "stage3/feature",
                                  "stage3/head", "extra/stage3.3.branches.2"}
    assert all(0 <= d["mean_abs"] <= d["max_abs"] <= 1 for d in shift["maps"].values())
    assert set(shift["keypoints_px"]) == {"stage1", "stage2", "stage3"}
    assert all(0 <= d["mean"] <= d["max"] < 64 for d in shift["keypoints_px"].values())
    assert set(m["stage3"]["gradcam"]) == {"energy_in_box", "pointing_game", "joint_pointing_game",   # bf16 too
                                           "confidence_change", "joint_confidence_change"}

    (root / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "explain": {**PARAMS["explain"], "precision": "fp16"}}))
    with pytest.raises(SystemExit, match="explain.precision is fp16, which runs on CUDA only"):
        run_stage()
