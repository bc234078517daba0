"""bf16 vs fp32 seed comparison on tiny fake run folders (the grid-stats fixtures: a 16-image COCO
ground truth, predictions = ground truth + controlled pixel noise)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from okdpose.grid_stats import GridDataError
from okdpose.precision_runs import compare, load_ground_truth, load_runs, main, summarize
from test_grid_stats import make_gt, make_run, noisy, write_gt


def _precision_root(tmp_path: Path, gt: dict, bf16_px: float, fp32_px: float, seeds=(0, 1, 2)) -> Path:
    """results/precision-like folder: runs at <root>/<row>-s<seed>/ (make_run writes <root>/runs/...)."""
    root = tmp_path / "precision"
    write_gt(root, gt)
    for s in seeds:
        for row, px in (("default-bf16", bf16_px), ("default-fp32", fp32_px)):
            res = noisy(gt, px + 0.3 * s, seed=10 * s + (row == "default-fp32"))
            folder = make_run(root, gt, row, s, {k: res for k in (1, 2, 3, 4)})
            folder.rename(root / folder.name)
    (root / "runs").rmdir()
    return root


@pytest.fixture
def gt():
    return make_gt()


def test_same_noise_is_within_spread_and_a_clear_loss_is_not(tmp_path, gt):
    root = _precision_root(tmp_path / "a", gt, 4.0, 4.0)
    recs = compare(load_runs(root), load_ground_truth(root), replicates=200)
    assert [r["stage"] for r in recs] == [1, 2, 3, 4]
    r = recs[0]
    assert r["a_seeds"] == r["b_seeds"] == [0, 1, 2] and len(r["a_AP"]) == 3
    assert r["lo"] <= r["diff"] <= r["hi"] and r["b_sd"] > 0
    assert r["within_fp32_spread"] == (abs(r["diff"]) <= r["b_sd"])
    assert r["diff"] == pytest.approx(r["a_mean"] - r["b_mean"])

    root = _precision_root(tmp_path / "b", gt, 9.0, 2.0)       # bf16 far worse than fp32
    r = compare(load_runs(root), load_ground_truth(root), replicates=200)[3]
    assert r["diff"] < -10 and r["hi"] < 0 and r["excludes_zero"] is True and r["within_fp32_spread"] is False


def test_summarize_writes_the_table_and_ignores_other_rows(tmp_path, gt, capsys):
    root = _precision_root(tmp_path, gt, 3.0, 3.0, seeds=(0, 1))
    other = root / "HRNet4-OKD-DS-bf16-s0"                  # an older folder without gt_sha256: not a row here
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({"name": other.name, "row": "HRNet4-OKD-DS", "seed": 0}))
    out = summarize(root, replicates=50)
    assert out["runs"] == 4 and Path(out["files"]["table_md"]).is_file()
    text = (root / "table.md").read_text()
    assert "| 4 |" in text and "default-bf16" in text and "within the fp32 seed spread" in text
    assert main(["table", "--root", str(root), "--replicates", "20"]) == 0
    assert "default-fp32" in capsys.readouterr().out


def test_bad_folders_are_named(tmp_path, gt):
    root = _precision_root(tmp_path, gt, 3.0, 3.0, seeds=(0,))
    meta = root / "default-bf16-s0" / "meta.json"
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps({**m, "gt_sha256": "0" * 64}))
    with pytest.raises(GridDataError, match="default-bf16-s0.*another test split"):
        load_runs(root)
    meta.write_text(json.dumps(m))
    (root / "default-fp32-s0" / "predictions_stage3.json.gz").unlink()
    with pytest.raises(GridDataError, match="default-fp32-s0.*predictions"):
        load_runs(root)
    (root / "default-fp32-s0" / "eval.json").write_text("{not json")
    with pytest.raises(GridDataError, match="eval.json.*precision_seed.sh"):
        load_runs(root)


def test_one_row_missing_is_an_error(tmp_path, gt, capsys):
    root = _precision_root(tmp_path, gt, 3.0, 3.0, seeds=(0,))
    for f in (root / "default-fp32-s0").iterdir():
        f.unlink()
    (root / "default-fp32-s0").rmdir()
    with pytest.raises(GridDataError, match="needs runs of both"):
        summarize(root, replicates=10)
    assert main(["table", "--root", str(root)]) == 2 and "default-fp32" in capsys.readouterr().out
