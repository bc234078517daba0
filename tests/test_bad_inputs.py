"""Bad inputs, interruptions and untrusted files (issue 9): every case the pipeline refuses, at a glance.

Each table row is one bad input. Its test asserts (1) the exception type, (2) a message naming the
file, record or key and what to fix, and (3) that nothing a later stage could mistake for valid is
left behind: the target folder or file is absent (or unchanged) and no temporary debris remains.

    DATA_CASES        raw frames / COCO annotations -> preprocess (DataError; skip_invalid skips + counts)
    PREPARED_CASES    a damaged data/prepared -> PoseDataset (DataError)
    PARAMS_CASES      params.yaml values (ParamsError naming the key)
    CHECKPOINT_CASES  files given as model.pretrained / models/*.pt (CheckpointError; model untouched)
    ARCHIVE_CASES     data.source archive: zip slip (zip and tar, absolute and ..), links, special
                      members, damaged archives, wrong sha256, wrong layout (FetchError / LayoutError)
    DOWNLOAD_CASES    data.source url against a Range-capable server on 127.0.0.1 started here:
                      tampered, truncated at the source, dropped connection (kept .part, resumed), HTTP 404
    STAGE_CASES       stage scripts that fail leave no outputs (download, preprocess midway, pretrain-load)
    source scans      torch.load(weights_only=True) everywhere; no shell=True / os.system / eval / exec /
                      pickle / yaml.load / np.load(allow_pickle=True) in src/ and stages/
    training          train.grad_clip clips; an Inf loss stops with epoch, step and term and keeps the
                      last good checkpoint (here); the NaN case with the real model and OKD loss is
                      tests/test_train.py (see COVERED_ELSEWHERE)

Related tests in other modules are listed in COVERED_ELSEWHERE; `test_covered_elsewhere_exists`
fails when one of them is renamed or removed.
"""
from __future__ import annotations

import ast
import hashlib
import http.server
import io
import json
import math
import os
import runpy
import shutil
import stat
import tarfile
import threading
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from okdpose.codec import HeatmapCodec
from okdpose.data.coco import DataError, load_records, prepare_dataset, to_uint8
from okdpose.data.dataset import PoseDataset
from okdpose.data.fetch import ChecksumError, FetchError, UnsafeArchiveError, fetch_raw
from okdpose.data.layout import LayoutError, annotation_file, detection_file, image_file
from okdpose.joints import BABYPOSE12
from okdpose.model import CheckpointError, MultiOutHRNet, load_model, load_pretrained, save_checkpoint
from okdpose.params import ParamsError, TrainParams, params_from_dict
from okdpose.train import Trainer, TrainingDiverged, make_optimizer, make_scheduler

from conftest import DEPTH_RANGE, TINY_IMAGE_SIZE

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = (ROOT / "src", ROOT / "stages", ROOT / "scripts")

COVERED_ELSEWHERE = {  # case -> test that covers it (kept there: it needs that module's fixtures)
    "nan_loss_stops_with_epoch_step_term_keeps_last_good":
        "tests/test_train.py::test_nan_loss_stops_with_epoch_step_term_and_keeps_last_good",
    "unreadable_last_checkpoint_starts_fresh": "tests/test_train.py::test_unreadable_last_checkpoint_starts_fresh",
    "resume_only_with_matching_fingerprint": "tests/test_train.py::test_other_fingerprint_starts_fresh_and_says_why",
    "killed_training_resumes_bit_identical": "tests/test_train_okd.py::test_killed_mid_epoch_resumes_to_the_uninterrupted_result",
    "local_folder_missing_layout_entries": "tests/test_fetch.py::test_missing_entries_are_named_and_nothing_replaced",
    "complete_part_file_verified_not_refetched": "tests/test_fetch.py::test_url_complete_part_is_verified_not_refetched",
    "params_file_missing_or_not_yaml": "tests/test_params.py::test_overrides_and_file_errors",
    "stage_error_is_one_line_without_traceback": "tests/test_preprocess.py::test_stage_scripts_end_to_end",
    "download_wrong_range_bounded": "tests/test_fetch.py::test_url_server_answering_the_wrong_range_stops",
    "download_not_an_http_server": "tests/test_fetch.py::test_url_not_an_http_server",
    "local_path_overlapping_the_target": "tests/test_fetch.py::test_local_path_overlapping_the_target_is_refused",
    "killed_writers_temporaries_swept": "tests/test_files.py::test_a_killed_writers_temporaries_are_swept_a_live_ones_kept",
    "evaluate_out_checked_before_work": ("tests/test_evaluate_cli.py::"
                                         "test_an_out_that_cannot_be_written_or_holds_an_input_is_refused_before_any_work"),
    "evaluate_non_finite_outputs": "tests/test_evaluate_cli.py::test_non_finite_outputs_stop_naming_file_and_stage_and_write_nothing",
    "evaluate_keeps_files_beside_its_outputs":
        "tests/test_evaluate_cli.py::test_files_beside_the_outputs_survive_and_a_rerun_replaces_only_its_own",
    "explain_box_on_the_frame": "tests/test_explain_image.py::test_box_must_be_a_person_box_on_the_frame",
    "explain_joint_count": "tests/test_explain_image.py::test_released_file_of_another_joint_count",
    "predict_frames_not_files": ("tests/test_frames.py::"
                                 "test_frame_entries_that_are_not_files_are_unreadable_frames_not_dropped_or_waited_on"),
    "grid_predictions_that_cannot_be_scored":
        "tests/test_grid_stats.py::test_predictions_that_cannot_be_scored_name_the_file_entry_and_field",
    "grid_impossible_options": "tests/test_grid.py::test_impossible_options_are_refused_by_name_before_any_work",
    "bench_impossible_options": "tests/test_bench.py::test_impossible_options_are_refused_before_any_measuring",
}


