"""End to end: the whole DVC pipeline on a tiny config in a temporary git repository.

`dvc repro` runs every stage once and logs one MLflow run; `dvc exp run -S loss.kld_weight=0.5`
then re-runs exactly train-okd, evaluate and explain (the stages that read `loss`), the metrics
diff shows the change and the experiment is a second, named MLflow run in the same store.

`pipeline_repo()` builds the repository once per test session; test_plots_offline.py and
test_queue.py reuse it. Everything runs as subprocesses (dvc, the stage scripts) with the
project's interpreter first on PATH, one thread each: ~1-2 min on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# what a clone needs to run the pipeline (src/ is imported from the project through PYTHONPATH,
# the copy is there because dvc.yaml lists its files as dependencies)
PROJECT_FILES = ("dvc.yaml", "stages", "src", "pretrained", ".dvcignore", ".gitignore", "Makefile",
                 ".dvc/config", ".dvc/.gitignore", ".dvc/plots_offline.html", ".dvc/plots")
STAGES = ("download", "preprocess", "pretrain-load", "train-okd", "evaluate", "explain", "export")
AFTER_LOSS = ("train-okd", "evaluate", "explain", "export")          # the stages whose params include `loss`
EPOCHS = 2
EXPERIMENT = "okdpose-e2e"
# params.yaml of the project with these keys replaced: seconds per stage on a CPU
TINY = {
    "data.synthetic.subjects": [1, 1, 1],
    "data.synthetic.frames_per_subject": 4,
    "data.image_size": [48, 64],
    "data.heatmap_size": [12, 16],
    "model.width": 4,
    "model.n_stage": 2,
    "model.multi": True,
    "model.pretrained": None,
    "loss.kld_couples": [[1, 2]],
    "export.stages": [2],
    "loss.kld_weight": 1.0,
    "loss.rampup_epochs": 0.0,      # the KL weight is kld_weight from the first step: train.json shows it
    "train.epochs": EPOCHS,
    "train.batch_size": 4,
    "train.lr_steps": [],
    "train.patience": 0,
    "train.workers": 0,
    "train.device": "cpu",
    "train.precision": "fp32",
    "evaluate.num_images": 1,
    "evaluate.batch_size": 8,
    "explain.num_images": 1,
    "tracking.enabled": True,
    "tracking.experiment": EXPERIMENT,
}
RAN = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' (?:didn't change, skipping|is cached - skipping run)")


# --------------------------------------------------------------------------- helpers

def tiny_params(base: Path = ROOT / "params.yaml", overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The project's params with `TINY` (then `overrides`, same flat keys) in place."""
    params = yaml.safe_load(base.read_text())
    for key, value in {**TINY, **(overrides or {})}.items():
        *parents, last = key.split(".")
        d = params
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    return params


