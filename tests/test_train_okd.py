"""stages/train_okd.py end to end on the tiny data: outputs, kill-and-resume, tracking, dvc.yaml."""
import csv
import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from okdpose.model import MultiOutHRNet, load_model, save_checkpoint
from okdpose.reports import train_headline

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "stages" / "train_okd.py"
TINY = {
    "data": {"image_size": [48, 64], "heatmap_size": [12, 16]},
    "model": {"width": 4, "n_stage": 2},
    "loss": {"kld_couples": [[1, 2]], "kld_weight": 0.5, "rampup_epochs": 0.0},
    "train": {"epochs": 2, "batch_size": 2, "lr_steps": [1], "seed": 3},
    "tracking": {"enabled": False},
}
ENV = ("OKDPOSE_TRACKING", "MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE", "DVC_EXP_BASELINE_REV")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def project(root: Path, prepared: Path, **sections) -> Path:
    """A stage working folder: params.yaml, data/prepared (link to the tiny data), models/init.pt."""
    params = {k: {**v, **sections.get(k, {})} for k, v in TINY.items()}
    (root / "data").mkdir(parents=True)
    (root / "data" / "prepared").symlink_to(prepared)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    torch.manual_seed(0)
    m = params["model"]
    save_checkpoint(root / "models" / "init.pt", MultiOutHRNet(12, m["width"], m["n_stage"]))
    (root / "reports").mkdir()
    (root / "reports" / "data.json").write_text('{"total": {}}\n')
    return root