def listing(folder: Path) -> list[str]:
    """Names in `folder` (hidden temporaries included); [] when it does not exist."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# =========================================================================== raw data -> preprocess

def _coco(raw: Path, split: str) -> tuple[Path, dict]:
    path = annotation_file(raw, split)
    return path, json.loads(path.read_text())


def _edit(raw: Path, split: str, fn) -> tuple[Path, int]:
    """Apply fn(coco) to a split's annotation file; -> (file, id of the image it makes bad)."""
    path, coco = _coco(raw, split)
    iid = fn(coco)
    path.write_text(json.dumps(coco))
    return path, iid


def _image(raw: Path, split: str, fn) -> tuple[Path, int]:
    """Apply fn(path) to the second frame of a split; -> (frame file, its image id)."""
    iid = _coco(raw, split)[1]["images"][1]["id"]
    path = image_file(raw, split, iid)
    fn(path)
    return path, iid


def _gray8(path: Path) -> np.ndarray:
    """The frame at `path` (16-bit depth) as the 8-bit grey picture a viewer would save."""
    return to_uint8(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), DEPTH_RANGE)[..., 0]


def _ann(coco: dict, **changes) -> int:
    ann = coco["annotations"][1]
    ann.update(changes)
    return ann["image_id"]


def _kp(coco: dict, index: int, value) -> int:
    coco["annotations"][1]["keypoints"][index] = value
    return coco["annotations"][1]["image_id"]


def _declared_size(coco: dict) -> int:
    coco["images"][1].update(width=1280, height=960)     # the file is 640x480
    return coco["images"][1]["id"]


def _dup_image(coco: dict) -> int:
    coco["images"].append(dict(coco["images"][1]))
    return coco["images"][1]["id"]


def _dup_ann(coco: dict) -> int:
    coco["annotations"][1]["id"] = coco["annotations"][0]["id"]
    return coco["annotations"][1]["image_id"]


def _unknown_det(raw: Path, split: str) -> tuple[Path, None]:
    path = detection_file(raw, split)
    dets = json.loads(path.read_text())
    dets.append({"image_id": 999, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.9})
    path.write_text(json.dumps(dets))
    return path, None


def _empty_split(raw: Path, split: str) -> tuple[Path, None]:
    path, coco = _coco(raw, split)
    coco["annotations"] = []
    path.write_text(json.dumps(coco))
    return path, None


def _not_json(raw: Path, split: str) -> tuple[Path, None]:
    path = annotation_file(raw, split)
    path.write_text(path.read_text()[:200])
    return path, None


# id: (split, make(raw, split) -> (file named in the error, bad image id or None), words in the
#      message, skip_invalid: "skip" (skipped and counted) or "fail" (nothing valid to keep))
DATA_CASES = {
    "missing_image": ("test", lambda r, s: _image(r, s, Path.unlink), ["image file not found"], "skip"),
    "image_is_a_folder": ("test", lambda r, s: _image(r, s, lambda p: (p.unlink(), p.mkdir())),
                          ["is a folder, not an image file"], "skip"),
    "corrupt_image": ("test", lambda r, s: _image(r, s, lambda p: p.write_bytes(os.urandom(4096))),
                      ["cannot be decoded", "replace the file"], "skip"),
    "truncated_image": ("test", lambda r, s: _image(r, s, lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])),
                        ["cannot be decoded", "truncated"], "skip"),
    "image_file_cropped": ("test", lambda r, s: _image(r, s, lambda p: cv2.imwrite(str(p), cv2.imread(str(p), cv2.IMREAD_UNCHANGED)[:240])),
                           ["width/height", "file is 640x240, annotation says 640x480", "person_keypoints_test.json"], "skip"),
    "gray8_among_depth": ("test", lambda r, s: _image(r, s, lambda p: cv2.imwrite(str(p), _gray8(p))),
                          ["format", "an 8-bit frame among 16-bit depth ones", "is 16-bit depth", "convert this frame"],
                          "skip"),
    "rgb8_among_depth": ("train", lambda r, s: _image(r, s, lambda p: cv2.imwrite(str(p), cv2.merge([_gray8(p)] * 3))),
                         ["format", "an 8-bit frame among 16-bit depth ones"], "skip"),
    "image_size_vs_annotation": ("val", lambda r, s: _edit(r, s, _declared_size),
                                 ["width/height", "file is 640x480, annotation says 1280x960"], "skip"),
    "wrong_joint_count": ("train", lambda r, s: _edit(r, s, lambda c: _ann(c, keypoints=c["annotations"][1]["keypoints"][:33])),
                          ["keypoints", "11 joints (33 values), expected 12"], "skip"),
    "nan_coordinate": ("train", lambda r, s: _edit(r, s, lambda c: _kp(c, 4, float("nan"))),
                       ["keypoints", "non-finite"], "skip"),
    "negative_coordinate": ("train", lambda r, s: _edit(r, s, lambda c: _kp(c, 0, -5.0)),
                            ["keypoints[0]", "(-5, ", "outside the 640x480 frame"], "skip"),
    "coordinate_beyond_frame": ("train", lambda r, s: _edit(r, s, lambda c: _kp(c, 0, 700.0)),
                                ["keypoints[0]", "(700, ", "outside the 640x480 frame"], "skip"),
    "visibility_flag": ("train", lambda r, s: _edit(r, s, lambda c: _kp(c, 2, 3)), ["visibility flags must be 0, 1 or 2"], "skip"),
    "box_outside_frame": ("train", lambda r, s: _edit(r, s, lambda c: _ann(c, bbox=[600.0, 10.0, 100.0, 50.0])),
                          ["bbox", "not inside the 640x480 frame"], "skip"),
    "box_negative_size": ("train", lambda r, s: _edit(r, s, lambda c: _ann(c, bbox=[10.0, 10.0, -100.0, 50.0])),
                          ["bbox", "width and height must be > 0"], "skip"),
    "duplicate_image_id": ("val", lambda r, s: _edit(r, s, _dup_image), ["duplicate image id", "unique"], "skip"),
    "duplicate_annotation_id": ("val", lambda r, s: _edit(r, s, _dup_ann), ["duplicate annotation id", "unique"], "skip"),
    "detection_for_unknown_image": ("test", _unknown_det, ["image 999", "detection for an unknown image"], "skip"),
    "empty_split": ("val", _empty_split, ["split 'val' has no valid annotated record", "add annotated frames"], "fail"),
    "annotation_not_json": ("train", _not_json, ["not valid JSON", "re-export or re-download"], "fail"),
    "joint_names_reordered": ("test", lambda r, s: _edit(r, s, lambda c: _names(c, lambda n: n[::-1])),
                              ["keypoints lists the joints of babypose12 in another order", "position 0 is",
                               "write the file in the spec's order"], "fail"),
    "joint_names_not_a_list": ("val", lambda r, s: _edit(r, s, lambda c: _names(c, lambda n: 12)),
                               ["keypoints must be a list of joint names, got 12"], "fail"),
}


