"""grid_runs: finished DVC experiments (git refs) -> committed per-run folders."""
from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from okdpose import grid_runs


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo: Path, files: dict[str, str], message: str, date: str) -> str:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    _git(repo, "add", "-A")
    env = {"GIT_COMMITTER_DATE": date, "GIT_AUTHOR_DATE": date}
    subprocess.run(["git", "commit", "-qm", message], cwd=repo, check=True, env={**__import__("os").environ, **env})
    return _git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@localhost")
    _git(repo, "config", "user.name", "t")
    base = _commit(repo, {"params.yaml": "train: {seed: 0}\n"}, "base", "2026-12-01T10:00:00")
    return repo, base


def _exp(repo: Path, base: str, name: str, params: dict, date: str, metrics: bool = True) -> str:
    files = {"params.yaml": yaml.safe_dump(params)}
    if metrics:
        files["metrics/eval.json"] = json.dumps({"split": "test", "stage2": {"AP": 0.5}})
        files["metrics/train.json"] = json.dumps({"energy": {"status": "off"}})
    rev = _commit(repo, files, name, date)
    _git(repo, "update-ref", f"refs/exps/{base[:2]}/{base[2:]}/{name}", rev)
    _git(repo, "reset", "-q", "--hard", base)
    return rev


def test_finished_experiments_are_the_exp_refs_newest_first(repo):
    repo, base = repo
    old = _exp(repo, base, "HRNet2-s0", {"tracking": {"grid_row": "HRNet2"}}, "2026-12-01T11:00:00")
    new = _exp(repo, base, "HRNet2-s0", {"tracking": {"grid_row": "HRNet2"}, "x": 1}, "2026-12-01T12:00:00")
    # the same name as the queue's own refs: not experiments
    _git(repo, "update-ref", "refs/exps/celery/stash", old)
    found = grid_runs.finished_experiments(repo)
    assert found == {"HRNet2-s0": new}


def test_only_grid_runs_that_reached_evaluate_are_records(repo):
    repo, base = repo
    plain = _exp(repo, base, "kld-0.5", {"loss": {"kld_weight": 0.5}}, "2026-12-01T11:00:00")
    early = _exp(repo, base, "HRNet2-s1", {"tracking": {"grid_row": "HRNet2"}}, "2026-12-01T11:10:00", metrics=False)
    good = _exp(repo, base, "HRNet2-s2", {"tracking": {"grid_row": "HRNet2"}, "train": {"seed": 2}},
                "2026-12-01T11:20:00")
    assert grid_runs.run_record(repo, "kld-0.5", plain) is None
    assert grid_runs.run_record(repo, "HRNet2-s1", early) is None
    rec = grid_runs.run_record(repo, "HRNet2-s2", good)
    assert (rec["row"], rec["seed"], rec["rev"], rec["baseline"]) == ("HRNet2", 2, good, base)
    assert rec["timestamp"].startswith("2026-12-01T11:20:00")


def test_collect_writes_the_folder_and_refuses_other_ground_truth(repo, monkeypatch):
    repo, base = repo
    rev = _exp(repo, base, "HRNet2-s0", {"tracking": {"grid_row": "HRNet2"}}, "2026-12-01T11:00:00")
    cache = {"data/prepared/test_gt.json": b'{"images": []}', "results/eval/predictions_stage2.json": b"[]"}
    monkeypatch.setattr(grid_runs, "_dvc_read", lambda repo, rev, path: cache[path])
    out = repo.parent / "grid"            # outside the repo: the fake experiments commit everything
    logged = []
    assert grid_runs.collect(repo, out, log_fn=logged.append) == ["HRNet2-s0"]
    folder = out / "runs" / "HRNet2-s0"
    assert sorted(p.name for p in folder.iterdir()) == ["eval.json", "meta.json", "predictions_stage2.json.gz",
                                                        "train.json"]
    assert gzip.decompress((folder / "predictions_stage2.json.gz").read_bytes()) == b"[]"
    assert gzip.decompress((out / "test_gt.json.gz").read_bytes()) == cache["data/prepared/test_gt.json"]
    assert json.loads((folder / "meta.json").read_text())["rev"] == rev
    assert grid_runs.collect(repo, out, log_fn=logged.append) == []        # already collected from that rev
    # a run scored on other data is reported and skipped, the collected one is kept
    _exp(repo, base, "HRNet2-s1", {"tracking": {"grid_row": "HRNet2"}}, "2026-12-01T12:00:00")
    cache["data/prepared/test_gt.json"] = b'{"images": [1]}'
    assert grid_runs.collect(repo, out, log_fn=logged.append) == []
    assert "other ground truth" in logged[-1] and "HRNet2-s1" in logged[-1] and "--out" in logged[-1]
    assert not (out / "runs" / "HRNet2-s1").exists() and folder.is_dir()
