"""The experiment grid's statistics: per-row mean ± sd over seeds and paired comparisons with
bootstrap intervals, from the committed per-run files (`okdpose grid collect`).

    runs = load_runs(Path("results/grid"))            # results/grid/runs/<row>-s<seed>/
    records = aggregate(runs)                          # one dict per (row, reported stage)
    compared, timing = bootstrap_comparisons(runs, comparisons(), load_ground_truth(root))
    write_report(Path("results/grid/stats"), records, compared)
    summarize_grid(root, out)                          # all of the above (`okdpose grid table`)

Legend: B bootstrap replicates, I test images, S seeds of a row; AP and the other fractions are
reported in % (AP points for differences), pixel errors in px.

Interval (hierarchical, paired over images): pycocotools evaluates every (run, stage) once
(`COCOeval.evaluate`); each replicate draws ONE image resample (with replacement, size I) that
every run sees, lays the already computed per-image results (`evalImgs`) out in the resample's
order (a duplicate gets its own position, so it counts twice) and lets pycocotools' own
`accumulate()` compute the precision; AP is read as `summarize()` does. Within the replicate the
seeds of each side are resampled too (independently: different networks, seeds are not paired),
and the difference is mean(A's AP over its resampled seeds) - mean(B's). The point estimate is the
difference of the seed means on the full test set; the interval is the 2.5 / 97.5 percentiles.
"""
from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import io
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from okdpose.grid import ROWS, ROWS_BY_NAME, GridRow

GT_FILE = "test_gt.json.gz"
RUNS_DIR = "runs"
FIX = "re-run `okdpose grid collect`"
PERCENT_KEYS = ("AP", "AR", "hmPCK50", "PCK10", "PCK20")   # fractions in eval.json, % in the table
PIXEL_KEYS = ("err_median_px",)
PAPER_KEYS = ("AP", "AR", "hmPCK50")


class GridDataError(ValueError):
    """A committed grid file is missing, malformed or inconsistent; the message names it and the fix."""


# --------------------------------------------------------------------------- loading

def _read_json(path: Path, what: str, fix: str = FIX) -> Any:
    if not path.is_file():
        raise GridDataError(f"{path}: {what} missing; {fix}")
    try:
        raw = path.read_bytes()
        return json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
    except (OSError, EOFError, ValueError) as e:      # gzip.BadGzipFile and JSONDecodeError are both here
        raise GridDataError(f"{path}: {what} is not valid {'gzip ' if path.suffix == '.gz' else ''}JSON "
                            f"({type(e).__name__}: {e}); {fix}") from e


def predictions_file(folder: Path, stage: int) -> Path:
    return folder / f"predictions_stage{stage}.json.gz"


@dataclass(frozen=True)
class GridRun:
    """One finished experiment = one (row, seed): its committed eval/train metrics and predictions."""

    name: str
    row: str
    seed: int
    eval: dict = field(repr=False)
    train: dict = field(repr=False)
    meta: dict = field(repr=False)
    folder: Path = field(repr=False)

    @property
    def grid_row(self) -> GridRow:
        return ROWS_BY_NAME[self.row]

    def results(self, stage: int) -> list[dict]:
        """The COCO keypoint results of `stage` (read on demand: they are the large part)."""
        data = _read_json(predictions_file(self.folder, stage), f"predictions of stage {stage}")
        if not isinstance(data, list):
            raise GridDataError(f"{predictions_file(self.folder, stage)}: expected a list of COCO results; {FIX}")
        return data


def load_ground_truth(root: Path, fix: str = FIX) -> dict:
    """The test split's COCO ground truth shared by every run (root/test_gt.json.gz)."""
    return _read_json(Path(root) / GT_FILE, "test ground truth", fix)


def ground_truth_sha256(root: Path, fix: str = FIX) -> str:
    path = Path(root) / GT_FILE
    _read_json(path, "test ground truth", fix)       # missing / malformed: the named error
    return hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()


