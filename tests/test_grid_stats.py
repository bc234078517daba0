"""Grid statistics on tiny fake run folders: a 16-image COCO ground truth (12 keypoints) and
predictions = ground truth + controlled noise ("better" 3 px, "worse" 8 px)."""
from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from okdpose.grid import ROWS, ROWS_BY_NAME
from okdpose.grid_stats import (
    Comparison,
    GridDataError,
    ResampledAP,
    aggregate,
    bootstrap_comparisons,
    coco_ground_truth,
    comparisons,
    load_ground_truth,
    load_runs,
    sigmas_for,
    summarize_grid,
    write_report,
)
from okdpose.joints import BABYPOSE12
from okdpose.metrics import coco_keypoint_ap

N_IMG, J = 16, 12


def make_gt(n_img: int = N_IMG, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, n_img + 1):
        x0, y0 = rng.uniform(20, 60, 2)
        kp = np.concatenate([rng.uniform([x0, y0], [x0 + 100, y0 + 120], (J, 2)), np.full((J, 1), 2.0)], 1)
        images.append({"id": i, "file_name": f"{i}.png", "width": 200, "height": 200})
        anns.append({"id": i, "image_id": i, "category_id": BABYPOSE12.category_id, "iscrowd": 0,
                     "keypoints": kp.ravel().round(2).tolist(), "num_keypoints": J,
                     "bbox": [float(x0), float(y0), 100.0, 120.0], "area": 12000.0})
    return {"images": images, "annotations": anns, "categories": [BABYPOSE12.coco_category()]}


def noisy(gt: dict, px: float, seed: int) -> list[dict]:
    """One prediction per image: the annotation's joints + N(0, px) noise, a random score."""
    rng = np.random.default_rng(seed)
    out = []
    for a in gt["annotations"]:
        kp = np.asarray(a["keypoints"], np.float64).reshape(J, 3)
        kp[:, :2] += rng.normal(0, px, (J, 2))
        kp[:, 2] = 0.9
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "keypoints": kp.ravel().tolist(),
                    "score": float(rng.uniform(0.3, 1.0))})
    return out


def _gz(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(json.dumps(obj).encode()))


def write_gt(root: Path, gt: dict) -> str:
    raw = json.dumps(gt).encode()
    (root).mkdir(parents=True, exist_ok=True)
    (root / "test_gt.json.gz").write_bytes(gzip.compress(raw))
    return hashlib.sha256(raw).hexdigest()


def make_run(root: Path, gt: dict, row: str, seed: int, preds: dict[int, list[dict]], *, sha: str | None = None,
             stage_extra: dict | None = None, energy: dict | None = None) -> Path:
    """A run folder as `okdpose grid collect` writes it; eval.json AP computed by the project's own
    `coco_keypoint_ap` (what the evaluate stage records)."""
    folder = root / "runs" / f"{row}-s{seed}"
    folder.mkdir(parents=True)
    gt_sha = sha or hashlib.sha256(json.dumps(gt).encode()).hexdigest()
    meta = {"name": folder.name, "row": row, "seed": seed, "rev": "abc", "baseline": "main", "timestamp": "t",
            "overrides": {}, "gt_sha256": gt_sha}
    ev = {"split": "test", "use_gt_bbox": True, "flip_test": False}
    for k, res in preds.items():
        ev[f"stage{k}"] = {**coco_keypoint_ap(gt, res, BABYPOSE12.sigmas), "hmPCK50": 0.5, "PCK10": 0.4,
                           "PCK20": 0.8, "err_mean_px": 3.0, "err_median_px": 2.0, "params_M": 1.0 + k,
                           "gflops": 0.1 * k, "latency_ms": 5.0, **(stage_extra or {}).get(k, {})}
        _gz(folder / f"predictions_stage{k}.json.gz", res)
    if energy is not None:
        ev["energy"] = {"inference": energy["inference"]}
    train = {"best": {}, "train_seconds": 100.0 + seed, "energy": (energy or {}).get("train", {"status": "off"})}
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "eval.json").write_text(json.dumps(ev))
    (folder / "train.json").write_text(json.dumps(train))
    return folder