def _names(coco: dict, change) -> None:
    coco["categories"][0]["keypoints"] = change(coco["categories"][0]["keypoints"])


def _prepare(raw: Path, out: Path, **kw) -> dict:
    return prepare_dataset(raw, out, BABYPOSE12, TINY_IMAGE_SIZE, DEPTH_RANGE, progress=False, **kw)


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_raw_data(case, tiny_raw, tmp_path):
    split, make, words, skip = DATA_CASES[case]
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    bad_file, bad_id = make(raw, split)
    out = tmp_path / "prepared"
    with pytest.raises(DataError) as err:
        _prepare(raw, out)
    msg = str(err.value)
    for w in [str(bad_file), *([f"image {bad_id}"] if bad_id is not None else []), *words]:
        assert w in msg, (w, msg)
    if skip == "skip":
        assert "data.skip_invalid: true" in msg                    # the other way out is named
    assert listing(tmp_path) == ["raw"]                            # no data/prepared, no temporary folder

    if skip == "fail":                                             # nothing to fall back on
        with pytest.raises(DataError):
            _prepare(raw, out, skip_invalid=True)
        assert listing(tmp_path) == ["raw"]
        return
    report = _prepare(raw, out, skip_invalid=True)                 # skipped and counted instead
    s = report["splits"][split]
    assert s["skipped"]["invalid_records"] == 1
    assert len(s["invalid"]) == 1 and str(bad_file) in s["invalid"][0]          # which record, not only how many
    gt, det = load_records(out, split, "gt"), load_records(out, split, "det")
    if bad_id is not None:                                         # the whole frame goes, everywhere
        assert s["skipped"]["invalid_images"] == 1 and s["records_gt"] == 2
        assert bad_id not in gt.image_id and bad_id not in det.image_id
        assert bad_id not in {i["id"] for i in json.loads((out / f"{split}_gt.json").read_text())["images"]}
    else:                                                          # a bad detection goes alone
        assert s["skipped"]["invalid_images"] == 0 and s["records_gt"] == 3 and 999 not in det.image_id
    assert report["total"]["skipped_invalid"] == 1


def test_a_stray_first_frame_is_the_one_named_not_the_split(tiny_raw, tmp_path):
    """An 8-bit picture that sorts first does not make every depth frame after it the stray one."""
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    first = min(i["id"] for i in _coco(raw, "val")[1]["images"])
    path = image_file(raw, "val", first)
    cv2.imwrite(str(path), _gray8(path))
    with pytest.raises(DataError) as err:
        _prepare(raw, tmp_path / "prepared")
    msg = str(err.value)
    assert "1 invalid record(s) in split 'val'" in msg and str(path) in msg, msg
    assert "an 8-bit frame among 16-bit depth ones (most frames of this split are 16-bit depth)" in msg, msg
    report = _prepare(raw, tmp_path / "prepared", skip_invalid=True)
    val = report["splits"]["val"]
    assert val["skipped"]["invalid_images"] == 1 and val["records_gt"] == 2
    assert json.loads((tmp_path / "prepared" / "meta.json").read_text())["splits"]["val"]["channels"] == 1
    assert first not in load_records(tmp_path / "prepared", "val", "gt").image_id


def test_other_joint_names_are_warned_about_and_recorded_the_order_kept(tiny_raw, tmp_path, caplog):
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    _edit(raw, "train", lambda c: _names(c, lambda n: [f"kp{i}" for i in range(len(n))]))
    with caplog.at_level("WARNING", logger="okdpose.data.coco"):
        report = _prepare(raw, tmp_path / "prepared")
    assert "12 of the 12 keypoint names differ from joint spec babypose12" in caplog.text
    differ = report["splits"]["train"]["keypoint_names_differ"]
    assert differ[0] == {"index": 0, "file": "kp0", "spec": BABYPOSE12.names[0]} and len(differ) == 12
    assert "keypoint_names_differ" not in report["splits"]["val"] and "invalid" not in report["splits"]["val"]


