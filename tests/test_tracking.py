import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from okdpose.params import Params, TrackingParams
from okdpose.tracking import (
    MAX_PARAM_VALUE,
    TAG_COMMIT,
    Run,
    Tracker,
    sanitize_key,
    tracking_enabled,
    tracking_root,
)

DVC_ENV = ("OKDPOSE_TRACKING", "MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE", "DVC_EXP_BASELINE_REV")


@pytest.fixture(scope="session")
def store_root(tmp_path_factory):
    """One sqlite store for the module: mlflow's import and table creation take seconds."""
    return tmp_path_factory.mktemp("repo")


@pytest.fixture
def env(monkeypatch, store_root):
    for name in DVC_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(store_root))
    return monkeypatch


def read_client(store_root):
    """A plain MlflowClient on the store, made after the tracker so that the tracker creates it."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store_root / 'mlflow.db'}")


# ------------------------------------------------------------------ helpers without mlflow

def test_sanitize_key():
    assert sanitize_key("stage4.AP") == "stage4.AP"
    assert sanitize_key("PCK@0.2/right hand") == "PCK_0.2/right hand"
    assert sanitize_key("AP (M)") == "AP _M_"
    assert sanitize_key("/a//b/../c/") == "a/b/__/c"
    assert sanitize_key("") == "_"
    assert len(sanitize_key("x" * 400)) == 250


def test_enabled_switch_and_root(monkeypatch, tmp_path):
    for name in DVC_ENV:
        monkeypatch.delenv(name, raising=False)
    assert tracking_enabled(True) and not tracking_enabled(False)
    monkeypatch.setenv("OKDPOSE_TRACKING", "0")
    assert not tracking_enabled(True) and not Tracker.from_params(TrackingParams()).enabled
    monkeypatch.setenv("OKDPOSE_TRACKING", "1")
    assert Tracker.from_params(TrackingParams()).enabled

    # DVC_ROOT first (under `dvc exp run --temp` the cwd is a temporary copy) ...
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert tracking_root() == (tmp_path / "repo").resolve()
    # ... then the git root of the cwd, then the cwd
    monkeypatch.delenv("DVC_ROOT")
    repo, plain = tmp_path / "g", tmp_path / "plain"
    (repo / "sub").mkdir(parents=True)
    plain.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.chdir(repo / "sub")
    assert tracking_root() == repo.resolve()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.chdir(plain)
    assert tracking_root() == plain.resolve()


def test_disabled_tracking_never_imports_mlflow(tmp_path):
    code = textwrap.dedent("""
        import os, sys
        from okdpose.params import TrackingParams
        from okdpose.tracking import Tracker
        assert "mlflow" not in sys.modules, "importing okdpose.tracking imported mlflow"
        for tracker in (Tracker.from_params(TrackingParams(enabled=False)),
                        Tracker.from_params(TrackingParams(enabled=True)) if os.environ.get("OKDPOSE_TRACKING") == "0" else None):
            with tracker.run(run_name="x", tags={"a": 1}) as run:
                run.log_params({"a": 1}); run.log_metrics({"m": 1.0}, step=1); run.set_tags({"t": "v"})
                run.log_artifact("nope.txt")
                assert run.id is None and not run.enabled
        assert "mlflow" not in sys.modules, "a disabled tracker imported mlflow"
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k not in DVC_ENV}
    env.update(DVC_ROOT=str(tmp_path), OKDPOSE_TRACKING="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


# ------------------------------------------------------------------ with an MLflow store

def test_run_logs_params_metrics_artifacts(env, store_root, tmp_path, caplog, capfd):
    env.setenv("DVC_EXP_NAME", "exp-kld05")
    env.setenv("DVC_STAGE", "train-okd")
    env.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    report = tmp_path / "train.json"
    report.write_text(json.dumps({"best": 0.5}))
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "a.csv").write_text("x\n1\n")
    params = Params().validate().flat()
    with caplog.at_level(logging.INFO):
        with Tracker.from_params(TrackingParams(experiment="okd-test")).run(tags={"note": "unit"}) as run:
            assert run.enabled and run.id
            run.log_params(params)
            run.log_params({"long": "x" * 7000})
            for epoch in range(3):
                run.log_metrics({"stage4.AP": 0.1 * epoch, "loss/total": 1.0 / (epoch + 1), "PCK@0.2": 0.5}, step=epoch)
            run.log_artifact(report, artifact_path="metrics")
            run.log_artifact(plots, artifact_path="eval")              # a folder: its files
            run.set_tags({"dvc.exp_rev": "b" * 40})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    out, err = capfd.readouterr()
    assert "mlflow" not in out + err and "alembic" not in out + err, "mlflow should be quiet"

    client = read_client(store_root)
    got = client.get_run(run.id)
    assert got.info.status == "FINISHED" and got.info.run_name == "exp-kld05"
    assert client.get_experiment(got.info.experiment_id).name == "okd-test"
    assert got.data.params["loss.kld_weight"] == str(params["loss.kld_weight"])
    assert got.data.params["loss.kld_couples"] == str(params["loss.kld_couples"])   # a list, as str()
    assert len(got.data.params["long"]) == MAX_PARAM_VALUE and got.data.params["long"].endswith("[truncated]")
    assert [m.value for m in client.get_metric_history(run.id, "stage4.AP")] == pytest.approx([0.0, 0.1, 0.2])
    assert [m.step for m in client.get_metric_history(run.id, "stage4.AP")] == [0, 1, 2]
    assert got.data.metrics["PCK_0.2"] == 0.5 and got.data.metrics["loss/total"] == pytest.approx(1 / 3)
    tags = got.data.tags
    assert tags[TAG_COMMIT] == "a" * 40 and tags["dvc.exp_name"] == "exp-kld05" and tags["dvc.stage"] == "train-okd"
    assert tags["note"] == "unit" and tags["dvc.exp_rev"] == "b" * 40
    # the store and the artifacts are at DVC_ROOT
    assert (store_root / "mlflow.db").is_file()
    art = Path(client.download_artifacts(run.id, "metrics/train.json", str(tmp_path / "dl")))
    assert json.loads(art.read_text()) == {"best": 0.5}
    assert Path(got.info.artifact_uri.removeprefix("file://")).is_relative_to(store_root / "mlruns")
    assert {f.path for f in client.list_artifacts(run.id)} == {"metrics", "eval"}
    assert [f.path for f in client.list_artifacts(run.id, "eval")] == ["eval/a.csv"]


