import json
import runpy
from pathlib import Path

import pytest
import torch
import yaml

from okdpose.files import sha256_file
from okdpose.model import MultiOutHRNet, load_model, save_checkpoint

STAGE = Path(__file__).resolve().parents[1] / "stages" / "pretrain_load.py"
SMALL = {"data": {"image_size": [32, 64], "heatmap_size": [8, 16]}, "model": {"width": 4, "n_stage": 3},
         "loss": {"kld_couples": [[2, 3]]}}


def run_stage(root: Path, monkeypatch, **model) -> dict:
    params = {**SMALL, "model": {**SMALL["model"], **model}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(root)
    runpy.run_path(str(STAGE), run_name="__main__")
    return json.loads((root / "reports" / "pretrain.json").read_text())


def test_from_scratch_says_so_and_writes_init_and_metrics(tmp_path, monkeypatch, capsys):
    metrics = run_stage(tmp_path, monkeypatch)
    assert "from scratch" in capsys.readouterr().out
    model, ckpt = load_model(tmp_path / "models" / "init.pt")
    assert model.config() == {"num_joints": 12, "width": 4, "n_stage": 3, "multi": True}
    assert metrics["source"] == {"path": None, "sha256": None, "kind": "scratch"}
    assert metrics["keys"]["missing"] == len(model.state_dict()) and metrics["keys"]["loaded"] == 0
    assert list(metrics["per_stage_output"]) == ["stage1", "stage2", "stage3"]
    assert metrics["per_stage_output"]["stage3"]["gflops"] <= metrics["gflops"]
    assert ckpt["source"]["kind"] == "scratch"
    torch.manual_seed(0)                # train.seed 0: the HRNet init draws from torch's RNG only
    ref = MultiOutHRNet(12, 4, 3)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


def test_configured_checkpoint_is_loaded_and_fingerprinted(tmp_path, monkeypatch):
    src = MultiOutHRNet(17, 4, 4, multi=False)
    (tmp_path / "pretrained").mkdir()
    torch.save(src.state_dict(), tmp_path / "pretrained" / "pose.pth")
    metrics = run_stage(tmp_path, monkeypatch, pretrained="pretrained/pose.pth")
    assert metrics["source"]["sha256"] == sha256_file(tmp_path / "pretrained" / "pose.pth")
    assert metrics["keys"]["missing"] == 6 and metrics["keys"]["skipped"] > 0    # 3 fresh heads
    model, _ = load_model(tmp_path / "models" / "init.pt")
    torch.testing.assert_close(model.stage3[0].branches[0][0].conv1.weight, src.stage3[0].branches[0][0].conv1.weight)


def test_bad_checkpoint_stops_the_stage_with_the_reason(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "other.pt", MultiOutHRNet(12, 8, 3))
    with pytest.raises(SystemExit) as err:
        run_stage(tmp_path, monkeypatch, pretrained="other.pt")
    assert "model.width: 8" in str(err.value)
    assert not (tmp_path / "models" / "init.pt").exists()