def test_skip_invalid_counts_each_kind(tiny_raw, tmp_path):
    """Several bad records at once: each is reported when failing, and counted per field when skipping."""
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    _edit(raw, "train", lambda c: _kp(c, 4, float("nan")))
    _edit(raw, "train", lambda c: c["annotations"][0].update(bbox=[600.0, 10.0, 100.0, 50.0]))
    _image(raw, "test", Path.unlink)
    with pytest.raises(DataError, match=r"2 invalid record\(s\) in split 'train'"):
        _prepare(raw, tmp_path / "prepared")
    report = _prepare(raw, tmp_path / "prepared", skip_invalid=True)
    train, test = report["splits"]["train"]["skipped"], report["splits"]["test"]["skipped"]
    assert train["invalid_records"] == 2 and train["invalid_keypoints"] == 1 and train["invalid_bbox"] == 1
    assert test["invalid_file"] == 1 and report["total"]["skipped_invalid"] == 3
    assert report["total"]["records_gt"] == 1 + 3 + 2


# =========================================================================== data/prepared -> dataset

REPREPARE = "re-run preprocess (dvc repro preprocess)"
PREPARED_CASES = {  # id: (damage(prepared), words)
    "meta_not_json": (lambda p: (p / "meta.json").write_text("{\"version\": 1,"), ["meta.json", "not valid JSON", "re-run the preprocess"]),
    "meta_missing": (lambda p: (p / "meta.json").unlink(), ["meta.json", "not found", "dvc repro preprocess"]),
    "records_missing": (lambda p: (p / "val_gt.npz").unlink(), ["val_gt.npz", "not found", "dvc repro preprocess"]),
    "other_version": (lambda p: (p / "meta.json").write_text(json.dumps({"version": 0})), ["version 0", "re-run preprocess"]),
    "crops_empty": (lambda p: (p / "val_gt_crops.npy").write_bytes(b""), ["val_gt_crops.npy", REPREPARE]),
    "crops_header_cut": (lambda p: _keep_bytes(p / "val_gt_crops.npy", 60), ["val_gt_crops.npy", REPREPARE]),
    "crops_data_cut": (lambda p: _keep_bytes(p / "val_gt_crops.npy", -10), ["val_gt_crops.npy", REPREPARE]),
    "crops_other_shape": (lambda p: np.save(p / "val_gt_crops.npy", np.zeros((1, 2, 3, 1), np.uint8)),
                          ["val_gt_crops.npy", REPREPARE]),
    "records_cut": (lambda p: _keep_bytes(p / "val_gt.npz", 100), ["val_gt.npz", REPREPARE]),
    "records_field_missing": (lambda p: _npz_without(p / "val_gt.npz", "center"), ["val_gt.npz", REPREPARE]),
    "meta_key_missing": (lambda p: _json_without(p / "meta.json", "raw_root"), ["meta.json", REPREPARE]),
}


def _keep_bytes(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:n])


def _npz_without(path: Path, field: str) -> None:
    with np.load(path) as z:
        kept = {k: z[k] for k in z.files if k != field}
    np.savez(path, **kept)


def _json_without(path: Path, key: str) -> None:
    meta = json.loads(path.read_text())
    del meta[key]
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("case", list(PREPARED_CASES))
def test_damaged_prepared_data(case, tiny_prepared, tmp_path):
    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, prepared)
    damage, words = PREPARED_CASES[case]
    damage(prepared)
    with pytest.raises(DataError) as err:
        PoseDataset(prepared, "val", BABYPOSE12, HeatmapCodec(TINY_IMAGE_SIZE, (12, 16), 1.0))
    for w in words:
        assert w in str(err.value), (w, str(err.value))


# =========================================================================== params.yaml

PARAMS_CASES = {  # id: (params.yaml content, words: the key and the fix)
    "unknown_data_source": ({"data": {"source": "ftp"}}, ["data.source", "'ftp'", "synthetic", "url"]),
    "url_without_sha256": ({"data": {"source": "url", "url": "https://x/y.zip"}}, ["data.sha256 is required"]),
    "sha256_not_hex": ({"data": {"sha256": "abc"}}, ["data.sha256", "64 hex digits"]),
    "couple_out_of_range": ({"loss": {"kld_couples": [[2, 5]]}}, ["kld_couples[0] = [2, 5]", "1..model.n_stage (4)"]),
    "couple_beyond_n_stage": ({"model": {"n_stage": 3}, "loss": {"kld_couples": [[3, 4]]}}, ["kld_couples[0]", "n_stage (3)"]),
    "couple_stage_zero": ({"loss": {"kld_couples": [[0, 4]]}}, ["kld_couples[0] = [0, 4]", "1..model.n_stage"]),
    "reversed_couple": ({"loss": {"kld_couples": [[4, 3]]}}, ["kld_couples[0] = [4, 3]", "write [student, teacher]"]),
    "self_couple": ({"loss": {"kld_couples": [[3, 3]]}}, ["kld_couples[0] = [3, 3]", "must come after"]),
    "duplicate_couple": ({"loss": {"kld_couples": [[2, 4], [2, 4]]}}, ["kld_couples[1] = [2, 4]", "duplicate", "list each"]),
    "kd_with_multi_false": ({"model": {"multi": False}}, ["loss.use_kld", "model.multi: true", "set one of them"]),
    "kd_without_couples": ({"loss": {"kld_couples": []}}, ["kld_couples is empty", "use_kld: false"]),
    "grad_clip_not_positive": ({"train": {"grad_clip": 0}}, ["train.grad_clip", "> 0 or null"]),
    "misspelt_key": ({"loss": {"kld_weigth": 1.0}}, ["loss.kld_weigth", "kld_weight"]),
    "dotted_data_name": ({"data": {"name": "../elsewhere"}}, ["data.name", "plain folder name"]),
}