def stages_of(row: str, res: list[dict]) -> dict[int, list[dict]]:
    return {s: res for s in ROWS_BY_NAME[row].reported_stages}


@pytest.fixture
def gt():
    return make_gt()


def _ev(gt: dict, res: list[dict], img_ids=None):
    """The plain pycocotools route: evaluate / accumulate / summarize -> stats."""
    from pycocotools.cocoeval import COCOeval

    coco = coco_ground_truth(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(res)), "keypoints")
        ev.params.kpt_oks_sigmas = BABYPOSE12.sigmas_array
        if img_ids is not None:
            ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


# --------------------------------------------------------------------------- comparisons from ROWS

def test_comparisons_are_derived_from_rows():
    pairs = {(c.a_row, c.a_stage, c.b_row, c.b_stage): c.kind for c in comparisons()}
    assert pairs[("HRNet4-OKD", 3, "HRNet3", 3)] == "student_vs_plain"
    assert pairs[("HRNet4-MSOKD", 2, "HRNet2", 2)] == "student_vs_plain"
    assert pairs[("HRNet4-OKD", 4, "HRNet4", 4)] == "teacher_vs_plain"
    assert pairs[("HRNet3-OKD", 3, "HRNet3", 3)] == "teacher_vs_plain"
    assert pairs[("HRNet4-OKD-DS", 4, "HRNet4-OKD", 4)] == "ds_vs_nods"
    assert pairs[("HRNet4-OKD-DS-T5", 3, "HRNet4-OKD-T5", 3)] == "ds_vs_nods"
    assert pairs[("HRNet4-OKD-T2", 3, "HRNet4-OKD", 3)] == "temperature_vs_t1"
    assert pairs[("HRNet4-OKD-DS-T10", 4, "HRNet4-OKD-DS", 4)] == "temperature_vs_t1"
    kinds = [c.kind for c in comparisons()]
    assert kinds.count("teacher_vs_plain") == sum(1 for r in ROWS if r.couples)
    assert kinds.count("temperature_vs_t1") == 6 * 2          # 6 T rows x stages (3, 4)
    assert all(c.a_row != c.b_row for c in comparisons())
    assert ("HRNet4", 4, "HRNet4", 4) not in pairs                # plain rows are only B sides


# --------------------------------------------------------------------------- AP on resamples

def test_identity_resample_equals_pycocotools_and_the_recorded_ap(gt):
    res = noisy(gt, 4.0, seed=1)
    r = ResampledAP(coco_ground_truth(gt), res, sigmas_for(gt))
    ap = r.ap(np.arange(N_IMG))
    assert 0.1 < ap < 0.99                                        # a non-trivial case
    assert ap == _ev(gt, res)[0]
    assert ap == coco_keypoint_ap(gt, res, BABYPOSE12.sigmas)["AP"]   # what eval.json holds
    assert r.ap(np.arange(N_IMG)) == ap                            # re-usable after other resamples


def test_duplicated_images_count_twice(gt):
    res = noisy(gt, 4.0, seed=2)
    r = ResampledAP(coco_ground_truth(gt), res, sigmas_for(gt))
    ids = r.img_ids
    for j in (0, 5):     # one image drawn n times gives that image's own AP
        assert r.ap(np.full(N_IMG, j)) == pytest.approx(_ev(gt, res, [ids[j]])[0], abs=1e-12)
    # images 0, 0, 1 == pycocotools on a data set where image 0 is physically there twice
    g2 = make_gt()
    keep = {ids[0], ids[1]}
    g2["images"] = [i for i in g2["images"] if i["id"] in keep] + [{**g2["images"][0], "id": 99}]
    dup = [a for a in g2["annotations"] if a["image_id"] == ids[0]][0]
    g2["annotations"] = [a for a in g2["annotations"] if a["image_id"] in keep] + [{**dup, "id": 99, "image_id": 99}]
    r2 = [p for p in res if p["image_id"] in keep] + [{**p, "image_id": 99} for p in res if p["image_id"] == ids[0]]
    expected = _ev(g2, r2)[0]
    assert r.ap(np.array([0, 0, 1])) == pytest.approx(expected, abs=1e-12)
    assert r.ap(np.array([0, 0, 1])) != pytest.approx(r.ap(np.array([0, 1])))   # the duplicate weighs


