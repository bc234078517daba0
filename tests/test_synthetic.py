import hashlib
import json
from dataclasses import replace

import cv2
import numpy as np
import pytest

from okdpose.data import synthetic as syn
from okdpose.data.layout import SPLITS, annotation_file, detection_file, image_dir, validate_layout
from okdpose.joints import BABYPOSE12, COCO17

from conftest import TINY


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_annotations(tiny_raw):
    validate_layout(tiny_raw)
    subjects = {}
    ids = set()
    for split in SPLITS:
        coco = json.loads(annotation_file(tiny_raw, split).read_text())
        assert coco["categories"] == [BABYPOSE12.coco_category()]
        assert len(coco["images"]) == len(coco["annotations"]) == TINY.frames_per_subject
        subjects[split] = {im["subject_id"] for im in coco["images"]}
        for im in coco["images"]:
            assert im["file_name"] == f"{im['id']:012d}.png" and (im["width"], im["height"]) == (640, 480)
            assert im["id"] not in ids
            ids.add(im["id"])
            img = cv2.imread(str(image_dir(tiny_raw, split) / im["file_name"]), cv2.IMREAD_UNCHANGED)
            assert img.dtype == np.uint16 and img.shape == (480, 640)
            assert 300 < np.median(img[img > 0]) < 1300          # mm: a mattress under the camera
        for ann in coco["annotations"]:
            k = np.array(ann["keypoints"]).reshape(12, 3)
            assert set(k[:, 2]) <= {0, 1, 2} and ann["num_keypoints"] == (k[:, 2] > 0).sum()
            assert (k[k[:, 2] == 0, :2] == 0).all()
            lab = k[k[:, 2] > 0]
            assert ((lab[:, 0] >= 0) & (lab[:, 0] < 640) & (lab[:, 1] >= 0) & (lab[:, 1] < 480)).all()
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 640 and y + h <= 480
            assert 0 < ann["area"] <= w * h and ann["category_id"] == 3
        dets = json.loads(detection_file(tiny_raw, split).read_text())
        assert all(d["image_id"] in ids and 0 < d["score"] < 1 and d["category_id"] == 3 for d in dets)
    assert not (subjects["train"] & subjects["val"]) and not (subjects["train"] & subjects["test"])
    assert not (subjects["val"] & subjects["test"])


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    cfg = replace(TINY, frames_per_subject=2)
    syn.generate_dataset(tmp_path / "a", cfg, workers=1, progress=False)
    syn.generate_dataset(tmp_path / "b", cfg, workers=2, progress=False)
    syn.generate_dataset(tmp_path / "c", replace(cfg, seed=cfg.seed + 1), progress=False)
    a, b, c = (_digest(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_chirality_supine_infant_seen_from_above():
    """Head up in the image and facing the camera: the infant's right side is on the image's left."""
    s = syn.make_subject(1, 0, (700.0, 700.0)).size
    pose = {k: (lo + hi) / 2 for k, (lo, hi) in syn.POSE_RANGES.items()}
    body = syn.build_body(s, pose, np.zeros(2), 90.0)                 # head toward +y
    cam = syn.make_camera(np.zeros(2), 700.0, 0.0, (0.0, 0.0))
    uv = cam.project(syn._joint_array(body["joints"]))
    head = cam.project((body["chest"] + 80 * body["ax"])[None])[0]
    names = BABYPOSE12.names
    for right, left in BABYPOSE12.flip_pairs:
        assert names[right].startswith("right") and uv[right, 0] < uv[left, 0]
    assert head[1] < uv[2, 1] < uv[8, 1]                              # head above shoulders above hips


def test_occluders_and_camera_shift_change_visibility(tmp_path):
    def vis_counts(name, **kw):
        cfg = replace(TINY, subjects=(2, 1, 1), frames_per_subject=8, **kw)
        syn.generate_dataset(tmp_path / name, cfg, progress=False)
        anns = json.loads(annotation_file(tmp_path / name, "train").read_text())["annotations"]
        v = np.concatenate([np.array(a["keypoints"]).reshape(12, 3)[:, 2] for a in anns])
        return (v == 2).mean(), (v == 1).mean(), (v == 0).mean()

    clean = vis_counts("clean", occluder_prob=0.0, out_of_frame_prob=0.0)
    busy = vis_counts("busy", occluder_prob=1.0, out_of_frame_prob=1.0)
    assert busy[1] > clean[1] + 0.1          # blankets, cables and hands occlude joints (v = 1)
    assert busy[2] > clean[2]                # shifted cameras push joints out of the frame (v = 0)
    assert clean[0] > 0.6


def test_refuses_other_joint_specs(tmp_path):
    with pytest.raises(ValueError, match="babypose12"):
        syn.generate_dataset(tmp_path, TINY, COCO17, progress=False)
