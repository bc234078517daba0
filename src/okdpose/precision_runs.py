"""bf16 vs fp32 training of the default run: seeds a side, test AP per stage, hierarchical bootstrap.

    okdpose precision table [--root results/precision] [--replicates 1000]
    summary = summarize(Path("results/precision"))   # reads <root>/<row>-s<seed>/, writes <root>/table.md|csv

A run folder is what `scripts/precision_seed.sh` writes (the grid's per-run layout: eval.json,
train.json, predictions_stage{k}.json.gz, meta.json with row `default-fp32` / `default-bf16`, seed,
gt_sha256); the test ground truth is <root>/test_gt.json.gz. Folders of other rows are ignored. The
interval is `grid_stats.bootstrap_comparisons`' (images and seeds resampled, paired images), so it
reads like the grid's; "within the fp32 seed spread" means |mean bf16 - mean fp32| <= the sd of the
fp32 seeds (issue 18, Ask 4). AP in points (0-100).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from okdpose import grid_stats
from okdpose.files import write_csv, write_text
from okdpose.grid_stats import (GT_FILE, Comparison, GridDataError, GridRun, _percent_sd, bootstrap_comparisons,
                                predictions_file)

ROWS = ("default-bf16", "default-fp32")       # (A, B): the differences are bf16 - fp32
FIX = "re-run that seed with scripts/precision_seed.sh PRECISION SEED (it rewrites the folder)"
GT_FIX = "gzip a run's data/prepared/test_gt.json there (scripts/precision_seed.sh does)"


def load_ground_truth(root: Path) -> dict:
    """<root>/test_gt.json.gz: the test split every run was scored on (copied from a run's data/prepared)."""
    return grid_stats.load_ground_truth(root, GT_FIX)


def _json(path: Path, what: str) -> Any:
    return grid_stats._read_json(path, what, FIX)


def load_runs(root: Path, rows: Sequence[str] = ROWS) -> list[GridRun]:
    """Every <root>/*/ folder whose meta.json row is in `rows`, sorted by (row, seed); raises
    GridDataError for a malformed folder, another test split or two runs of one (row, seed)."""
    root = Path(root)
    gt_sha = grid_stats.ground_truth_sha256(root, GT_FIX)
    runs: dict[tuple[str, int], GridRun] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / "meta.json").is_file()):
        meta = _json(folder / "meta.json", "run metadata")
        if meta.get("row") not in rows:
            continue
        if meta.get("gt_sha256") != gt_sha:
            raise GridDataError(f"{folder / 'meta.json'}: gt_sha256 {meta.get('gt_sha256')} is not the one of "
                                f"{root / GT_FILE} ({gt_sha}): evaluated on another test split; re-run it with "
                                f"scripts/precision_seed.sh")
        ev = _json(folder / "eval.json", "eval metrics")
        stages = sorted(_eval_stages(ev))
        if not stages or any(not predictions_file(folder, k).is_file() for k in stages):
            raise GridDataError(f"{folder}: eval.json stages {stages} need predictions_stage{{k}}.json.gz each; {FIX}")
        key = (meta["row"], int(meta["seed"]))
        if key in runs:
            raise GridDataError(f"{runs[key].folder} and {folder}: two runs of {key[0]} seed {key[1]}; remove one")
        train = _json(folder / "train.json", "train metrics") if (folder / "train.json").is_file() else {}
        runs[key] = GridRun(str(meta["name"]), key[0], key[1], ev, train, meta, folder)
    return [runs[k] for k in sorted(runs, key=lambda k: (rows.index(k[0]), k[1]))]


def _eval_stages(ev: dict) -> set[int]:
    """The stage numbers k of an eval.json's "stage{k}" entries."""
    return {int(k[5:]) for k in ev if k.startswith("stage") and k[5:].isdigit()}


def _stages(runs: Sequence[GridRun]) -> list[int]:
    sets = [_eval_stages(r.eval) for r in runs]
    return sorted(set.intersection(*sets)) if sets else []