def _grid(tmp_path: Path, gt: dict, a_px: float, b_px: float, same: bool = False, seeds=(0, 1, 2)) -> Path:
    root = tmp_path / "grid"
    write_gt(root, gt)
    for s in seeds:
        a = noisy(gt, a_px, seed=100 + s)
        make_run(root, gt, "HRNet4-OKD", s, stages_of("HRNet4-OKD", a))
        make_run(root, gt, "HRNet3", s, stages_of("HRNet3", a if same else noisy(gt, b_px, seed=200 + s)))
    return root


CMP = Comparison("HRNet4-OKD s3 vs HRNet3 s3", "HRNet4-OKD", 3, "HRNet3", 3, "student_vs_plain")


def test_clearly_better_run_excludes_zero_identical_runs_contain_it(tmp_path, gt):
    root = _grid(tmp_path / "a", gt, 3.0, 8.0)
    (rec,), timing = bootstrap_comparisons(load_runs(root), [CMP], load_ground_truth(root), replicates=200)
    assert rec["n_a"] == rec["n_b"] == 3 and rec["diff"] > 20
    assert rec["lo"] > 0 and rec["excludes_zero"] is True and rec["lo"] <= rec["diff"] <= rec["hi"]
    assert rec["seed_sd"] is not None and timing["pairs"] == 6 and timing["ms_per_accumulate"] > 0
    runs = load_runs(root)
    a = [r for r in runs if r.row == "HRNet4-OKD"]
    assert rec["a_mean"] == pytest.approx(np.mean([100 * r.eval["stage3"]["AP"] for r in a]))

    root = _grid(tmp_path / "b", gt, 4.0, 4.0, same=True)
    (rec,), _ = bootstrap_comparisons(load_runs(root), [CMP], load_ground_truth(root), replicates=200)
    assert rec["diff"] == 0.0 and rec["lo"] <= 0.0 <= rec["hi"] and rec["excludes_zero"] is False


def test_bootstrap_is_reproducible_and_rows_without_runs_are_reported(tmp_path, gt):
    root = _grid(tmp_path, gt, 3.0, 4.0, seeds=(0, 1))
    runs, g = load_runs(root), load_ground_truth(root)
    empty = Comparison("x", "HRNet4-MSOKD", 2, "HRNet2", 2, "student_vs_plain")
    one, _ = bootstrap_comparisons(runs, [CMP, empty], g, replicates=100, seed=7)
    two, _ = bootstrap_comparisons(runs, [CMP, empty], g, replicates=100, seed=7)
    other, _ = bootstrap_comparisons(runs, [CMP, empty], g, replicates=100, seed=8)
    assert one == two and (one[0]["lo"], one[0]["hi"]) != (other[0]["lo"], other[0]["hi"])
    assert one[1]["n_a"] == one[1]["n_b"] == 0 and one[1]["diff"] is None and one[1]["excludes_zero"] is None


# --------------------------------------------------------------------------- per-row table