def subprocess_env() -> dict[str, str]:
    """The environment of a user's shell in the clone: the project's venv first on PATH (stage
    commands call `python`), no DVC/MLflow variables of the calling process, no global git
    config (signing, hooks), an identity for the commits DVC makes, one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DVC_", "MLFLOW_", "GIT_", "PYTEST_")) and k != "OKDPOSE_TRACKING"}
    env.update({
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
        "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "okdpose-test", "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "okdpose-test", "GIT_COMMITTER_EMAIL": "test@localhost",
    })
    return env


def sh(cwd: Path, *cmd: str, timeout: float = 300, check: bool = True, merge: bool = True) -> subprocess.CompletedProcess:
    """Run a command in `cwd` (`dvc ...` through the project's interpreter); stderr joins stdout
    unless `merge` is false."""
    if cmd[0] == "dvc":
        cmd = (sys.executable, "-m", "dvc", *cmd[1:])
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, text=True, timeout=timeout,
                          stderr=subprocess.STDOUT if merge else subprocess.PIPE)
    if check and proc.returncode:
        pytest.fail(f"`{' '.join(map(str, cmd))}` exited {proc.returncode} in {cwd}:\n"
                    f"{proc.stdout[-6000:]}{proc.stderr[-3000:] if proc.stderr else ''}")
    return proc


def dvc_json(cwd: Path, *args: str, timeout: float = 300) -> Any:
    """`dvc <args> --json`, parsed."""
    return json.loads(sh(cwd, "dvc", *args, "--json", timeout=timeout, merge=False).stdout)


def metric_columns(shown: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """(metric files, "file:dotted.key" of every number) over all revisions of `dvc exp show --json`."""
    files, columns = set(), set()

    def numbers(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                numbers(f"{prefix}.{k}" if not prefix.endswith(":") else f"{prefix}{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            columns.add(prefix)

    def visit(rev: dict[str, Any]) -> None:
        for path, metric in ((rev.get("data") or {}).get("metrics") or {}).items():
            files.add(path)
            numbers(f"{path}:", metric.get("data") or {})
        for group in rev.get("experiments") or []:
            for sub in group.get("revs") or []:
                visit(sub)

    for rev in shown:
        visit(rev)
    return files, columns


def stages_in(log: str) -> tuple[set[str], set[str]]:
    """(stages that ran, stages skipped as unchanged) according to dvc's output."""
    return set(RAN.findall(log)), set(SKIPPED.findall(log))


def mlflow_client(repo: Path):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def runs_by_name(repo: Path) -> dict[str, Any]:
    client = mlflow_client(repo)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, f"no MLflow experiment {EXPERIMENT!r} in {repo / 'mlflow.db'}"
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return {r.info.run_name: r for r in runs}


def build_pipeline_repo(repo: Path, overrides: Mapping[str, Any] | None = None, target: str | None = None) -> Path:
    """A git + DVC clone of the project with tiny params (and `overrides`), `dvc repro [target]`
    run and committed; dvc's output in repo.parent / "repro.log"."""
    repo.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=ignore)
        elif src.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    assert (repo / ".dvc" / "config").is_file() and (repo / "dvc.yaml").is_file()
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(overrides=overrides), sort_keys=False))
    sh(repo, "git", "init", "-q")
    for key, value in (("user.name", "okdpose-test"), ("user.email", "test@localhost"), ("commit.gpgsign", "false")):
        sh(repo, "git", "config", key, value)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "tiny okdpose")
    repro = sh(repo, "dvc", "repro", *([target] if target else []), timeout=600)
    (repo.parent / "repro.log").write_text(repro.stdout)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "baseline results")
    return repo


_REPO: dict[str, Path] = {}