def test_resuming_a_run_appends_to_it(env, store_root, caplog):
    tracker = Tracker.from_params(TrackingParams(experiment="okd-test"))
    env.setenv("DVC_STAGE", "train-okd")
    with tracker.run() as run:
        run.log_params({"a": 1, "model.width": 8})
        run.log_metrics({"stage4.AP": 0.5}, step=0)
    env.setenv("DVC_STAGE", "evaluate")
    with caplog.at_level(logging.WARNING, logger="okdpose.tracking"):
        with tracker.run(run_id=run.id) as again:
            assert again.id == run.id
            again.log_params({"a": 1, "evaluate.flip_test": False})   # same value: fine
            again.log_params({"model.width": 32})                      # changed: warned, kept
            again.log_metrics({"stage4.AP": 0.7}, step=1)
            again.log_metrics({"eval.AP": 0.6, "bad": "n/a"})
    assert "model.width" in caplog.text and "bad" in caplog.text
    client = read_client(store_root)
    got = client.get_run(run.id)
    assert got.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.id, "stage4.AP")] == [0.5, 0.7]
    assert got.data.params == {"a": "1", "model.width": "8", "evaluate.flip_test": "False"}
    assert got.data.metrics["eval.AP"] == 0.6 and "bad" not in got.data.metrics
    assert got.data.tags["dvc.stage"] == "train-okd" and got.data.tags["dvc.stages"] == "train-okd,evaluate"


