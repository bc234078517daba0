"""The grid from the command line, as the README runs it: 2 rows x 2 seeds queued as DVC
experiments, run by two workers, collected into plain files, and the table with intervals and
energy. Reuses the tiny pipeline repository of test_e2e.py (built once per session)."""
from __future__ import annotations

import csv
import json
import sys

import pytest

from test_e2e import EXPERIMENT, pipeline_repo, runs_by_name, sh

ROWS = ("HRNet2", "HRNet3-OKD")       # HRNet3-OKD's student (stage 2) is compared with HRNet2


@pytest.mark.slow
def test_two_rows_two_seeds_from_queue_to_table(tmp_path_factory):
    repo = pipeline_repo(tmp_path_factory)
    sh(repo, "git", "reset", "-q", "--hard")            # queue from the committed baseline
    grid = (sys.executable, "-m", "okdpose.grid")
    sh(repo, *grid, "queue", "--seeds", "2", "--rows", *ROWS, "--start", "-j", "2")
    sh(repo, *grid, "watch", "-j", "2", "--interval", "3", timeout=900)
    names = {f"{r}-s{s}" for r in ROWS for s in (0, 1)}
    runs = repo / "results" / "grid" / "runs"
    assert {p.name for p in runs.iterdir()} >= names    # collected by watch, without `dvc exp` afterwards
    meta = json.loads((runs / "HRNet3-OKD-s1" / "meta.json").read_text())
    assert (meta["row"], meta["seed"]) == ("HRNet3-OKD", 1)
    assert sorted(p.name for p in (runs / "HRNet3-OKD-s1").glob("predictions_stage*.json.gz")) == \
        [f"predictions_stage{k}.json.gz" for k in (1, 2, 3)]
    train = json.loads((runs / "HRNet2-s0" / "train.json").read_text())
    assert train["energy"]["status"] in ("ok", "unavailable") and train["threads"] == 1
    if train["energy"]["status"] == "ok":
        assert train["energy"]["kwh"] > 0 and isinstance(train["energy"]["measured"], bool)

    table = sh(repo, *grid, "table", "--no-collect", "--replicates", "40", timeout=600).stdout
    assert "HRNet3-OKD" in table
    out = repo / "results" / "grid"
    with open(out / "comparisons.csv", newline="") as f:
        cmp = {r["label"]: r for r in csv.DictReader(f)}
    student = cmp["HRNet3-OKD s2 vs HRNet2 s2"]
    assert student["n_a"] == student["n_b"] == "2"
    assert float(student["lo"]) <= float(student["diff"]) <= float(student["hi"])
    with open(out / "table.csv", newline="") as f:
        rows = {(r["row"], r["stage"]): r for r in csv.DictReader(f)}
    assert rows[("HRNet2", "2")]["n_seeds"] == "2" and rows[("HRNet2", "2")]["AP_sd"] != ""
    assert (out / "ap_per_stage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # MLflow: the grid runs carry their row and seed, the experiment opens as model training
    by_name = runs_by_name(repo)
    run = by_name["HRNet3-OKD-s1"]
    assert run.data.tags["grid.row"] == "HRNet3-OKD" and run.data.tags["grid.seed"] == "1"
    from test_e2e import mlflow_client
    exp = mlflow_client(repo).get_experiment_by_name(EXPERIMENT)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # the results are plain files: a later `grid queue --skip-collected` queues nothing more
    again = sh(repo, *grid, "queue", "--seeds", "2", "--rows", *ROWS, "--skip-collected", "--dry-run").stdout
    assert again.strip() == ""