def run_stage(root: Path, monkeypatch) -> dict:
    """Run the stage in `root` -> its full report (reports/train.json), checked against its headline."""
    monkeypatch.chdir(root)
    runpy.run_path(str(STAGE), run_name="__main__")
    report = json.loads((root / "reports" / "train.json").read_text())
    assert json.loads((root / "metrics" / "train.json").read_text()) == train_headline(report)
    return report


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_stage_trains_and_writes_every_output(tiny_prepared, tmp_path, monkeypatch):
    root = project(tmp_path, tiny_prepared)
    m = run_stage(root, monkeypatch)
    assert m["mlflow_run_id"] is None and m["epochs_run"] == 2 and m["resumed_from_epoch"] is None
    assert m["world_size"] == 1
    assert m["selection"] == {"metric": "mean val AP", "stages": [1, 2]}
    assert set(m["best"]) == {"epoch", "score", "stage1", "stage2"}
    assert set(m["final"]["stage2"]) == {"AP", "AR", "hmPCK50"} and m["final"]["epoch"] == 2
    assert m["train_img_per_s"] > 0 and {"total", "kl_1_2"} <= set(m["final"]["loss"])
    model, ckpt = load_model(root / "models" / "model.pt")
    assert model.config() == {"num_joints": 12, "width": 4, "n_stage": 2, "multi": True}
    assert ckpt["epoch"] == m["best"]["epoch"] and ckpt["params"]["loss"]["kld_weight"] == 0.5
    assert len(ckpt["fingerprint"]) == 64
    last = torch.load(root / "models" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["fingerprint"] == ckpt["fingerprint"]
    assert last["fingerprint_parts"]["params"]["loss.kld_weight"] == 0.5
    assert "train.device" not in last["fingerprint_parts"]["params"]
    plots = root / "plots" / "train"
    assert sorted(p.name for p in plots.iterdir()) == ["losses.csv", "lr.csv", "val.csv", "val_ap.csv"]
    ap = read_csv(plots / "val_ap.csv")
    assert [r["epoch"] for r in ap] == ["1", "2"] and set(ap[0]) == {"epoch", "stage1", "stage2", "score"}
    assert float(read_csv(plots / "losses.csv")[0]["kl_weight"]) == 0.5


def test_nproc_per_node_relaunches_the_stage_through_torch_distributed_run(tiny_prepared, tmp_path, monkeypatch,
                                                                           fake_launcher):
    import okdpose.distributed as distributed

    root = project(tmp_path, tiny_prepared, train={"nproc_per_node": 2})
    calls = fake_launcher(0)
    with pytest.raises(SystemExit) as done:
        run_stage(root, monkeypatch)
    assert done.value.code == 0          # the launcher's exit code
    assert calls == [distributed.launch_command(2, STAGE)]
    assert not (root / "models" / "last.pt").exists()        # this process trained nothing itself


@pytest.mark.slow
def test_dvc_repro_trains_as_two_processes_and_then_is_up_to_date(tmp_path):
    from test_e2e import build_pipeline_repo, dvc_json, sh, stages_in

    # up to train-okd: the stages after it are the single-process ones test_e2e.py runs
    repo = build_pipeline_repo(tmp_path / "okdpose", {"train.nproc_per_node": 2, "train.channels_last": True,
                                                      "tracking.enabled": False}, target="train-okd")
    log = (tmp_path / "repro.log").read_text()
    assert "train-okd" in stages_in(log)[0] and "starting 2 processes" in log, log
    assert "rank 0 of 2 (gloo" in log and "rank 1 of 2 (gloo" in log, log
    assert "Grad strides do not match bucket view strides" not in log, log    # channels-last before the wrap
    train = json.loads((repo / "reports" / "train.json").read_text())
    assert train["world_size"] == 2 and train["epochs_run"] == 2 and train["resumed_from_epoch"] is None
    assert torch.load(repo / "models" / "last.pt", weights_only=True)["world_size"] == 2
    again = sh(repo, "dvc", "repro", "train-okd")
    assert stages_in(again.stdout)[0] == set() and dvc_json(repo, "status", "train-okd") == {}, again.stdout


def test_changed_params_start_fresh_and_bad_init_names_the_fix(tiny_prepared, tmp_path, monkeypatch, caplog):
    root = project(tmp_path, tiny_prepared, train={"epochs": 1})
    run_stage(root, monkeypatch)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["loss"]["kld_weight"] = 0.25
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with caplog.at_level(logging.INFO, logger="okdpose.train"):
        m = run_stage(root, monkeypatch)
    assert m["resumed_from_epoch"] is None
    assert "loss.kld_weight: 0.5 -> 0.25" in caplog.text and "starting fresh" in caplog.text
    params["model"]["width"] = 6
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as err:
        run_stage(root, monkeypatch)
    assert "models/init.pt" in str(err.value) and "dvc repro pretrain-load" in str(err.value)


KILLER = textwrap.dedent("""
    # run the stage, SIGKILL itself after optimiser step {step} of epoch {epoch} (mid-epoch)
    import os, runpy, signal, sys
    import okdpose.train as t
    init = t.Trainer.__post_init__
    def post_init(self):
        init(self)
        def kill(epoch, step):
            if (epoch, step) == ({epoch}, {step}):
                os.kill(os.getpid(), signal.SIGKILL)
        self.on_step = kill
    t.Trainer.__post_init__ = post_init
    runpy.run_path(sys.argv[1], run_name="__main__")
""")


@pytest.mark.slow
def test_killed_mid_epoch_resumes_to_the_uninterrupted_result(tiny_prepared, tmp_path, monkeypatch, caplog):
    # augmentation on: the resumed run must also restore the RNG that draws flips/rotations
    aug = {"data": {"augment": {"flip": True, "rotation": 30.0, "scale": 0.25}}}
    a = project(tmp_path / "a", tiny_prepared, **aug)     # uninterrupted (in this process, one thread)
    b = project(tmp_path / "b", tiny_prepared, **aug)     # SIGKILLed at epoch 2 step 1 in a subprocess, then resumed
    (tmp_path / "killer.py").write_text(KILLER.format(epoch=2, step=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OKDPOSE_TRACKING": "0"}
    killed = subprocess.Popen([sys.executable, str(tmp_path / "killer.py"), str(STAGE)], cwd=b, env=env,
                              stderr=subprocess.PIPE, text=True)
    ma = run_stage(a, monkeypatch)
    err = killed.communicate(timeout=300)[1]
    assert killed.returncode == -signal.SIGKILL, err
    assert torch.load(b / "models" / "last.pt", weights_only=True)["epoch"] == 1
    assert not (b / "metrics" / "train.json").exists() and not (b / "reports" / "train.json").exists()
    (b / "models" / "model.pt").unlink()          # as DVC does before re-running the stage
    with caplog.at_level(logging.INFO, logger="okdpose.train"):
        mb = run_stage(b, monkeypatch)
    assert "resuming from models/last.pt: epoch 1/2 done" in caplog.text

    assert mb["resumed_from_epoch"] == 1 and ma["resumed_from_epoch"] is None
    for key in ("best", "final", "epochs_run", "selection"):
        assert ma[key] == mb[key], key
    for name in ("model.pt", "last.pt"):
        sa, sb = (torch.load(d / "models" / name, weights_only=True) for d in (a, b))
        weights = "state_dict" if name == "model.pt" else "model"
        assert sa[weights].keys() == sb[weights].keys()
        for k in sa[weights]:
            assert torch.equal(sa[weights][k], sb[weights][k]), f"{name}: {k}"
    la, lb = (torch.load(d / "models" / "last.pt", weights_only=True) for d in (a, b))
    strip = ("train_seconds", "val_seconds", "img_per_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in la["history"]] == \
           [{k: v for k, v in r.items() if k not in strip} for r in lb["history"]]
    assert torch.equal(la["rng"]["torch"], lb["rng"]["torch"])
    assert read_csv(a / "plots" / "train" / "val_ap.csv") == read_csv(b / "plots" / "train" / "val_ap.csv")


@pytest.mark.slow
def test_tracking_logs_params_metrics_artifacts_and_run_id(tiny_prepared, tmp_path, monkeypatch):
    root = project(tmp_path / "repo", tiny_prepared, train={"epochs": 1}, tracking={"enabled": True})
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("DVC_EXP_NAME", "tiny-exp")
    m = run_stage(root, monkeypatch)
    assert m["mlflow_run_id"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(m["mlflow_run_id"])
    assert run.info.run_name == "tiny-exp" and run.info.status == "FINISHED"
    assert run.data.params["loss.kld_weight"] == "0.5" and run.data.params["model.width"] == "4"
    assert run.data.tags["dvc.exp_name"] == "tiny-exp"
    assert {"train/total", "train/kl_1_2", "lr", "val/stage1/AP", "val/stage2/AP", "val/score",
            "best/score"} <= set(run.data.metrics)
    assert run.data.metrics["val/stage2/AP"] == pytest.approx(m["final"]["stage2"]["AP"])
    names = {a.path for top in ("metrics", "reports", "models", "plots/train")
             for a in client.list_artifacts(run.info.run_id, top)}
    assert {"metrics/train.json", "reports/train.json", "reports/data.json", "models/model.pt",
            "plots/train/val_ap.csv"} <= names


def test_dvc_yaml_train_okd_lists_what_the_stage_reads():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train-okd"]
    mod = runpy.run_path(str(STAGE))                  # not __main__: constants only
    listed = stage["params"]
    assert [p.rstrip(".") for p in mod["PARAMS"]] + ["tracking", "energy"] == listed
    deps = set(stage["deps"])
    for path in ("stages/train_okd.py", "src/okdpose/train.py", "src/okdpose/losses.py", "src/okdpose/data",
                 "src/okdpose/codec.py", "src/okdpose/inference.py", "src/okdpose/metrics.py",
                 "src/okdpose/tracking.py", "src/okdpose/joints.py", "src/okdpose/model", "data/raw",
                 "data/prepared", "models/init.pt", "reports/data.json", "reports/pretrain.json"):
        assert path in deps, path
    assert all((ROOT / d).exists() or d.startswith(("data/", "models/", "reports/")) for d in deps)
    outs = [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"]]
    assert outs == ["models/model.pt", "models/last.pt", "plots/train", "reports/train.json"]
    assert stage["outs"][3] == {"reports/train.json": {"cache": False}}          # git-tracked, not a metric
    assert stage["metrics"] == [{"metrics/train.json": {"cache": False}}]
    assert stage["outs"][1] == {"models/last.pt": {"persist": True}}
    assert stage["outs"][2] == {"plots/train": {"cache": False}}      # drawn by the top-level plots
