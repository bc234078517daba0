"""`okdpose evaluate --checkpoint`: what it refuses before any work (an --out it would have to
delete something in, or cannot write), a model with non-finite outputs and damaged prepared data,
each with a one-line message, exit status 2 and nothing lost or left behind."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from okdpose import cli
from okdpose.joints import BABYPOSE12
from okdpose.model import MultiOutHRNet, save_checkpoint

PARAMS = {"data": {"image_size": [48, 64], "heatmap_size": [12, 16]},
          "evaluate": {"batch_size": 2, "num_images": 2, "anytime_thresholds": [0.5]},
          "tracking": {"enabled": False}}


def project(root: Path, prepared: Path, *, huge_head: bool = False) -> Path:
    """params.yaml, data/prepared (a copy: tests damage it) and model.pt in `root` (the cwd)."""
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    shutil.copytree(prepared, root / "data" / "prepared")
    torch.manual_seed(0)
    model = MultiOutHRNet(BABYPOSE12.num_joints, 4, 2, True)
    if huge_head:                    # finite weights whose stage-2 heatmaps overflow float32
        with torch.no_grad():
            for name, m in model.named_modules():
                if name.startswith("stage2") and isinstance(m, torch.nn.BatchNorm2d):
                    m.bias.fill_(1.0)        # features of order 1 into the head (at init they are ~1e-7)
            model.intermediate_layers["1"].weight.fill_(3e38)
    save_checkpoint(root / "model.pt", model)
    return root


def evaluate(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["evaluate", "--checkpoint", "model.pt", *args])
    return code, capsys.readouterr().err


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def root(tmp_path, tiny_prepared, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return project(tmp_path, tiny_prepared)


def test_files_beside_the_outputs_survive_and_a_rerun_replaces_only_its_own(root, capsys):
    (root / "proj" / "notes").mkdir(parents=True)
    (root / "proj" / "notes" / "a.txt").write_text("mine")
    (root / "proj" / "README").write_text("mine too")
    code, err = evaluate(capsys, "--out", "proj")
    assert code == 0, err
    first = json.loads((root / "proj" / "eval.json").read_text())
    assert first["checkpoint"]["path"] == "model.pt"
    stale = root / "proj" / "plots" / "example_9.png"       # an output of an earlier run with more images
    stale.write_bytes(b"old")
    code, err = evaluate(capsys, "--out", "proj")
    assert code == 0, err
    assert not stale.exists()
    assert (root / "proj" / "notes" / "a.txt").read_text() == "mine"
    assert (root / "proj" / "README").read_text() == "mine too"
    assert sorted(p.name for p in (root / "proj" / "results").iterdir()) == \
        ["predictions_stage1.json", "predictions_stage2.json"]


@pytest.mark.parametrize("out", ["proj", "."])
def test_results_or_plots_holding_other_files_are_refused_and_kept(root, capsys, out):
    """A project root as --out: its results/ and plots/ hold other stages' outputs."""
    where = root / out
    (where / "results" / "explain").mkdir(parents=True)
    (where / "results" / "explain" / "a.npz").write_bytes(b"npz")
    (where / "plots" / "train").mkdir(parents=True)
    (where / "plots" / "train" / "loss.csv").write_text("epoch,loss\n")
    before = tree(root)
    code, err = evaluate(capsys, "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "results" in err and "explain/" in err and "would delete" in err and "--out" in err
    assert tree(root) == before


def test_an_eval_json_that_is_not_ours_is_not_overwritten(root, capsys):
    (root / "proj").mkdir()
    (root / "proj" / "eval.json").write_text('{"mine": 1}\n')
    code, err = evaluate(capsys, "--out", "proj")
    assert code == 2 and "eval.json" in err and "overwrite" in err, err
    assert (root / "proj" / "eval.json").read_text() == '{"mine": 1}\n'
    assert sorted(p.name for p in (root / "proj").iterdir()) == ["eval.json"]


def _fail_if_loaded(monkeypatch):
    import okdpose.model.released

    def load(*a, **k):
        raise AssertionError("the checkpoint was loaded before --out was checked")
    monkeypatch.setattr(okdpose.model.released, "load_released", load)


@pytest.mark.parametrize("out, words", [
    ("afile", ["--out afile", "is a file"]),
    ("afile/sub", ["--out afile/sub", "is a file"]),
    ("data/prepared/eval", ["inside --prepared"]),
    ("inputs", ["--checkpoint", "replaces it as a whole"]),
])
def test_an_out_that_cannot_be_written_or_holds_an_input_is_refused_before_any_work(root, capsys, monkeypatch,
                                                                                   out, words):
    (root / "afile").write_text("a file")
    (root / "inputs" / "plots").mkdir(parents=True)
    shutil.move(root / "model.pt", root / "inputs" / "plots" / "model.pt")
    before = tree(root)
    _fail_if_loaded(monkeypatch)
    code = cli.main(["evaluate", "--checkpoint", "inputs/plots/model.pt", "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    assert tree(root) == before and not (root / "data" / "prepared" / "eval").exists()


def test_unwritable_out_is_refused_before_any_work(root, capsys, monkeypatch):
    import os

    (root / "ro").mkdir()
    (root / "ro").chmod(0o555)
    try:
        if os.access(root / "ro", os.W_OK):
            pytest.skip("running as root: every folder is writable")
        _fail_if_loaded(monkeypatch)
        code, err = evaluate(capsys, "--out", "ro/out")
        assert code == 2 and "no write permission" in err, err
    finally:
        (root / "ro").chmod(0o755)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")     # the decoding of the inf heatmaps
def test_non_finite_outputs_stop_naming_file_and_stage_and_write_nothing(tmp_path, tiny_prepared, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    project(tmp_path, tiny_prepared, huge_head=True)
    code, err = evaluate(capsys, "--out", "new/out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "model.pt" in err and "output stage 2 (of 2)" in err and "non-finite" in err
    assert not (tmp_path / "new").exists()


PREPARED_DAMAGE = {  # id: (damage(prepared), the file named)
    "gt_json_empty": (lambda p: (p / "test_gt.json").write_text(""), "test_gt.json"),
    "gt_json_not_coco": (lambda p: (p / "test_gt.json").write_text("[]"), "test_gt.json"),
    "crops_truncated": (lambda p: (p / "test_gt_crops.npy").write_bytes((p / "test_gt_crops.npy").read_bytes()[:60]),
                        "test_gt_crops.npy"),
    "records_truncated": (lambda p: (p / "test_gt.npz").write_bytes((p / "test_gt.npz").read_bytes()[:100]),
                          "test_gt.npz"),
}


@pytest.mark.parametrize("case", list(PREPARED_DAMAGE))
def test_damaged_prepared_data_names_the_file_and_preprocess(root, capsys, case):
    damage, name = PREPARED_DAMAGE[case]
    damage(root / "data" / "prepared")
    code, err = evaluate(capsys, "--out", "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert name in err and "re-run preprocess (dvc repro preprocess)" in err, err
    assert not (root / "out").exists()