@pytest.mark.parametrize("case", list(PARAMS_CASES))
def test_bad_params(case):
    raw, words = PARAMS_CASES[case]
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_unknown_source_in_the_library_call(tmp_path):
    """fetch_raw called directly (not through params) refuses it too, before writing anything."""
    with pytest.raises(FetchError, match="unknown data.source 'ftp'; choose synthetic, local, archive or url"):
        fetch_raw(tmp_path / "raw" / "babypose", "ftp", progress=False)
    assert listing(tmp_path / "raw") == []


# =========================================================================== checkpoints

J, WIDTH = 5, 4
MARKER = "okdpose-pickle-ran"


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _truncated(path: Path) -> None:
    save_checkpoint(path, MultiOutHRNet(J, WIDTH, 4))
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


CHECKPOINT_CASES = {  # id: (write(path), words besides the path)
    "pickled_list": (lambda p: torch.save([1, 2, 3], p), ["holds a list, not a dict of tensors"]),
    "text_file": (lambda p: p.write_text("model: hrnet\nwidth: 32\n"), ["not a checkpoint torch can load safely"]),
    "random_bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(2048)), ["not a checkpoint torch can load safely"]),
    "truncated_file": (_truncated, ["not a checkpoint torch can load safely"]),
    "pickle_running_code": (lambda p: torch.save(_RunsCodeWhenUnpickled(p.parent / MARKER), p),
                            ["not a checkpoint torch can load safely"]),
    "tensor_not_dict": (lambda p: torch.save(torch.zeros(3), p), ["holds a Tensor"]),
    "empty_dict": (lambda p: torch.save({}, p), ["no tensors found"]),
    "non_tensor_entry": (lambda p: torch.save({"conv1.weight": [1, 2]}, p), ["'conv1.weight' holds a list"]),
    "not_hrnet": (lambda p: torch.save(torch.nn.Linear(3, 2).state_dict(), p), ["not an HRNet pose checkpoint"]),
    "width_state_dict": (lambda p: torch.save(MultiOutHRNet(J, 8, 4).state_dict(), p),
                         ["do not fit a width-4 HRNet", "set model.width: 8"]),
    "width_okdpose": (lambda p: save_checkpoint(p, MultiOutHRNet(J, 8, 4)), ["width 8", "set model.width: 8"]),
    "nan_weights": (lambda p: torch.save(_broken(MultiOutHRNet(J, WIDTH, 4), float("nan")).state_dict(), p),
                    ["'final_layer.weight' holds", "non-finite values", "earlier checkpoint"]),
    "inf_okdpose": (lambda p: save_checkpoint(p, _broken(MultiOutHRNet(J, WIDTH, 4), float("inf"))),
                    ["'final_layer.weight' holds", "non-finite values"]),
    "folder": (lambda p: p.mkdir(), ["is a folder, not a checkpoint file"]),
}


def _broken(model: MultiOutHRNet, value: float) -> MultiOutHRNet:
    with torch.no_grad():
        model.final_layer.weight[0, 0] = value
    return model


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint(case, tmp_path):
    write, words = CHECKPOINT_CASES[case]
    path = tmp_path / "ckpt.pth"
    write(path)
    torch.manual_seed(0)
    model = MultiOutHRNet(J, WIDTH, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_pretrained(model, path)
    for w in [str(path), *words]:
        assert w in str(err.value), (w, str(err.value))
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())                 # nothing half-loaded
    assert not (tmp_path / MARKER).exists()                                          # no pickled code ran
    if case.startswith(("width", "not_hrnet", "empty", "non_tensor", "tensor")):
        return
    with pytest.raises(CheckpointError, match="not a|non-finite|is a folder"):   # the stages' loader (models/*.pt) too
        load_model(path)
    assert not (tmp_path / MARKER).exists()


def test_pickle_payload_would_run_without_weights_only(tmp_path):
    """The control for `pickle_running_code`: the payload is live, so the test above can fail."""
    path = tmp_path / "ckpt.pth"
    CHECKPOINT_CASES["pickle_running_code"][0](path)
    torch.load(path, weights_only=False)
    assert (tmp_path / MARKER).is_dir()


# =========================================================================== archives (data.source: archive)

GOOD_MEMBER = ("babypose/annotations/readme.txt", b"extracted before the bad member")


def _zip(tmp: Path, name: str, data: bytes = b"x", mode: int | None = None) -> Path:
    path = tmp / "data.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(*GOOD_MEMBER)
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return path