def pipeline_repo(tmp_path_factory) -> Path:
    """The session's pipeline repository (built on first use). Tests may run experiments in it
    but leave HEAD where it is."""
    if "repo" not in _REPO:
        _REPO["repo"] = build_pipeline_repo(tmp_path_factory.mktemp("e2e") / "okdpose")
    return _REPO["repo"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return pipeline_repo(tmp_path_factory)


# --------------------------------------------------------------------------- tests

@pytest.mark.slow
def test_repro_runs_every_stage_and_logs_one_mlflow_run(repo):
    ran, skipped = stages_in((repo.parent / "repro.log").read_text())
    assert ran == set(STAGES) and not skipped
    assert sh(repo, "git", "status", "--porcelain").stdout.strip() == "", "outputs not ignored by git or DVC"
    assert dvc_json(repo, "status") == {}

    train = json.loads((repo / "reports" / "train.json").read_text())
    assert train["epochs_run"] == EPOCHS and train["final"]["loss"]["kl_weight"] == 1.0
    assert json.loads((repo / "metrics" / "train.json").read_text())["mlflow_run_id"] == train["mlflow_run_id"]
    evaluate = json.loads((repo / "metrics" / "eval.json").read_text())
    assert {k for k in evaluate if k.startswith("stage")} == {"stage1", "stage2"}
    assert {"data", "pretrain", "train", "eval", "explain", "export"} == {p.stem for p in (repo / "reports").iterdir()}
    assert sorted(p.name for p in (repo / "plots" / "train").iterdir()) == ["losses.csv", "lr.csv", "val.csv", "val_ap.csv"]
    assert {"stages.csv", "per_joint.csv", "example_0.png"} <= {p.name for p in (repo / "plots" / "eval").iterdir()}
    assert list((repo / "plots" / "explain").glob("*.png"))

    baseline = [r for r in runs_by_name(repo).values() if "dvc.exp_name" not in r.data.tags]
    assert len(baseline) == 1, baseline          # one run for the whole pipeline execution
    (run,) = baseline
    assert run.info.run_id == train["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["dvc.stages"] == "train-okd,evaluate,explain,export"
    assert run.data.params["loss.kld_weight"] == "1.0"
    assert "eval.test.stage2.AP" in run.data.metrics
    history = mlflow_client(repo).get_metric_history(run.info.run_id, "train/total")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    # artifacts at the repository root, next to the store
    assert (repo / "mlruns").is_dir() and any((repo / "mlruns").rglob("model.pt"))


@pytest.mark.slow
def test_exp_run_reruns_only_the_stages_after_the_loss(repo):
    exp = sh(repo, "dvc", "exp", "run", "-S", "loss.kld_weight=0.5", timeout=600)
    ran, skipped = stages_in(exp.stdout)
    assert ran == set(AFTER_LOSS), exp.stdout
    assert skipped == set(STAGES) - set(AFTER_LOSS), exp.stdout
    name = re.search(r"Ran experiment\(s\): (\S+)", exp.stdout)
    assert name, exp.stdout
    name = name.group(1)

    diff = dvc_json(repo, "metrics", "diff")
    assert set(diff) == {"metrics/train.json", "metrics/eval.json"}, diff   # at least the measured latency differs
    assert "kd.kl" in diff["metrics/train.json"]      # the KD diagnostics follow the weight
    report = json.loads((repo / "reports" / "train.json").read_text())    # the experiment's, in the workspace
    assert report["final"]["loss"]["kl_weight"] == 0.5
    params = dvc_json(repo, "params", "diff")
    assert params["params.yaml"] == {"loss.kld_weight": {"old": 1.0, "new": 0.5, "diff": -0.5}}

    shown = dvc_json(repo, "exp", "show")
    assert f'"name": "{name}"' in json.dumps(shown)
    # the columns of `dvc exp show`: the two headline files only, a few dozen numbers for this 2-stage model
    files, columns = metric_columns(shown)
    assert files == {"metrics/train.json", "metrics/eval.json"}, files
    assert {"metrics/eval.json:stage2.AP", "metrics/train.json:best.stage2.AP", "metrics/train.json:kd.kl"} <= columns
    assert len(columns) < 40, sorted(columns)
    # what a user sees in a 160-column terminal (README: `make exps`): the name, the changed param, AP per stage
    table = subprocess.run(["make", "-s", "exps"], cwd=repo, env={**subprocess_env(), "COLUMNS": "160"},
                           capture_output=True, text=True, timeout=300, check=True).stdout
    header = next(line for line in table.splitlines() if "Experiment" in line)
    assert all(k in header for k in ("stage1.AP", "stage2.AP", "loss.kld_weight")) and "…" not in header, table
    assert name in table and "0.5" in table, table

    runs = runs_by_name(repo)
    assert name in runs, list(runs)
    run = runs[name]
    train = json.loads((repo / "metrics" / "train.json").read_text())
    assert run.info.run_id == train["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.params["loss.kld_weight"] == "0.5" and run.data.tags["dvc.exp_name"] == name
    assert run.data.tags["dvc.stages"] == "train-okd,evaluate,explain,export"
    assert run.data.metrics["train/kl_weight"] == 0.5 and "eval.test.stage1.AP" in run.data.metrics
    assert sum(r.data.tags.get("dvc.exp_name") == name for r in runs.values()) == 1
