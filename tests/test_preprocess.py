import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from okdpose.data.coco import (DataError, crops_path, load_meta, load_records, prepare_dataset, read_frame, to_uint8)
from okdpose.data.layout import annotation_file, detection_file
from okdpose.geometry import box_to_center_scale, crop_image
from okdpose.joints import BABYPOSE12, COCO17

from conftest import DEPTH_RANGE, TINY_IMAGE_SIZE

ROOT = Path(__file__).resolve().parents[1]


def _prepare(raw, out, **kw):
    return prepare_dataset(raw, out, BABYPOSE12, TINY_IMAGE_SIZE, DEPTH_RANGE, progress=False, **kw)


def test_to_uint8_formats():
    d = np.array([[400, 1200, 800, 0, 300, 5000]], np.uint16)
    np.testing.assert_array_equal(to_uint8(d, (400, 1200))[..., 0], [[255, 0, 128, 0, 255, 0]])   # near bright
    bgr = np.zeros((2, 3, 3), np.uint8)
    bgr[..., 0] = 200                                                     # blue in OpenCV order
    assert to_uint8(bgr, (0, 1))[0, 0].tolist() == [0, 0, 200]            # -> RGB
    assert to_uint8(np.ones((2, 3), np.uint8), (0, 1)).shape == (2, 3, 1)
    with pytest.raises(DataError, match="unsupported frame format"):
        to_uint8(np.zeros((2, 3, 3), np.uint16), (0, 1))


def test_prepared_records_crops_and_report(tiny_raw, tmp_path):
    out = tmp_path / "prepared"
    report = _prepare(tiny_raw, out)
    meta = load_meta(out)
    assert meta["raw_root"] == os.path.relpath(tiny_raw, out) and meta["splits"]["train"]["channels"] == 1
    coco = json.loads(annotation_file(tiny_raw, "val").read_text())
    recs = load_records(out, "val", "gt")
    assert len(recs) == 3 and recs.joints.shape == (3, 12, 3) and recs.images.shape == (3,)
    ann = coco["annotations"][0]
    np.testing.assert_allclose(recs.joints[0].reshape(-1), ann["keypoints"], atol=1e-3)
    c, s = box_to_center_scale(ann["bbox"], TINY_IMAGE_SIZE[0] / TINY_IMAGE_SIZE[1])
    np.testing.assert_allclose(recs.center[0], c)
    np.testing.assert_allclose(recs.scale[0], s)
    # the cached crop is exactly the warp of the decoded frame
    frame = read_frame(tiny_raw / str(recs.images[recs.image[0]]), DEPTH_RANGE)
    cache = np.load(crops_path(out, "val", "gt"))
    np.testing.assert_array_equal(cache[0, ..., 0], crop_image(frame, recs.center[0], recs.scale[0], TINY_IMAGE_SIZE))
    dets = load_records(out, "val", "det")
    assert (dets.joints == 0).all() and (dets.ann_id == -1).all() and len(np.load(crops_path(out, "val", "det"))) == len(dets)
    v = report["splits"]["train"]["joints"]
    assert v["visible"] + v["occluded"] + v["absent"] == 3 * 12 and report["total"]["records_gt"] == 9
    assert report["splits"]["val"]["skipped"]["invalid_records"] == 0


def test_cleaned_ground_truth_loads_in_pycocotools(tiny_prepared):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tiny_prepared / "val_gt.json"))
        dt = gt.loadRes([{"image_id": a["image_id"], "category_id": 3, "keypoints": a["keypoints"], "score": 1.0}
                         for a in gt.dataset["annotations"]])
        ev = COCOeval(gt, dt, "keypoints")
        ev.params.kpt_oks_sigmas = BABYPOSE12.sigmas_array
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["gray8", "bgr8"])
def test_8bit_frames(tiny_raw, tmp_path, mode):
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    for p in raw.glob("images/*/*.png"):
        g = to_uint8(cv2.imread(str(p), cv2.IMREAD_UNCHANGED), DEPTH_RANGE)[..., 0]
        cv2.imwrite(str(p), g if mode == "gray8" else cv2.merge([g, g // 2, g // 3]))
    _prepare(raw, tmp_path / "prepared")
    meta = load_meta(tmp_path / "prepared")
    assert meta["splits"]["test"]["channels"] == (1 if mode == "gray8" else 3)
    cache = np.load(crops_path(tmp_path / "prepared", "test", "gt"))
    if mode == "bgr8":        # written B, G, R = g, g/2, g/3; stored RGB: red (g/3) first, blue (g) last
        assert (cache[..., 0] <= cache[..., 1]).all() and (cache[..., 1] <= cache[..., 2]).all()
        assert cache[..., 2].max() > 2 * cache[..., 0].max() > 0


def _edit_annotations(raw, split, fn):
    path = annotation_file(raw, split)
    coco = json.loads(path.read_text())
    fn(coco)
    path.write_text(json.dumps(coco))
    return coco


# Bad annotations and bad frames (fail with file, image id and field; skip_invalid skips and counts):
# the DATA_CASES table in tests/test_bad_inputs.py.


def test_empty_split_and_bad_files(tiny_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    _edit_annotations(raw, "val", lambda c: [a.update(bbox=[-50.0, 0.0, 10.0, 10.0]) for a in c["annotations"]])
    with pytest.raises(DataError, match="split 'val' .* no valid annotated record"):
        _prepare(raw, tmp_path / "prepared", skip_invalid=True)
    with pytest.raises(DataError, match="no category with id 1"):
        prepare_dataset(raw, tmp_path / "prepared", COCO17, TINY_IMAGE_SIZE, DEPTH_RANGE, progress=False)
    detection_file(raw, "test").write_text("{not json")
    with pytest.raises(DataError, match="results_test.json: not valid JSON"):
        _prepare(raw, tmp_path / "prepared", skip_invalid=True)
    assert not (tmp_path / "prepared").exists()


@pytest.mark.slow
def test_stage_scripts_end_to_end(tmp_path):
    """download + preprocess as DVC runs them (cwd = a repository root with params.yaml)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["synthetic"].update(subjects=[1, 1, 1], frames_per_subject=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for stage in ("download", "preprocess"):
        res = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "reports" / "data.json").read_text())
    assert report["total"]["records_gt"] == 6
    assert sorted(p.name for p in (tmp_path / "plots" / "data").iterdir()) == sorted(
        f"{s}_{k}.png" for s in ("train", "val", "test") for k in ("frames", "crops"))
    assert (tmp_path / "data" / "prepared" / "meta.json").is_file()
    # a bad value stops the stage with the key named, and no traceback
    params["data"]["sha256"] = "abc"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = subprocess.run([sys.executable, str(ROOT / "stages" / "download.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "data.sha256" in res.stderr and "Traceback" not in res.stderr