def _tar(tmp: Path, name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> Path:
    path = tmp / "data.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        good = tarfile.TarInfo(GOOD_MEMBER[0])
        good.size = len(GOOD_MEMBER[1])
        tf.addfile(good, io.BytesIO(GOOD_MEMBER[1]))
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        if kind == tarfile.REGTYPE:
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
        else:
            tf.addfile(info)
    return path


def _layout_zip(raw: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(raw.rglob("*")):
            if p.is_file():
                zf.write(p, f"babypose/{p.relative_to(raw)}")
    return out


def _layout_tar_gz(raw: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        tf.add(raw, arcname="babypose")
    return out


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _cut(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return path


def _flip_byte(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


# four levels up from data/raw/.babypose.XXX.tmp/.extract/ is tmp_path: an escape would land there
ESCAPE, UP = "evil.txt", "../../../../"
# id: (make(tmp, raw) -> archive, expected error, words besides the archive path, sha256 param: None or "wrong")
ARCHIVE_CASES = {
    "zip_dotdot": (lambda t, r: _zip(t, UP + ESCAPE), UnsafeArchiveError, [f"'{UP}{ESCAPE}'", "outside the target"], None),
    "zip_nested_dotdot": (lambda t, r: _zip(t, f"babypose/{UP}../{ESCAPE}"), UnsafeArchiveError, ["outside the target"], None),
    "zip_absolute": (lambda t, r: _zip(t, f"{t}/{ESCAPE}"), UnsafeArchiveError, ["absolute path", "outside the target"], None),
    "zip_backslash_dotdot": (lambda t, r: _zip(t, UP.replace("/", "\\") + ESCAPE), UnsafeArchiveError, ["outside the target"], None),
    "zip_symlink": (lambda t, r: _zip(t, "babypose/images", str(t), stat.S_IFLNK | 0o777), UnsafeArchiveError,
                    ["symlink member 'babypose/images'"], None),
    "tar_dotdot": (lambda t, r: _tar(t, UP + ESCAPE), UnsafeArchiveError, [f"'{UP}{ESCAPE}'", "outside the target"], None),
    "tar_absolute": (lambda t, r: _tar(t, f"{t}/{ESCAPE}"), UnsafeArchiveError, ["absolute path"], None),
    "tar_symlink": (lambda t, r: _tar(t, "babypose/images", tarfile.SYMTYPE, str(t)), UnsafeArchiveError,
                    ["symlink member 'babypose/images'", "-> '{t}'"], None),
    "tar_hardlink": (lambda t, r: _tar(t, "babypose/x.json", tarfile.LNKTYPE, "/etc/passwd"), UnsafeArchiveError,
                     ["hard link member 'babypose/x.json'"], None),
    "tar_fifo": (lambda t, r: _tar(t, "babypose/fifo", tarfile.FIFOTYPE), UnsafeArchiveError, ["special member 'babypose/fifo'"], None),
    "zip_truncated": (lambda t, r: _cut(_layout_zip(r, t / "data.zip")), FetchError, ["not a zip or tar archive, or a truncated one"], None),
    "tar_gz_truncated": (lambda t, r: _cut(_layout_tar_gz(r, t / "data.tar.gz")), FetchError,
                         ["damaged or truncated archive", "data.sha256"], None),
    "zip_corrupt_member": (lambda t, r: _flip_byte(_layout_zip(r, t / "data.zip")), FetchError,
                           ["damaged or truncated archive", "Bad CRC-32"], None),
    "sha256_mismatch": (lambda t, r: _layout_zip(r, t / "data.zip"), ChecksumError,
                        ["sha256 mismatch", "fix data.sha256 or the source"], "wrong"),
    "not_an_archive": (lambda t, r: _text(t / "data.zip", "hello"), FetchError, ["not a zip or tar archive"], None),
    "not_the_layout": (lambda t, r: _zip(t, "babypose/annotations/person_keypoints_train.json", b"{}"), LayoutError,
                       ["not in the BabyPose layout", "person_detection_results/results_train.json"], None),
}


@pytest.mark.parametrize("case", list(ARCHIVE_CASES))
def test_bad_archive(case, tiny_raw, tmp_path):
    make, error, words, sha_param = ARCHIVE_CASES[case]
    archive = make(tmp_path, tiny_raw)
    dest = tmp_path / "data" / "raw" / "babypose"
    dest.parent.mkdir(parents=True)
    sha256 = "0" * 64 if sha_param == "wrong" else None
    with pytest.raises(error) as err:
        fetch_raw(dest, "archive", path=str(archive), sha256=sha256, progress=False)
    msg = str(err.value)
    for w in [str(archive), *(w.replace("{t}", str(tmp_path)) for w in words)]:
        assert w in msg, (w, msg)
    assert listing(dest.parent) == []                    # no data/raw/babypose, no temporary folder
    assert not (tmp_path / ESCAPE).exists() and not list(tmp_path.rglob(ESCAPE))
    assert listing(tmp_path) == sorted([archive.name, "data"])


# =========================================================================== downloads (data.source: url)

class RangeServer:
    """Serves `files` on 127.0.0.1 with HTTP Range support; each entry of `drop` cuts one response
    short after that many bytes (Content-Length promises the whole body)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop: list[int] = []
        self.ranges: list[str | None] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body, rng = outer.files.get(self.path), self.headers.get("Range")
                outer.ranges.append(rng)
                if body is None:
                    return self.send_error(404)
                start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                if start >= len(body) > 0:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = outer.drop.pop(0) if outer.drop else None
                self.wfile.write(body[start:] if cut is None else body[start:start + cut])
                if cut is not None:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    s = RangeServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def layout_zip(tiny_raw, tmp_path_factory) -> Path:
    return _layout_zip(tiny_raw, tmp_path_factory.mktemp("zip") / "babypose.zip")


def _tampered(b: bytes) -> bytes:
    data = bytearray(b)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


DOWNLOAD_CASES = {  # id: (body served instead of the real archive, or None for a 404; error; words)
    "tampered": (_tampered, ChecksumError, ["sha256 mismatch", "the download was deleted", "Check data.sha256 and data.url"]),
    "truncated_at_source": (lambda b: b[:len(b) // 2], ChecksumError, ["sha256 mismatch", "the download was deleted"]),
    "http_404": (None, FetchError, ["HTTP 404", "check data.url"]),
}


@pytest.mark.parametrize("case", list(DOWNLOAD_CASES))
def test_bad_download(case, layout_zip, tmp_path, server):
    serve, error, words = DOWNLOAD_CASES[case]
    if serve is not None:
        server.files["/babypose.zip"] = serve(layout_zip.read_bytes())
    dest, downloads = tmp_path / "raw" / "babypose", tmp_path / "downloads"
    url = server.url("/babypose.zip")
    with pytest.raises(error) as err:
        fetch_raw(dest, "url", url=url, sha256=sha(layout_zip), download_dir=downloads, progress=False, retries=0)
    for w in [url, *words]:
        assert w in str(err.value), (w, str(err.value))
    assert listing(downloads) == [] and listing(tmp_path / "raw") == []    # no .part, no archive, no raw data


def test_interrupted_download_is_kept_and_resumed(layout_zip, tiny_raw, tmp_path, server, monkeypatch):
    """A connection dropped mid-transfer: retried with a Range request in the same run; once the
    retries are spent the .part is kept, nothing else is written, and the next run resumes it."""
    import okdpose.data.fetch as fetch

    monkeypatch.setattr(fetch.time, "sleep", lambda s: None)         # no back-off wait in tests
    data = layout_zip.read_bytes()
    server.files["/babypose.zip"] = data
    server.drop = [60_000, 40_000]
    dest, downloads = tmp_path / "raw" / "babypose", tmp_path / "downloads"
    kw = dict(url=server.url("/babypose.zip"), sha256=sha(layout_zip), download_dir=downloads, progress=False)
    with pytest.raises(FetchError) as err:
        fetch_raw(dest, "url", retries=1, **kw)
    assert "download failed after 2 attempts" in str(err.value) and "run again to resume" in str(err.value)
    (part,) = downloads.iterdir()
    assert part.name.endswith(".part") and part.stat().st_size == 100_000 and part.read_bytes() == data[:100_000]
    assert f"100000 bytes kept in {part}" in str(err.value)
    assert listing(tmp_path / "raw") == []
    server.drop = [50_000]                                           # drops once more, then completes
    report = fetch_raw(dest, "url", retries=1, **kw)
    assert server.ranges == [None, "bytes=60000-", "bytes=100000-", "bytes=150000-"]
    assert tree(dest) == tree(tiny_raw)
    assert listing(downloads) == [Path(report["archive"]).name] and Path(report["archive"]).read_bytes() == data


# =========================================================================== stages fail without debris

def _run_stage(name: str, root: Path, monkeypatch, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(root)
    runpy.run_path(str(ROOT / "stages" / f"{name}.py"), run_name="__main__")


def _stage_preprocess_midway(root: Path, tiny_raw: Path) -> tuple[str, dict]:
    raw = root / "data" / "raw" / "babypose"
    shutil.copytree(tiny_raw, raw)
    _image(raw, "test", lambda p: p.write_bytes(p.read_bytes()[:1000]))   # train and val are prepared first
    return "preprocess", {}


def _stage_download_zip_slip(root: Path, tiny_raw: Path) -> tuple[str, dict]:
    archive = _zip(root, UP + ESCAPE)
    return "download", {"data": {"source": "archive", "path": str(archive)}}


def _stage_pretrain_not_a_state_dict(root: Path, tiny_raw: Path) -> tuple[str, dict]:
    (root / "pretrained").mkdir()
    torch.save([1, 2, 3], root / "pretrained" / "pose.pth")
    return "pretrain_load", {"model": {"pretrained": "pretrained/pose.pth"}}


STAGE_CASES = {  # id: (set up root -> (stage, params), words, outputs that must not exist)
    "preprocess_fails_midway": (_stage_preprocess_midway, ["preprocess: ", "000000030002.png", "cannot be decoded"],
                                ["data/prepared", "reports/data.json", "plots/data"]),
    "download_zip_slip": (_stage_download_zip_slip, ["download: ", "refusing member"], ["data/raw/babypose"]),
    "pretrain_load_not_a_state_dict": (_stage_pretrain_not_a_state_dict, ["pretrain-load: ", "pose.pth", "holds a list"],
                                       ["models/init.pt", "reports/pretrain.json"]),
}


@pytest.mark.parametrize("case", list(STAGE_CASES))
def test_failed_stage_leaves_no_outputs(case, tiny_raw, tmp_path, monkeypatch):
    setup, words, outputs = STAGE_CASES[case]
    stage, params = setup(tmp_path, tiny_raw)
    with pytest.raises(SystemExit) as err:
        _run_stage(stage, tmp_path, monkeypatch, params)
    msg = str(err.value.code)
    for w in words:
        assert w in msg, (w, msg)
    for out in outputs:
        assert not (tmp_path / out).exists(), out
    debris = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    assert debris == [] and not list(tmp_path.rglob(ESCAPE))


def test_preprocess_stage_with_skip_invalid_skips_and_counts(tiny_raw, tmp_path, monkeypatch):
    stage, params = _stage_preprocess_midway(tmp_path, tiny_raw)
    _run_stage(stage, tmp_path, monkeypatch, {"data": {"skip_invalid": True}})
    report = json.loads((tmp_path / "reports" / "data.json").read_text())
    assert report["splits"]["test"]["skipped"]["invalid_images"] == 1 and report["total"]["skipped_invalid"] == 1
    assert report["splits"]["test"]["records_gt"] == 2 and (tmp_path / "data" / "prepared" / "meta.json").is_file()
    assert len(listing(tmp_path / "plots" / "data")) == 6


# =========================================================================== source scans

def _calls(tree_: ast.AST):
    for node in ast.walk(tree_):
        if isinstance(node, ast.Call):
            f = node.func
            name = (f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                    else f.id if isinstance(f, ast.Name) else None)
            yield name, node


def _kw(node: ast.Call, key: str):
    for k in node.keywords:
        if k.arg == key:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def unsafe_calls(source: str, where: str = "<src>") -> list[str]:
    """Calls that load untrusted bytes unsafely or hand data to a shell / the interpreter."""
    found = []
    for name, node in _calls(ast.parse(source)):
        at = f"{where}:{node.lineno}"
        if name == "torch.load" and _kw(node, "weights_only") is not True:
            found.append(f"{at}: torch.load without weights_only=True")
        if name in ("eval", "exec", "compile", "__import__", "os.system", "os.popen", "pickle.load", "pickle.loads",
                    "yaml.load", "yaml.unsafe_load", "marshal.loads", "shelve.open"):
            found.append(f"{at}: {name}()")
        if name == "np.load" and _kw(node, "allow_pickle") not in (None, False):
            found.append(f"{at}: np.load(allow_pickle=...)")
        if _kw(node, "shell") not in (None, False):
            found.append(f"{at}: {name}(shell=...)")
        if (name and name.startswith("subprocess.") and node.args
                and isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp))):
            found.append(f"{at}: {name} with a command string (pass an argument list)")
    return found


def _sources() -> list[Path]:
    files = sorted(p for d in SOURCE_DIRS for p in d.rglob("*.py"))
    assert len(files) > 20 and any(p.name == "checkpoint.py" for p in files)
    return files


def test_no_unsafe_loading_or_shell_in_src_and_stages():
    found = [f for p in _sources() for f in unsafe_calls(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


def test_every_torch_load_in_src_uses_weights_only():
    loads = [(p, n) for p in _sources() for name, n in _calls(ast.parse(p.read_text())) if name == "torch.load"]
    assert len(loads) >= 2                                   # checkpoint.read_checkpoint and Trainer._resume
    assert all(_kw(n, "weights_only") is True for _, n in loads)


@pytest.mark.parametrize("snippet", [
    "torch.load(p)", "torch.load(p, weights_only=False)", "eval(s)", "exec(s)", "os.system(cmd)",
    "subprocess.run(cmd, shell=True)", "subprocess.run('git ' + ref)", "pickle.loads(b)", "yaml.load(t)",
    "np.load(p, allow_pickle=True)",
])
def test_the_scanner_catches(snippet):
    assert unsafe_calls(snippet), snippet
    assert not unsafe_calls("torch.load(p, weights_only=True); model.eval(); subprocess.run(['git', ref])")


# =========================================================================== training

class _Frames(torch.utils.data.Dataset):
    """4 random (image, target, weight, meta) samples of a 2-joint, 8x8-heatmap problem."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(4, 3, 8, 8, generator=g), torch.rand(4, 2, 8, 8, generator=g)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.x[i], self.y[i], torch.ones(2), {}


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return [self.conv(x)]


class _HugeLoss:
    """MSE scaled by 1e6: unclipped gradient norms are far above any sensible clip value."""

    def consistency(self, epoch):
        return 1.0

    def __call__(self, outputs, target, weight, consistency=1.0):
        total = 1e6 * torch.mean((outputs[-1] - target) ** 2)
        return total, {"mse_teacher": total.detach(), "total": total.detach()}


def _grad_norms(grad_clip, lr=1.0) -> tuple[list[float], torch.nn.Module]:
    torch.manual_seed(0)
    model = _Net()
    opt = make_optimizer(model, "sgd", lr, momentum=0.0)
    norms: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: norms.append(float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()])))))
    Trainer(model, _HugeLoss(), opt, scheduler=make_scheduler(opt, [], 1.0), train_set=_Frames(),
            validate=lambda m: {1: {"AP": 0.0}}, params=TrainParams(epochs=2, batch_size=2, grad_clip=grad_clip),
            select_stages=(1,)).fit()
    return norms, model