def compare(runs: Sequence[GridRun], gt: dict, *, replicates: int = 1000, seed: int = 0,
            rows: Sequence[str] = ROWS) -> list[dict[str, Any]]:
    """Per stage: each row's seeds and AP mean / sd / per seed, the difference A - B with its 95 %
    bootstrap interval, and `within_fp32_spread` (|diff| <= sd of B's seeds; None with < 2 seeds)."""
    a, b = rows
    stages = _stages(runs)
    cmps = [Comparison(f"{a} stage {k} vs {b} stage {k}", a, k, b, k, "precision") for k in stages]
    boot, _ = bootstrap_comparisons(runs, cmps, gt, replicates=replicates, seed=seed)
    out = []
    for k, rec in zip(stages, boot):
        row: dict[str, Any] = {"stage": k}
        for name, tag in ((a, "a"), (b, "b")):
            mine = [r for r in runs if r.row == name]
            ap = np.array([100 * float(r.eval[f"stage{k}"]["AP"]) for r in mine])
            row.update({f"{tag}_seeds": [r.seed for r in mine], f"{tag}_AP": [round(x, 2) for x in ap],
                        f"{tag}_sd": _percent_sd(ap)})
        row.update({key: rec[key] for key in ("a_mean", "b_mean", "diff", "lo", "hi", "excludes_zero")})
        row["within_fp32_spread"] = (None if rec["diff"] is None or row["b_sd"] is None
                                     else bool(abs(rec["diff"]) <= row["b_sd"]))
        out.append(row)
    return out


def _f(v: Optional[float], d: int = 2) -> str:
    return "—" if v is None else f"{v:.{d}f}"


def markdown(records: Sequence[dict], runs: Sequence[GridRun], note: str, rows: Sequence[str] = ROWS) -> str:
    a, b = rows
    lines = [f"# {a} vs {b}: test AP per stage (AP points; {note})", "",
             f"| stage | {a} AP per seed | mean ± sd | {b} AP per seed | mean ± sd | Δ (A − B) | 95 % interval "
             f"| within the fp32 seed spread |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['stage']} | {', '.join(map(str, r['a_AP']))} | {_f(r['a_mean'])} ± {_f(r['a_sd'])} "
                     f"| {', '.join(map(str, r['b_AP']))} | {_f(r['b_mean'])} ± {_f(r['b_sd'])} | {_f(r['diff'])} "
                     f"| [{_f(r['lo'])}, {_f(r['hi'])}] | {'—' if r['within_fp32_spread'] is None else 'yes' if r['within_fp32_spread'] else 'no'} |")
    lines += ["", "| row | runs | torch threads per run | train_seconds per run | machine |", "|---|---|---|---|---|"]
    for row in rows:
        mine = [r for r in runs if r.row == row]
        machines = sorted({str(r.meta.get("machine", "?")) for r in mine})
        seconds = [_f(r.train.get("train_seconds"), 0) if "train_seconds" in r.train else "—" for r in mine]
        lines.append(f"| {row} | {len(mine)} | {', '.join(str(r.meta.get('threads', '?')) for r in mine)} "
                     f"| {', '.join(seconds)} | {'; '.join(machines)} |")
    return "\n".join(lines) + "\n"


def summarize(root: Path, *, replicates: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Load, compare, write <root>/table.md and table.csv. -> {"runs", "files", "records"}."""
    root = Path(root)
    runs = load_runs(root)
    if not any(r.row == ROWS[0] for r in runs) or not any(r.row == ROWS[1] for r in runs):
        raise GridDataError(f"{root}: needs runs of both {ROWS[0]} and {ROWS[1]} (scripts/precision_seed.sh "
                            f"bf16|fp32 SEED); found {sorted({r.row for r in runs})}")
    records = compare(runs, load_ground_truth(root), replicates=replicates, seed=seed)
    files = {"table_md": root / "table.md", "table_csv": root / "table.csv"}
    write_text(files["table_md"], markdown(records, runs, f"{replicates} bootstrap replicates, seed {seed}"))
    write_csv(files["table_csv"], [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
                                   for r in records])
    return {"runs": len(runs), "files": {k: str(v) for k, v in files.items()}, "records": records}


def main(argv: Optional[Sequence[str]] = None, prog: str = "okdpose precision") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="bf16 vs fp32 per stage from the committed run folders")
    t.add_argument("--root", type=Path, default=Path("results/precision"))
    t.add_argument("--replicates", type=int, default=1000)
    t.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        summary = summarize(args.root, replicates=args.replicates, seed=args.seed)
    except GridDataError as e:
        print(f"{prog}: {e}")
        return 2
    print(Path(summary["files"]["table_md"]).read_text(), end="")
    return 0
