"""Two queued DVC experiments running at once log to the one MLflow store of the repository.

`dvc exp run --queue` runs each experiment in its own temporary copy under .dvc/tmp/exps (the
cwd of the stage commands), with `DVC_ROOT` set to the repository: okdpose.tracking puts both
runs into <repo>/mlflow.db and <repo>/mlruns. With `dvc queue start -j 2` the two trainings
overlap in time and write to the sqlite store concurrently: no run, param or metric may be lost,
and the database must stay intact.

Reuses the pipeline repository of test_e2e.py (built once per session).
"""
from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time

import pytest

from test_e2e import AFTER_LOSS, EPOCHS, STAGES, dvc_json, mlflow_client, pipeline_repo, runs_by_name, sh, stages_in

WEIGHTS = {"q-kld-0.25": 0.25, "q-kld-0.75": 0.75}


def _store_states(repo) -> dict[str, str]:
    """{run name: status} read straight from the sqlite store (cheap, unlike a dvc command);
    only used to decide when to ask dvc again."""
    try:
        with sqlite3.connect(f"file:{repo / 'mlflow.db'}?mode=ro", uri=True, timeout=1) as db:
            return dict(db.execute("SELECT name, status FROM runs"))
    except sqlite3.Error:
        return {}


def _queue_status(repo) -> dict[str, str]:
    out = sh(repo, "dvc", "queue", "status").stdout
    return {m.group(1): m.group(2) for m in re.finditer(r"^\w+\s+(\S+)\s+.*?\s(Queued|Running|Success|Failed)\s*$",
                                                          out, re.M)}


@pytest.mark.slow
def test_two_queued_experiments_share_one_mlflow_store(tmp_path_factory):
    repo = pipeline_repo(tmp_path_factory)
    # queue from the committed baseline, whatever other tests left in the workspace
    sh(repo, "git", "reset", "-q", "--hard")
    for name, weight in WEIGHTS.items():
        sh(repo, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"loss.kld_weight={weight}")
    assert set(_queue_status(repo)) >= set(WEIGHTS)
    sh(repo, "dvc", "queue", "start", "-j", "2")
    try:
        deadline, ask_dvc, status = time.monotonic() + 600, 0.0, {}
        while time.monotonic() < deadline:
            store = _store_states(repo)
            if time.monotonic() >= ask_dvc or all(store.get(n) in ("FINISHED", "FAILED", "KILLED") for n in WEIGHTS):
                status = {n: s for n, s in _queue_status(repo).items() if n in WEIGHTS}
                if len(status) == len(WEIGHTS) and all(s in ("Success", "Failed") for s in status.values()):
                    break
                ask_dvc = time.monotonic() + 20
            time.sleep(2)
        logs = {name: sh(repo, "dvc", "queue", "logs", name, check=False).stdout for name in WEIGHTS}
        assert status == {n: "Success" for n in WEIGHTS}, f"{status}\n" + "\n".join(logs.values())[-6000:]
    finally:
        sh(repo, "dvc", "queue", "stop", "--kill", check=False)
    for name, log in logs.items():
        ran, skipped = stages_in(log)
        assert ran == set(AFTER_LOSS) and skipped == set(STAGES) - set(AFTER_LOSS), log
        assert "tracking is off" not in log and "failed for run" not in log, log     # nothing dropped

    # DVC collected both experiments with their own metrics
    shown = {}
    for baseline in dvc_json(repo, "exp", "show"):
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs") or []:
                if rev.get("name") in WEIGHTS:
                    shown[rev["name"]] = rev["data"]
    assert set(shown) == set(WEIGHTS)
    train_metrics = {n: d["metrics"]["metrics/train.json"]["data"] for n, d in shown.items()}
    for name, weight in WEIGHTS.items():
        # the full report is a git-tracked plain output of the experiment's commit, not a metric
        report = json.loads(sh(repo, "git", "show", f"{shown[name]['rev']}:reports/train.json", merge=False).stdout)
        assert report["final"]["loss"]["kl_weight"] == weight
        assert report["mlflow_run_id"] == train_metrics[name]["mlflow_run_id"]
        assert "stage2" in shown[name]["metrics"]["metrics/eval.json"]["data"]

    # one store at the repository root, intact, with both runs complete
    with sqlite3.connect(repo / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db")), "a run wrote a store into its temporary copy"
    runs = runs_by_name(repo)
    client = mlflow_client(repo)
    for name, weight in WEIGHTS.items():
        assert name in runs, f"MLflow run {name} lost; runs: {list(runs)}"
        run = runs[name]
        assert run.info.status == "FINISHED" and run.info.run_id == train_metrics[name]["mlflow_run_id"]
        assert run.data.tags["dvc.exp_name"] == name and run.data.tags["dvc.stages"] == "train-okd,evaluate,explain,export"
        assert float(run.data.params["loss.kld_weight"]) == weight
        for key in ("train/total", "train/kl_weight", "val/stage1/AP", "val/stage2/AP", "lr"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), (name, key, history)
        assert all(m.value == weight for m in client.get_metric_history(run.info.run_id, "train/kl_weight"))
        assert "eval.test.stage2.AP" in run.data.metrics
        artifacts = repo / "mlruns"
        assert list(artifacts.rglob(f"{run.info.run_id}/artifacts/models/model.pt")), "artifacts not at DVC_ROOT"
    # and the two trainings did overlap (else this test proves nothing about concurrency)
    a, b = (runs[n].info for n in WEIGHTS)
    assert a.start_time < b.end_time and b.start_time < a.end_time, "the queued runs did not overlap"


RACE = """
import sys, time
from pathlib import Path
from mlflow.tracking import MlflowClient  # noqa: F401  (imported before the start line: a real race)
from okdpose.tracking import Tracker

root, me = Path(sys.argv[1]), sys.argv[2]
(root / f"ready-{me}").touch()
while not (root / "go").exists():
    time.sleep(0.005)
with Tracker(True, "race", root=root).run(run_name=f"p{me}") as run:
    for step in range(1, 6):
        run.log_metrics({"m": step}, step=step)
print("RUN", run.id)
"""


def test_parallel_processes_create_a_new_store_without_losing_runs(tmp_path):
    """Queued experiments started together on a clone without mlflow.db all create the store at
    once (schema creation and migrations): each one must still get its run."""
    from test_e2e import subprocess_env

    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(i)], env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all("RUN " in o and "RUN None" not in o for o in outs), "\n".join(outs)[-4000:]
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        rows = db.execute("SELECT r.name, r.status, COUNT(m.step) FROM runs r LEFT JOIN metrics m "
                          "ON m.run_uuid = r.run_uuid GROUP BY r.run_uuid").fetchall()
    assert sorted(rows) == [(f"p{i}", "FINISHED", 5) for i in range(2)]