def test_aggregate_means_sds_energy_and_paper(tmp_path, gt):
    root = tmp_path / "grid"
    write_gt(root, gt)
    res = noisy(gt, 3.0, seed=0)
    e = lambda kwh, measured: {"train": {"status": "ok", "kwh": kwh, "duration_s": 50.0, "measured": measured,   # noqa: E731
                                         "mode": {"cpu": "cpu_load (TDP 8 W)", "ram": "estimate (size)"}},
                               "inference": {"status": "ok", "kwh_per_image": kwh / 1e4, "measured": measured,
                                             "mode": {"cpu": "cpu_load (TDP 8 W)"}}}
    make_run(root, gt, "HRNet4-OKD", 0, stages_of("HRNet4-OKD", res), stage_extra={3: {"AR": 0.5}}, energy=e(0.002, False))
    make_run(root, gt, "HRNet4-OKD", 1, stages_of("HRNet4-OKD", res), stage_extra={3: {"AR": 0.7}}, energy=e(0.004, False))
    make_run(root, gt, "HRNet2", 0, stages_of("HRNet2", res))
    recs = aggregate(load_runs(root))
    assert [(r["row"], r["stage"]) for r in recs] == [(row.name, s) for row in ROWS for s in row.reported_stages]
    okd3 = next(r for r in recs if (r["row"], r["stage"]) == ("HRNet4-OKD", 3))
    assert okd3["n_seeds"] == 2 and okd3["seeds"] == [0, 1] and okd3["role"] == "student"
    assert okd3["AR_mean"] == pytest.approx(60.0) and okd3["AR_sd"] == pytest.approx(math.sqrt(200))
    assert okd3["hmPCK50_mean"] == pytest.approx(50.0) and okd3["err_median_px_mean"] == 2.0
    assert okd3["gflops"] == pytest.approx(0.3) and okd3["params_M"] == 4.0
    assert okd3["train_kwh"] == pytest.approx(0.003) and okd3["train_seconds"] == 50.0
    assert okd3["inference_kwh_per_image"] == pytest.approx(3e-7)
    assert okd3["energy_measured"] is False and okd3["energy_mode"] == "estimate: cpu_load (TDP 8 W)"
    assert okd3["paper_AP"] == 92.63 and okd3["paper_hmPCK50"] == 87.24
    plain2 = next(r for r in recs if r["row"] == "HRNet2")
    assert plain2["n_seeds"] == 1 and plain2["AP_sd"] is None and plain2["train_kwh"] is None   # energy off
    assert plain2["train_seconds"] == 100.0 and plain2["energy_mode"] is None
    empty = next(r for r in recs if r["row"] == "HRNet4-OKD-T5")
    assert empty["n_seeds"] == 0 and empty["AP_mean"] is None and empty["paper_AP"] is None


# --------------------------------------------------------------------------- bad inputs

def test_malformed_files_name_the_file_and_the_fix(tmp_path, gt):
    root = _grid(tmp_path, gt, 2.0, 4.0, seeds=(0,))
    (root / "runs" / "HRNet3-s0" / "eval.json").write_text("{not json")
    with pytest.raises(GridDataError, match=r"HRNet3-s0/eval.json.*okdpose grid collect"):
        load_runs(root)
    (root / "runs" / "HRNet3-s0" / "eval.json").unlink()
    with pytest.raises(GridDataError, match=r"HRNet3-s0/eval.json: eval metrics missing"):
        load_runs(root)
    shutil.rmtree(root / "runs" / "HRNet3-s0")
    (root / "runs" / "HRNet4-OKD-s0" / "train.json").write_text("[1,")
    with pytest.raises(GridDataError, match=r"HRNet4-OKD-s0/train.json: train metrics is not valid JSON"):
        load_runs(root)
    (root / "runs" / "HRNet4-OKD-s0" / "train.json").unlink()     # collect omits it when there is none
    assert [(r.row, r.train) for r in load_runs(root) if r.row == "HRNet4-OKD"] == [("HRNet4-OKD", {})]


def test_missing_predictions_and_ground_truth_are_named(tmp_path, gt):
    root = _grid(tmp_path, gt, 2.0, 4.0, seeds=(0,))
    (root / "runs" / "HRNet4-OKD-s0" / "predictions_stage3.json.gz").unlink()
    with pytest.raises(GridDataError, match=r"predictions_stage3.json.gz: predictions of stage 3 missing"):
        load_runs(root)
    (root / "test_gt.json.gz").write_bytes(b"not gzip")
    with pytest.raises(GridDataError, match=r"test_gt.json.gz: test ground truth is not valid gzip JSON"):
        load_runs(root)


def test_other_ground_truth_and_unknown_rows(tmp_path, gt):
    root = tmp_path / "grid"
    real = write_gt(root, gt)
    res = noisy(gt, 2.0, seed=0)
    make_run(root, gt, "HRNet-bogus", 0, {4: res})
    make_run(root, gt, "HRNet4", 0, {4: res})
    with pytest.warns(UserWarning, match="HRNet-bogus.*skipped"):
        assert [r.row for r in load_runs(root)] == ["HRNet4"]
    shutil.rmtree(root / "runs" / "HRNet-bogus-s0")
    make_run(root, gt, "HRNet3", 0, {3: res}, sha="f" * 64)
    with pytest.raises(GridDataError, match=f"{'f' * 64}.*{real}"):
        load_runs(root)