def _load_run(folder: Path, gt_sha: str) -> Optional[GridRun]:
    meta = _read_json(folder / "meta.json", "run metadata")
    missing = [k for k in ("name", "row", "seed", "gt_sha256") if k not in meta]
    if missing:
        raise GridDataError(f"{folder / 'meta.json'}: missing key(s) {missing}; {FIX}")
    if meta["row"] not in ROWS_BY_NAME:
        warnings.warn(f"{folder}: row {meta['row']!r} is not a grid row (okdpose.grid.ROWS); skipped", stacklevel=3)
        return None
    if meta["gt_sha256"] != gt_sha:
        raise GridDataError(f"{folder / 'meta.json'}: gt_sha256 {meta['gt_sha256']} differs from the shared ground "
                            f"truth {GT_FILE} ({gt_sha}): the run was evaluated on another test split; re-run it "
                            f"or {FIX} with the matching ground truth")
    ev = _read_json(folder / "eval.json", "eval metrics")
    # collect copies train.json only when the experiment has one: without it, no training energy/time
    train = _read_json(folder / "train.json", "train metrics") if (folder / "train.json").exists() else {}
    row = ROWS_BY_NAME[meta["row"]]
    for stage in row.reported_stages:
        m = ev.get(f"stage{stage}") if isinstance(ev, dict) else None
        if not isinstance(m, dict) or "AP" not in m:
            raise GridDataError(f"{folder / 'eval.json'}: no stage{stage} metrics (row {row.name} reports stages "
                                f"{list(row.reported_stages)}); {FIX}")
        if not predictions_file(folder, stage).is_file():
            raise GridDataError(f"{predictions_file(folder, stage)}: predictions of stage {stage} missing; {FIX}")
    return GridRun(str(meta["name"]), row.name, int(meta["seed"]), ev, train if isinstance(train, dict) else {},
                   meta, folder)


def load_runs(root: Path) -> list[GridRun]:
    """Every run under root/runs/*/ (root: results/grid), sorted by (row order, seed).

    Raises GridDataError for a missing/malformed file, a run evaluated on other ground truth or two
    runs of the same (row, seed); runs of unknown rows are skipped with a warning."""
    root = Path(root)
    runs_dir = root / RUNS_DIR
    if not runs_dir.is_dir():
        raise GridDataError(f"{runs_dir}: no per-run folders; {FIX}")
    gt_sha = ground_truth_sha256(root)
    runs = [r for d in sorted(p for p in runs_dir.iterdir() if p.is_dir()) if (r := _load_run(d, gt_sha))]
    seen: dict[tuple[str, int], GridRun] = {}
    for r in runs:
        if (r.row, r.seed) in seen:
            raise GridDataError(f"{seen[r.row, r.seed].folder} and {r.folder}: two runs of {r.row} seed {r.seed}; "
                                f"remove one and {FIX}")
        seen[r.row, r.seed] = r
    order = {row.name: i for i, row in enumerate(ROWS)}
    return sorted(runs, key=lambda r: (order[r.row], r.seed))


# --------------------------------------------------------------------------- per-row table

