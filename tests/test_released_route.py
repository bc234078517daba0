"""A released checkpoint through the pipeline (`model.checkpoint`: pretrain-load -> train-okd without
training -> evaluate) and through `okdpose evaluate --checkpoint`, with the original's outputs."""
import json
import runpy
from pathlib import Path

import pytest
import torch
import yaml

from okdpose.model import load_model
from okdpose.params import ParamsError, params_from_dict
from okdpose.reports import eval_headline, train_headline

from original_hrnet import MultiOutPoseHrnet, randomize

ROOT = Path(__file__).resolve().parents[1]
J, WIDTH, N_STAGE = 12, 4, 2
PARAMS = {
    "data": {"image_size": [48, 64], "heatmap_size": [12, 16]},
    "model": {"width": WIDTH, "n_stage": N_STAGE, "checkpoint": "pretrained/released.pth"},
    "loss": {"kld_couples": [[1, 2]]},
    "train": {"batch_size": 2},
    "evaluate": {"batch_size": 2, "num_images": 1, "anytime_thresholds": [0.5]},
    "explain": {"num_images": 2},
    "export": {"stages": [2], "formats": ["onnx"], "verify_samples": 2, "latency_repeats": 1},
    "tracking": {"enabled": False},
}
ENV = ("OKDPOSE_TRACKING", "MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE", "DVC_EXP_BASELINE_REV")


def released(path: Path) -> MultiOutPoseHrnet:
    """An original OKD-HRNet training checkpoint: DataParallel prefix, dict with optimizer and epoch."""
    model = randomize(MultiOutPoseHrnet(J, WIDTH, N_STAGE), seed=5).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 60, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": []}, "perf": 0.7}, path)
    return model


def run(stage: str, root: Path, monkeypatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(root)
    runpy.run_path(str(ROOT / "stages" / f"{stage}.py"), run_name="__main__")


def test_model_checkpoint_is_evaluated_as_released_without_training(tmp_path, tiny_prepared, monkeypatch, capsys):
    original = released(tmp_path / "pretrained" / "released.pth")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(tiny_prepared)
    run("pretrain_load", tmp_path, monkeypatch)
    out = capsys.readouterr().out
    assert "taken as trained" in out and "`module.` prefix" in out
    (tmp_path / "reports" / "data.json").write_text("{}\n")
    run("train_okd", tmp_path, monkeypatch)
    assert "(no training)" in capsys.readouterr().out
    train = json.loads((tmp_path / "reports" / "train.json").read_text())
    assert json.loads((tmp_path / "metrics" / "train.json").read_text()) == train_headline(train)
    assert train["trained"] is False and train["epochs_run"] == 0
    assert train["checkpoint"]["kind"] == "checkpoint" and train["checkpoint"]["architecture"]["n_stage"] == N_STAGE
    assert set(train["best"]) >= {"epoch", "score", "stage1", "stage2"}
    model, _ = load_model(tmp_path / "models" / "model.pt")
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        ours, ref = model.eval()(x), original(x)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)
    run("evaluate", tmp_path, monkeypatch)
    metrics = json.loads((tmp_path / "reports" / "eval.json").read_text())
    assert {"stage1", "stage2", "anytime"} <= set(metrics)
    assert json.loads((tmp_path / "metrics" / "eval.json").read_text()) == eval_headline(metrics)
    run("explain", tmp_path, monkeypatch)                    # explain and export run on it unchanged
    assert {"stage1", "stage2"} <= set(json.loads((tmp_path / "reports" / "explain.json").read_text()))
    run("export", tmp_path, monkeypatch)
    exported = json.loads((tmp_path / "reports" / "export.json").read_text())
    assert "stage2" in exported and (tmp_path / "models" / "export" / "stage2.onnx").is_file()


def test_pretrained_and_checkpoint_together_are_refused():
    with pytest.raises(ParamsError, match="model.pretrained and model.checkpoint are both set"):
        params_from_dict({**PARAMS, "model": {**PARAMS["model"], "pretrained": "pretrained/x.pth"}})


def test_a_checkpoint_of_another_model_names_the_params_to_change(tmp_path, monkeypatch):
    released(tmp_path / "pretrained" / "released.pth")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "model": {**PARAMS["model"], "width": 8}}))
    with pytest.raises(SystemExit) as err:
        run("pretrain_load", tmp_path, monkeypatch)
    assert "model.width" in str(err.value) and "released.pth" in str(err.value)
    assert not (tmp_path / "models" / "init.pt").exists()


def test_the_command_infers_the_model_from_the_file(tmp_path, tiny_prepared, monkeypatch, capsys):
    from okdpose import cli

    released(tmp_path / "released.pth")
    params = {k: v for k, v in PARAMS.items() if k != "model"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    code = cli.main(["evaluate", "--checkpoint", "released.pth", "--prepared", str(tiny_prepared),
                     "--out", "out"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"HRNet-W{WIDTH}, {N_STAGE} stages" in captured.out
    metrics = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert {"stage1", "stage2", "anytime", "checkpoint"} <= set(metrics)
    assert metrics["checkpoint"]["model"]["n_stage"] == N_STAGE
    assert sorted(p.name for p in (tmp_path / "out" / "results").iterdir()) == \
        ["predictions_stage1.json", "predictions_stage2.json"]
    # a file that is not a checkpoint: a message and exit status 2, no traceback
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert cli.main(["evaluate", "--checkpoint", "junk.pth", "--prepared", str(tiny_prepared)]) == 2
    assert "junk.pth" in capsys.readouterr().err


def test_explain_and_export_take_a_released_file(tmp_path, tiny_raw, tiny_prepared, monkeypatch, capsys):
    from okdpose import cli
    from okdpose.export import read_meta

    released(tmp_path / "released.pth")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({k: v for k, v in PARAMS.items() if k != "model"}))
    monkeypatch.chdir(tmp_path)
    frame = sorted((tiny_raw / "images" / "test").glob("*.png"))[0]
    assert cli.main(["explain", str(frame), "--model", "released.pth", "--all-stages", "--method", "gradcam",
                     "--joint", "right_hand", "--out", "cam.png"]) == 0, capsys.readouterr().err
    assert (tmp_path / "cam.png").stat().st_size > 0
    assert cli.main(["export", "--model", "released.pth", "--stage", "1", "--formats", "onnx", "--out", "deploy",
                     "--data", str(tiny_prepared), "--eval-metrics", "none.json"]) == 0, capsys.readouterr().err
    meta = read_meta(tmp_path / "deploy" / "stage1.onnx")
    assert meta.stage == 1 and meta.width == WIDTH and meta.num_joints == J