def test_grad_clip_bounds_the_gradient_norm_of_every_step():
    unclipped, _ = _grad_norms(None, lr=1e-9)
    assert len(unclipped) == 4 and min(unclipped) > 10.0               # the control: the clip has work to do
    clipped, model = _grad_norms(0.5)
    assert len(clipped) == 4 and max(clipped) <= 0.5 * (1 + 1e-5), clipped
    assert all(torch.isfinite(p).all() for p in model.parameters())  # lr 1.0 on a 1e6 loss stays finite


class _InfAt(_HugeLoss):
    """Turns the loss infinite at the n-th call (4 samples, batch 2: 2 steps per epoch)."""

    def __init__(self, call: int):
        self.call, self.calls = call, 0

    def __call__(self, outputs, target, weight, consistency=1.0):
        self.calls += 1
        total = torch.mean((outputs[-1] - target) ** 2) * (math.inf if self.calls == self.call else 1.0)
        return total, {"mse_teacher": total.detach(), "total": total.detach()}


def test_inf_loss_stops_with_epoch_step_term_and_keeps_last_good(tmp_path):
    """The Inf twin of tests/test_train.py's NaN case, on a one-conv model (seconds)."""
    torch.manual_seed(0)
    model = _Net()
    opt = make_optimizer(model, "sgd", 0.1)
    trainer = Trainer(model, _InfAt(3), opt, scheduler=make_scheduler(opt, [], 1.0), train_set=_Frames(),
                      validate=lambda m: {1: {"AP": 0.0}}, params=TrainParams(epochs=3, batch_size=2),
                      select_stages=(1,), last_path=tmp_path / "last.pt")
    with pytest.raises(TrainingDiverged) as err:
        trainer.fit()
    msg = str(err.value)
    for w in ["epoch 2 step 1/2", "mse_teacher=inf", "last.pt (epoch 1) is kept", "train.grad_clip"]:
        assert w in msg, (w, msg)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())
    assert listing(tmp_path) == ["last.pt"]


def test_covered_elsewhere_exists():
    for case, ref in COVERED_ELSEWHERE.items():
        file, name = ref.split("::")
        names = {n.name for n in ast.walk(ast.parse((ROOT / file).read_text())) if isinstance(n, ast.FunctionDef)}
        assert name in names, f"{case}: {ref} is gone; cover the case here or update COVERED_ELSEWHERE"