@pytest.mark.parametrize("change, words", [
    (lambda r: r.update(image_id=10**9), ["result 3", "image_id 1000000000", f"({N_IMG} images)", "another test split"]),
    (lambda r: r.update(image_id=1.5), ["result 3", "image_id 1.5"]),
    (lambda r: r.update(category_id=7), ["result 3", "category_id 7", f"[{BABYPOSE12.category_id}]"]),
    (lambda r: r.update(category_id=[BABYPOSE12.category_id]), ["result 3", f"category_id [{BABYPOSE12.category_id}]"]),
    (lambda r: r.update(keypoints=r["keypoints"][:-3]), ["result 3", f"{3 * J} finite numbers", f"got {3 * J - 3} values"]),
    (lambda r: r["keypoints"].__setitem__(4, float("nan")), ["result 3", "NaN/inf"]),
    (lambda r: r["keypoints"].__setitem__(4, "7"), ["result 3", "non-numbers"]),
    (lambda r: r.update(score=None), ["result 3", "score None"]),
    (lambda r: r.pop("keypoints"), ["result 3 has no keypoints"]),
])
def test_predictions_that_cannot_be_scored_name_the_file_entry_and_field(tmp_path, gt, change, words):
    """Before: pycocotools' bare AssertionError (an image id not in the ground truth), a KeyError, or
    a NaN scored without a word."""
    root = _grid(tmp_path, gt, 2.0, 4.0, seeds=(0,))
    path = root / "runs" / "HRNet3-s0" / "predictions_stage3.json.gz"
    res = json.loads(gzip.decompress(path.read_bytes()))
    change(res[3])
    path.write_bytes(gzip.compress(json.dumps(res).encode()))        # json writes NaN as the token NaN
    with pytest.raises(GridDataError) as err:
        bootstrap_comparisons(load_runs(root), [CMP], load_ground_truth(root), replicates=4)
    assert str(err.value).startswith(f"{path}: ") and "okdpose grid collect" in str(err.value)
    for w in words:
        assert w in str(err.value)


# --------------------------------------------------------------------------- report

def test_report_files_and_plot(tmp_path, gt):
    root = _grid(tmp_path, gt, 3.0, 8.0, seeds=(0, 1))
    summary = summarize_grid(root, tmp_path / "out", replicates=50, seed=0)
    assert summary["runs"] == 4 and summary["rows_with_runs"] == 2
    json.dumps(summary)                                              # printable
    md = Path(summary["files"]["table_md"]).read_text()
    assert "| HRNet4-OKD | 3 / 4 | 2 |" in md and "✓" in md and "– (no runs)" in md and "Energy: not recorded" in md
    assert "HRNet4-OKD s3 vs HRNet3 s3" in Path(summary["files"]["comparisons_csv"]).read_text()
    assert Path(summary["files"]["table_csv"]).read_text().count("\n") == 1 + sum(len(r.reported_stages) for r in ROWS)
    png = Path(summary["files"]["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    h, w = mpimg.imread(png).shape[:2]
    assert w >= 800 and h >= 400


def test_write_report_with_no_runs(tmp_path):
    files = write_report(tmp_path, aggregate([]), [], note="empty")
    assert files["plot"].stat().st_size > 1000 and "empty" in files["table_md"].read_text()


def test_one_seed_intervals_are_flagged_as_images_only(tmp_path, gt):
    root = tmp_path / "grid"
    write_gt(root, gt)
    make_run(root, gt, "HRNet3", 0, stages_of("HRNet3", noisy(gt, 6.0, 0)))
    make_run(root, gt, "HRNet4-OKD", 0, stages_of("HRNet4-OKD", noisy(gt, 2.0, 1)))
    summarize_grid(root, root, replicates=30)
    md = (root / "table.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| HRNet4-OKD s3 vs HRNet3 s3"))
    assert "¹" in line and "covers the test images only" in md
