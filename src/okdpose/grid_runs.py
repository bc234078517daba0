"""Finished grid experiments copied out of DVC into plain, committed files (one folder per row × seed).

    collect(Path("."), Path("results/grid"))   # -> names of the runs written

DVC keeps an experiment as a git ref (`refs/exps/...`) and its outputs in the local cache; a clone
has neither, and a grid split over several sessions would lose its earlier half. `collect` reads
every finished experiment whose params set `tracking.grid_row` and writes

    results/grid/runs/<name>/meta.json                 row, seed, rev, baseline, commit time, params
    results/grid/runs/<name>/eval.json, train.json     the run's full evaluate / train-okd reports
                                                       (reports/*.json; metrics/*.json before the split)
    results/grid/runs/<name>/predictions_stage{k}.json.gz   its COCO results per stage (re-evaluable)
    results/grid/test_gt.json.gz                       the test ground truth every run was scored on

Queued, running and failed experiments have no ref of their own and are not read. A run already
collected from the same rev is left alone; a newer run of the same name replaces it.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional

import yaml

log = logging.getLogger(__name__)

EXP_REFS = "refs/exps/"
SKIP_REFS = ("refs/exps/celery/", "refs/exps/exec/", "refs/exps/temp/")   # DVC's queue and executor refs
GT_FILE, RUNS = "test_gt.json.gz", "runs"
GT_PATH = "data/prepared/{split}_gt.json"
RESULTS = "results/eval/predictions_stage{k}.json"


class CollectError(RuntimeError):
    """A finished experiment whose files cannot be collected; the message says which and why."""


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if out.returncode:
        raise CollectError(f"git {' '.join(args)} failed in {repo}: {out.stderr.strip()}")
    return out.stdout


def finished_experiments(repo: Path) -> dict[str, str]:
    """{experiment name: rev} of every DVC experiment ref; for a name run several times, the
    newest commit."""
    lines = _git(repo, "for-each-ref", "--format=%(refname) %(objectname) %(committerdate:unix)", EXP_REFS)
    found: dict[str, tuple[int, str]] = {}
    for line in lines.splitlines():
        ref, rev, stamp = line.split()
        if ref.startswith(SKIP_REFS) or ref.count("/") < 4:     # refs/exps/<2>/<38>/<name>
            continue
        name = ref.rsplit("/", 1)[1]
        if name not in found or int(stamp) > found[name][0]:
            found[name] = (int(stamp), rev)
    return {name: rev for name, (_, rev) in sorted(found.items())}


def _show(repo: Path, rev: str, path: str) -> Optional[str]:
    out = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


def _dvc_read(repo: Path, rev: str, path: str) -> bytes:
    import dvc.api

    try:
        return dvc.api.read(path, repo=str(repo), rev=rev, mode="rb")
    except Exception as e:  # noqa: BLE001 - DVC raises many kinds; all mean: not in the cache
        raise CollectError(f"experiment {rev[:8]}: {path} is not in the DVC cache ({type(e).__name__}: {e}); "
                           f"it was made on another machine or the cache was cleaned: re-run that experiment") from None


def run_record(repo: Path, name: str, rev: str) -> Optional[dict[str, Any]]:
    """The meta.json of experiment `name` at `rev`, None when it is not a grid run (no
    tracking.grid_row) or did not get to evaluate (no metrics/eval.json)."""
    params = yaml.safe_load(_show(repo, rev, "params.yaml") or "{}") or {}
    row = (params.get("tracking") or {}).get("grid_row")
    if not row or _show(repo, rev, "metrics/eval.json") is None:
        return None
    return {"name": name, "row": row, "seed": (params.get("train") or {}).get("seed", 0), "rev": rev,
            "baseline": _git(repo, "rev-parse", f"{rev}^").strip(),
            "timestamp": _git(repo, "show", "-s", "--format=%cI", rev).strip(), "params": params}


def _write_gz(path: Path, data: bytes) -> None:
    with gzip.GzipFile(path, "wb", mtime=0) as f:   # mtime 0: the same bytes give the same file
        f.write(data)


def collect_one(repo: Path, out: Path, record: dict[str, Any]) -> Path:
    """Write one run's folder (atomically: a half-written folder is never left as collected)."""
    rev = record["rev"]
    ev = json.loads(_show(repo, rev, "reports/eval.json") or _show(repo, rev, "metrics/eval.json") or "{}")
    train = _show(repo, rev, "reports/train.json") or _show(repo, rev, "metrics/train.json")
    split = ev.get("split", "test")
    gt = _dvc_read(repo, rev, GT_PATH.format(split=split))
    record = {**record, "split": split, "gt_sha256": hashlib.sha256(gt).hexdigest()}
    gt_file = out / GT_FILE
    if gt_file.is_file():
        have = hashlib.sha256(gzip.decompress(gt_file.read_bytes())).hexdigest()
        if have != record["gt_sha256"]:
            raise CollectError(f"{record['name']} ({rev[:8]}) was scored on other ground truth than {gt_file} "
                               f"(sha256 {record['gt_sha256'][:12]} vs {have[:12]}): the data params differ; "
                               f"collect that grid into another folder (--out)")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_gz(gt_file, gt)
    final = out / RUNS / record["name"]
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stages = sorted(int(k[5:]) for k in ev if k.startswith("stage") and k[5:].isdigit())
    for k in stages:
        _write_gz(tmp / f"predictions_stage{k}.json.gz", _dvc_read(repo, rev, RESULTS.format(k=k)))
    (tmp / "eval.json").write_text(json.dumps(ev, indent=2) + "\n")
    if train is not None:
        (tmp / "train.json").write_text(train)
    (tmp / "meta.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def collected_rev(folder: Path) -> Optional[str]:
    try:
        return json.loads((folder / "meta.json").read_text()).get("rev")
    except (OSError, ValueError):
        return None


def collect(repo: Path, out: Path, prefix: str = "", log_fn: Any = print) -> list[str]:
    """Collect every finished grid experiment (name starting with `prefix`) not yet in `out`. ->
    the names written. One experiment that cannot be read is reported and skipped, not fatal."""
    written = []
    for name, rev in finished_experiments(repo).items():
        if not name.startswith(prefix) or collected_rev(out / RUNS / name) == rev:
            continue
        try:
            record = run_record(repo, name, rev)
            if record is None:
                continue
            collect_one(repo, out, record)
        except CollectError as e:
            log_fn(f"grid collect: skipped {name}: {e}")
            continue
        written.append(name)
        log_fn(f"grid collect: {name} ({rev[:8]}) -> {out / RUNS / name}")
    return written