def _mean_sd(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if not v.size:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    return _mean_sd(values)[0]


def _energy(record: Any) -> Optional[dict]:
    return record if isinstance(record, dict) and record.get("status") == "ok" else None


def energy_mode(record: dict) -> str:
    """'measured: intel_rapl' / 'estimate: cpu_load (TDP 8 W)' for an ok energy record."""
    mode = record.get("mode")
    cpu = mode.get("cpu", "unknown") if isinstance(mode, dict) else str(mode)
    return f"{'measured' if record.get('measured') else 'estimate'}: {cpu}"


def aggregate(runs: Sequence[GridRun]) -> list[dict[str, Any]]:
    """One record per (row, reported stage) in ROWS order; a row without runs has n_seeds 0 and Nones.

    Fractions are in %, err_median_px in px; `*_sd` is over seeds (ddof=1, None with one seed).
    Energy: train_kwh (train.json energy.kwh) and inference_kwh_per_image (the whole model's
    forward, eval.json energy.inference) are means over the runs whose record has status ok;
    energy_measured is True only if every such record was measured."""
    out = []
    for row in ROWS:
        mine = [r for r in runs if r.row == row.name]
        train_e = [e for r in mine if (e := _energy(r.train.get("energy")))]
        inf_e = [e for r in mine if (e := _energy((r.eval.get("energy") or {}).get("inference")))]
        durations = [(r.train.get("energy") or {}).get("duration_s") or r.train.get("train_seconds") for r in mine]
        energies = train_e + inf_e
        for i, stage in enumerate(row.reported_stages):
            stats = [r.eval[f"stage{stage}"] for r in mine]
            rec: dict[str, Any] = {"row": row.name, "stage": stage,
                                   "role": "teacher" if stage == row.reported_stages[-1] and row.couples
                                   else ("student" if row.couples else "plain"),
                                   "n_seeds": len(mine), "seeds": [r.seed for r in mine]}
            for key in PERCENT_KEYS + PIXEL_KEYS:
                scale = 100.0 if key in PERCENT_KEYS else 1.0
                vals = [None if s.get(key) is None else scale * float(s[key]) for s in stats]
                rec[f"{key}_mean"], rec[f"{key}_sd"] = _mean_sd(vals)
            rec["gflops"] = _mean([s.get("gflops") for s in stats])
            rec["params_M"] = _mean([s.get("params_M") for s in stats])
            rec["train_kwh"] = _mean([e.get("kwh") for e in train_e])
            rec["train_seconds"] = _mean(durations)
            rec["inference_kwh_per_image"] = _mean([e.get("kwh_per_image") for e in inf_e])
            rec["energy_measured"] = all(bool(e.get("measured")) for e in energies) if energies else None
            rec["energy_mode"] = "; ".join(sorted({energy_mode(e) for e in energies})) or None
            for key in PAPER_KEYS:
                rec[f"paper_{key}"] = row.paper[key][i] if row.paper else None
            out.append(rec)
    return out


# --------------------------------------------------------------------------- comparisons

@dataclass(frozen=True)
class Comparison:
    """A's stage vs B's stage; `kind`: student_vs_plain | teacher_vs_plain | ds_vs_nods | temperature_vs_t1."""

    label: str
    a_row: str
    a_stage: int
    b_row: str
    b_stage: int
    kind: str


def _cmp(a: GridRow, sa: int, b: GridRow, sb: int, kind: str) -> Comparison:
    return Comparison(f"{a.name} s{sa} vs {b.name} s{sb}", a.name, sa, b.name, sb, kind)


def comparisons(rows: Sequence[GridRow] = ROWS) -> list[Comparison]:
    """The paired comparisons a reviewer asks for, derived from the rows' definitions:
    KD student stage s vs the plain HRNet{s}; KD teacher vs the plain net of the same depth;
    each -DS row vs its twin without DS; each T != 1 row vs its T = 1 twin (every reported stage)."""
    plain = {r.n_stage: r for r in rows if not r.couples}
    def twin(r: GridRow, **change: Any) -> Optional[GridRow]:
        key = {"n_stage": r.n_stage, "couples": r.couples, "deep_supervision": r.deep_supervision,
               "temperature": r.temperature, **change}
        return next((o for o in rows if all(getattr(o, k) == v for k, v in key.items())), None)
    out: list[Comparison] = []
    kd = [r for r in rows if r.couples]
    for r in kd:
        out += [_cmp(r, s, plain[s], s, "student_vs_plain") for s in r.reported_stages[:-1] if s in plain]
    for r in kd:
        t = r.reported_stages[-1]
        if r.n_stage in plain:
            out.append(_cmp(r, t, plain[r.n_stage], r.n_stage, "teacher_vs_plain"))
    for r in kd:
        if r.deep_supervision and (b := twin(r, deep_supervision=False)):
            out += [_cmp(r, s, b, s, "ds_vs_nods") for s in r.reported_stages]
    for r in kd:
        if r.temperature != 1.0 and (b := twin(r, temperature=1.0)):
            out += [_cmp(r, s, b, s, "temperature_vs_t1") for s in r.reported_stages]
    return out


# --------------------------------------------------------------------------- AP on image resamples

def _quiet() -> contextlib.AbstractContextManager:
    return contextlib.redirect_stdout(io.StringIO())   # pycocotools prints progress on every call


def coco_ground_truth(gt: dict) -> Any:
    from pycocotools.coco import COCO

    with _quiet():
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
    return coco


def sigmas_for(gt: dict) -> np.ndarray:
    """The OKS sigmas of the joint spec whose category id and joint count match the ground truth."""
    from okdpose.joints import JOINT_SPECS

    cats = gt.get("categories") or [{}]
    cid, n = cats[0].get("id"), len(cats[0].get("keypoints") or ())
    for spec in JOINT_SPECS.values():
        if spec.category_id == cid and spec.num_joints == n:
            return spec.sigmas_array
    raise GridDataError(f"ground truth category {cid} with {n} keypoints matches no joint spec in okdpose.joints")


def check_results(path: Path, results: Sequence[Any], gt: Any) -> None:
    """GridDataError naming `path`, the entry and the field when a COCO keypoint result cannot be
    scored against the ground truth `gt` (a pycocotools COCO): an image id it does not hold, another
    category, keypoints that are not 3 x its joint count finite numbers, a non-finite score.
    pycocotools would stop with a bare assertion or a KeyError, or go on with a NaN silently."""
    image_ids, cats = set(gt.getImgIds()), gt.dataset.get("categories") or [{}]
    cat_ids = {c.get("id") for c in cats}
    n = 3 * len(cats[0].get("keypoints") or ())

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for i, r in enumerate(results):
        where = f"{path}: result {i}"
        if not isinstance(r, dict):
            raise GridDataError(f"{where} is {type(r).__name__}, not a COCO result object; {FIX}")
        missing = [k for k in ("image_id", "category_id", "keypoints", "score") if k not in r]
        if missing:
            raise GridDataError(f"{where} has no {', '.join(missing)}; {FIX}")
        if not (number(r["image_id"]) and r["image_id"] == int(r["image_id"])) or int(r["image_id"]) not in image_ids:
            raise GridDataError(f"{where}: image_id {r['image_id']!r} is not an image of the shared ground truth "
                                f"{GT_FILE} ({len(image_ids)} images): these predictions are of another test split; "
                                f"re-run the experiment, then `okdpose grid collect`")
        if not (number(r["category_id"]) and r["category_id"] in cat_ids):      # a list would not hash
            raise GridDataError(f"{where}: category_id {r['category_id']!r} is not the ground truth's "
                                f"{sorted(cat_ids)}; {FIX}")
        kp = r["keypoints"]
        if not isinstance(kp, list) or len(kp) != n or not all(number(v) for v in kp):
            what = f"{len(kp)} values" if isinstance(kp, list) else type(kp).__name__
            raise GridDataError(f"{where}: keypoints must be {n} finite numbers (x, y, v per joint), got {what}"
                                f"{' with non-numbers or NaN/inf' if isinstance(kp, list) and len(kp) == n else ''}; "
                                f"{FIX}")
        if not number(r["score"]):
            raise GridDataError(f"{where}: score {r['score']!r} is not a finite number; {FIX}")


class ResampledAP:
    """pycocotools' per-image evaluation of one results list, re-accumulated on image resamples.

    `ap(idx)`: AP on the images `idx` (indices into `img_ids`, duplicates allowed) with
    `COCOeval.accumulate()`; `ap(arange(I))` equals `COCOeval.stats[0]`. Only the area range 'all'
    is laid out and accumulated (the only one AP reads), which makes `accumulate` ~2x faster."""

    def __init__(self, gt: Any, results: Sequence[dict], sigmas: Sequence[float]):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with _quiet():
            if results:
                dt = gt.loadRes(copy.deepcopy(list(results)))
            else:   # loadRes cannot take an empty list
                dt = COCO()
                dt.dataset = {"images": list(gt.dataset["images"]), "categories": gt.dataset["categories"],
                              "annotations": []}
                dt.createIndex()
            ev = COCOeval(gt, dt, "keypoints")
            ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
            ev.evaluate()
        pe = ev._paramsEval
        n_img, n_area = len(pe.imgIds), len(pe.areaRng)
        a = pe.areaRngLbl.index("all")
        n_cat = len(pe.catIds) if pe.useCats else 1
        # evalImgs is laid out [category][area range][image]; keep the 'all' block of each category
        self._blocks = [ev.evalImgs[(k * n_area + a) * n_img:(k * n_area + a + 1) * n_img] for k in range(n_cat)]
        self.img_ids = list(pe.imgIds)
        p = copy.deepcopy(pe)
        p.areaRng, p.areaRngLbl = [pe.areaRng[a]], ["all"]
        ev.params, ev._paramsEval = p, copy.deepcopy(p)
        self._ev, self._n = ev, -1

    def ap(self, idx: np.ndarray) -> float:
        ev = self._ev
        if len(idx) != self._n:      # accumulate offsets into evalImgs by the position in imgIds
            self._n = len(idx)
            ev.params.imgIds = list(range(self._n))
            ev._paramsEval.imgIds = list(range(self._n))
        ev.evalImgs = [block[i] for block in self._blocks for i in idx]
        with _quiet():
            ev.accumulate()
        prec = ev.eval["precision"][:, :, :, 0, -1]   # (T, R, K) at area 'all', the largest maxDets
        valid = prec[prec > -1]
        return float(valid.mean()) if valid.size else -1.0


def _percent_sd(values: np.ndarray) -> Optional[float]:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def bootstrap_comparisons(runs: Sequence[GridRun], compare: Sequence[Comparison], gt: dict, *,
                          replicates: int = 1000, seed: int = 0, sigmas: Optional[Sequence[float]] = None,
                          progress: Optional[Callable[[str], None]] = None) -> tuple[list[dict], dict]:
    """Each comparison's AP difference (A - B, AP points) with its hierarchical bootstrap interval.

    -> (records, timing). A record: the comparison's fields, n_a, n_b, a_mean, b_mean, diff, lo, hi
    (2.5 / 97.5 percentiles), excludes_zero, seed_sd (sqrt(sd_A^2/n_A + sd_B^2/n_B): the spread of
    the difference from seeds alone, None with < 2 seeds a side), replicates. A comparison with no
    runs on a side has its n and Nones. timing: pairs, replicates, seconds, ms_per_accumulate."""
    if replicates < 1:
        raise ValueError(f"replicates must be >= 1, got {replicates}")
    by_row: dict[str, list[GridRun]] = {}
    for r in runs:
        by_row.setdefault(r.row, []).append(r)
    doable = [c for c in compare if by_row.get(c.a_row) and by_row.get(c.b_row)]
    pairs = sorted({(r.name, c.a_stage) for c in doable for r in by_row[c.a_row]}
                   | {(r.name, c.b_stage) for c in doable for r in by_row[c.b_row]})
    run_of = {r.name: r for r in runs}
    coco = coco_ground_truth(gt)
    sigmas = sigmas_for(gt) if sigmas is None else np.asarray(sigmas, np.float64)
    n_img = len(coco.getImgIds())
    rng = np.random.default_rng(seed)
    images = rng.integers(0, n_img, size=(replicates, n_img))       # (B, I) shared by every run: paired
    full, boot = {}, {}
    start, acc_seconds = time.perf_counter(), 0.0
    for j, (name, stage) in enumerate(pairs):
        run = run_of[name]
        results = run.results(stage)
        check_results(predictions_file(run.folder, stage), results, coco)
        res = ResampledAP(coco, results, sigmas)
        full[name, stage] = 100.0 * res.ap(np.arange(n_img))
        recorded = 100.0 * float(run.eval[f"stage{stage}"]["AP"])
        if abs(full[name, stage] - recorded) > 1e-4:
            warnings.warn(f"{run.folder}: stage {stage} AP from its predictions ({full[name, stage]:.4f}) differs "
                          f"from eval.json ({recorded:.4f}); the predictions may not be the evaluated ones", stacklevel=2)
        t0 = time.perf_counter()
        boot[name, stage] = 100.0 * np.array([res.ap(idx) for idx in images])   # (B,)
        acc_seconds += time.perf_counter() - t0
        if progress:
            progress(f"bootstrap: {j + 1}/{len(pairs)} (run, stage) pairs, {name} stage {stage}")
    out = []
    for c in compare:
        a_runs, b_runs = by_row.get(c.a_row, []), by_row.get(c.b_row, [])
        rec: dict[str, Any] = {**c.__dict__, "n_a": len(a_runs), "n_b": len(b_runs), "a_mean": None, "b_mean": None,
                               "diff": None, "lo": None, "hi": None, "excludes_zero": None, "seed_sd": None,
                               "replicates": 0}
        if a_runs and b_runs:
            fa = np.array([full[r.name, c.a_stage] for r in a_runs])
            fb = np.array([full[r.name, c.b_stage] for r in b_runs])
            ba = np.stack([boot[r.name, c.a_stage] for r in a_runs], axis=1)   # (B, S_A)
            bb = np.stack([boot[r.name, c.b_stage] for r in b_runs], axis=1)   # (B, S_B)
            sa = rng.integers(0, len(a_runs), size=(replicates, len(a_runs)))  # seeds resampled per side
            sb = rng.integers(0, len(b_runs), size=(replicates, len(b_runs)))
            diffs = np.take_along_axis(ba, sa, 1).mean(1) - np.take_along_axis(bb, sb, 1).mean(1)   # (B,)
            lo, hi = (float(v) for v in np.percentile(diffs, [2.5, 97.5]))
            sd_a, sd_b = _percent_sd(fa), _percent_sd(fb)
            rec.update(a_mean=float(fa.mean()), b_mean=float(fb.mean()), diff=float(fa.mean() - fb.mean()),
                       lo=lo, hi=hi, excludes_zero=bool(lo > 0 or hi < 0), replicates=replicates,
                       seed_sd=None if sd_a is None or sd_b is None
                       else math.sqrt(sd_a ** 2 / len(fa) + sd_b ** 2 / len(fb)))
        out.append(rec)
    n_acc = len(pairs) * replicates
    timing = {"pairs": len(pairs), "replicates": replicates, "seconds": round(time.perf_counter() - start, 2),
              "ms_per_accumulate": round(1000 * acc_seconds / n_acc, 3) if n_acc else None}
    return out, timing


# --------------------------------------------------------------------------- report

def _energy_unit(kwh_values: Sequence[Optional[float]]) -> tuple[str, float]:
    """The unit (kWh, Wh or mWh) in which the largest value reads >= 1, and its factor from kWh."""
    vals = [v for v in kwh_values if v]
    top = max(vals) if vals else 1.0
    for unit, factor in (("kWh", 1.0), ("Wh", 1e3), ("mWh", 1e6)):
        if top * factor >= 1:
            return unit, factor
    return "µWh", 1e9


def _f(v: Optional[float], digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _pm(rec: dict, key: str, digits: int = 2) -> str:
    if rec[f"{key}_mean"] is None:
        return "–"
    sd = rec[f"{key}_sd"]
    return _f(rec[f"{key}_mean"], digits) + ("" if sd is None else f" ± {_f(sd, digits)}")


def markdown_report(records: Sequence[dict], compared: Sequence[dict], note: str = "") -> str:
    """table.md: per-row stage metrics (student(s) / teacher), then the comparisons, then energy provenance."""
    train_unit, train_f = _energy_unit([r["train_kwh"] for r in records])
    inf_unit, inf_f = _energy_unit([r["inference_kwh_per_image"] for r in records])
    head = ["row", "stages", "n", "AP % mean ± sd", "AP % (paper)", "AR %", "hmPCK50 %", "median err px",
            "GFLOPs", f"train energy ({train_unit})", "train time (s)", f"inference ({inf_unit}/image)"]
    lines = ["Test metrics over seeds (mean ± sd, ddof 1; n = seeds). Several stages: student(s) / teacher. "
             "Paper values: Cacciatore et al. 2025 (W32, COCO-pretrained, real BabyPose).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        recs = [r for r in records if r["row"] == row.name]
        if not recs:
            continue
        first, join = recs[0], (lambda xs: " / ".join(xs))
        scale = (lambda v, f: None if v is None else v * f)
        lines.append("| " + " | ".join([
            row.name, join(str(r["stage"]) for r in recs), str(first["n_seeds"]),
            join(_pm(r, "AP") for r in recs), join(_f(r["paper_AP"]) for r in recs),
            join(_pm(r, "AR") for r in recs), join(_pm(r, "hmPCK50") for r in recs),
            join(_pm(r, "err_median_px", 1) for r in recs), join(_f(r["gflops"], 3) for r in recs),
            _f(scale(first["train_kwh"], train_f), 3), _f(first["train_seconds"], 0),
            _f(scale(first["inference_kwh_per_image"], inf_f), 3)]) + " |")
    lines += ["", "Paired comparisons: ΔAP = A - B in AP points, 95% hierarchical bootstrap interval (test images "
              "resampled, shared by both sides; seeds resampled per side); seed sd: the difference's spread from "
              "seeds alone.", "",
              "| comparison | kind | n A / n B | ΔAP [2.5%, 97.5%] | seed sd | excludes 0 |", "|---|---|---|---|---|---|"]
    one_seed = False
    for c in compared:
        if c["diff"] is None:
            cell, mark = "– (no runs)", "–"
        else:
            cell, mark = f"{c['diff']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]", "✓" if c["excludes_zero"] else "✗"
            if min(c["n_a"], c["n_b"]) < 2:      # one seed on a side: its seed spread cannot be in the interval
                cell, one_seed = cell + " ¹", True
        lines.append(f"| {c['label']} | {c['kind']} | {c['n_a']} / {c['n_b']} | {cell} | {_f(c['seed_sd'])} | {mark} |")
    if one_seed:
        lines += ["", "¹ one seed on a side: the interval covers the test images only, not the seed-to-seed spread "
                      "(which at this scale can be several AP points); read it as a lower bound on the uncertainty."]
    modes = sorted({m for r in records if r["energy_mode"] for m in r["energy_mode"].split("; ")})
    measured = [r["energy_measured"] for r in records if r["energy_measured"] is not None]
    if not modes:
        energy = "Energy: not recorded (energy off or unavailable in every run)."
    else:
        how = "measured with power counters" if all(measured) else "ESTIMATED (not measured)" if not any(measured) \
            else "partly measured, partly estimated"
        energy = (f"Energy: {how} by codecarbon (offline); CPU mode: {', '.join(modes)}. Training energy is the "
                  "training run's total; inference energy is the whole model's forward per test image.")
    lines += ["", energy]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def plot_ap_per_stage(records: Sequence[dict], path: Path) -> Path:
    """ap_per_stage.png: rows on one axis, AP (mean, error bar sd over seeds) per reported stage, paper AP as x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row.name for row in ROWS]
    stages = sorted({r["stage"] for r in records})
    colors = {s: c for s, c in zip(stages, plt.get_cmap("tab10").colors)}
    width = 0.8 / max(len(stages), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.7 * len(names)), 5.0), dpi=110)
    for si, s in enumerate(stages):
        xs, ys, es, px, py = [], [], [], [], []
        for x, name in enumerate(names):
            for r in records:
                if r["row"] == name and r["stage"] == s:
                    dx = x - 0.4 + width * (si + 0.5)
                    if r["AP_mean"] is not None:
                        xs.append(dx), ys.append(r["AP_mean"]), es.append(r["AP_sd"] or 0.0)
                    if r["paper_AP"] is not None:
                        px.append(dx), py.append(r["paper_AP"])
        ax.errorbar(xs, ys, yerr=es, fmt="o", color=colors[s], capsize=3, label=f"stage {s} (ours, ± sd)")
        ax.plot(px, py, "x", color=colors[s], alpha=0.6, label=f"stage {s} (paper)")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    for x in range(len(names) - 1):
        ax.axvline(x + 0.5, color="0.9", lw=0.8, zorder=0)     # row separators
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_ylabel("test AP (%)")
    ax.set_title("AP per reported stage over seeds (mean ± sd); x: paper")
    ax.grid(axis="y", alpha=0.3)
    if stages:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # outside: never hides a point
    fig.tight_layout()
    from okdpose.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _csv_ready(records: Sequence[dict]) -> list[dict]:
    return [{k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()} for r in records]


def write_report(out: Path, records: Sequence[dict], compared: Sequence[dict], *, note: str = "") -> dict[str, Path]:
    """out/table.md, out/table.csv (aggregate records), out/comparisons.csv, out/ap_per_stage.png."""
    from okdpose.files import write_csv, write_text

    out = Path(out)
    files = {"table_md": out / "table.md", "table_csv": out / "table.csv",
             "comparisons_csv": out / "comparisons.csv", "plot": out / "ap_per_stage.png"}
    write_text(files["table_md"], markdown_report(records, compared, note))
    write_csv(files["table_csv"], _csv_ready(records))
    write_csv(files["comparisons_csv"], _csv_ready(compared))
    plot_ap_per_stage(records, files["plot"])
    return files


def summarize_grid(root: Path, out: Path, *, replicates: int = 1000, seed: int = 0,
                   progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Load root/runs, aggregate, bootstrap the comparisons, write the report to `out`.

    -> {"runs", "rows_with_runs", "files" (str paths), "timing", "comparisons"}: JSON-printable."""
    root = Path(root)
    runs = load_runs(root)
    records = aggregate(runs)
    compared, timing = bootstrap_comparisons(runs, comparisons(), load_ground_truth(root), replicates=replicates,
                                             seed=seed, progress=progress)
    note = (f"{len(runs)} runs; {replicates} bootstrap replicates, seed {seed}; "
            f"{timing['pairs']} (run, stage) evaluations, {timing['seconds']} s.")
    files = write_report(out, records, compared, note=note)
    return {"runs": len(runs), "rows_with_runs": len({r.row for r in runs}),
            "files": {k: str(v) for k, v in files.items()}, "timing": timing,
            "comparisons": [{k: c[k] for k in ("label", "n_a", "n_b", "diff", "lo", "hi", "excludes_zero")}
                            for c in compared]}