def test_unknown_run_id_logs_to_a_new_run(env, store_root, caplog):
    with caplog.at_level(logging.WARNING, logger="okdpose.tracking"):
        with Tracker.from_params(TrackingParams(experiment="okd-test")).run(run_id="0" * 32) as run:
            run.log_metrics({"m": 1.0})
    assert run.id and run.id != "0" * 32 and "not found" in caplog.text
    assert read_client(store_root).get_run(run.id).data.tags["okdpose.requested_run_id"] == "0" * 32


def test_body_exception_propagates_and_marks_the_run_failed(env, store_root):
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker.from_params(TrackingParams(experiment="okd-test")).run() as run:
            raise RuntimeError("boom")
    assert read_client(store_root).get_run(run.id).info.status == "FAILED"


def test_unreachable_store_falls_back_to_noop(env, tmp_path, caplog):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    env.setenv("DVC_ROOT", str(blocker))          # the store would have to live inside a file
    ran = False
    with caplog.at_level(logging.WARNING, logger="okdpose.tracking"):
        with Tracker.from_params(TrackingParams()).run() as run:
            run.log_params({"a": 1})
            run.log_metrics({"m": 1.0})
            ran = True
    assert ran and run.id is None and type(run) is Run
    assert "tracking is off for this run" in caplog.text


# ------------------------------------------------------------------ names, kinds and grid tags

def _git_repo(path: Path) -> Path:
    path.mkdir()
    run = lambda *a: subprocess.run(["git", *a], cwd=path, check=True, capture_output=True)   # noqa: E731
    run("init", "-q")
    run("config", "user.email", "t@localhost")
    run("config", "user.name", "t")
    (path / "params.yaml").write_text("a: 1\n")
    run("add", "params.yaml")
    run("commit", "-qm", "c")
    return path


def test_a_plain_run_is_named_after_its_commit(env, tmp_path):
    from okdpose.tracking import default_run_name, git_commit

    repo = _git_repo(tmp_path / "g")
    env.chdir(repo)
    commit = git_commit(repo)
    assert default_run_name(repo) == commit[:8]
    (repo / "params.yaml").write_text("a: 2\n")                    # uncommitted params: not the commit's run
    assert default_run_name(repo) == commit[:8] + "+dirty"
    env.setenv("DVC_EXP_NAME", "kld-0.5")                          # an experiment keeps its DVC name
    assert default_run_name(repo) == "kld-0.5"


def test_grid_runs_are_tagged_with_row_and_seed_and_the_experiment_opens_as_model_training(env, store_root):
    from okdpose.tracking import KIND_MODEL_TRAINING, TAG_KIND, run_tags

    params = TrackingParams(experiment="okd-kind", grid_row="HRNet4-OKD")
    assert run_tags(params, 2) == {"seed": "2", "grid.row": "HRNet4-OKD", "grid.seed": "2"}
    assert run_tags(TrackingParams(), 0) == {"seed": "0"}
    with Tracker.from_params(TrackingParams(experiment="okd-kind", run_name="named")).run(tags=run_tags(params, 2)) as run:
        pass
    client = read_client(store_root)
    got = client.get_run(run.id)
    assert got.info.run_name == "named" and got.data.tags["grid.row"] == "HRNet4-OKD"
    exp = client.get_experiment(got.info.experiment_id)
    assert exp.tags[TAG_KIND] == KIND_MODEL_TRAINING
    # a store made before the tag existed gets it on the next run
    client.delete_experiment_tag(exp.experiment_id, TAG_KIND)
    with Tracker.from_params(TrackingParams(experiment="okd-kind")).run():
        pass
    assert client.get_experiment(exp.experiment_id).tags[TAG_KIND] == KIND_MODEL_TRAINING
