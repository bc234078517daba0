"""`okdpose predict` end to end on a folder of 16-bit depth frames and on an MP4 built from the
built-in generator, with a tiny random-weight checkpoint (and its ONNX export): outputs and their
schema, evaluate's score, --track and its fallback, detections, bad frames and model mismatches."""
from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import DEPTH_RANGE, TINY_IMAGE_SIZE
from okdpose.cli import main as okdpose_main
from okdpose.data.coco import load_records, read_frame
from okdpose.data.dataset import PoseDataset
from okdpose.frames import open_source
from okdpose.geometry import box_to_center_scale, crop_image
from okdpose.joints import BABYPOSE12
from okdpose.metrics import rescore
from okdpose.params import load_params
from okdpose.predict import (
    IN_VIS_THRE,
    PredictError,
    RefineParams,
    TrackParams,
    box_iou,
    joints_box,
    keypoint_box,
    load_detections,
    main,
    normalise,
    predict_frames,
    refine_boxes,
)
from okdpose.runner import Runner, load_runner
from test_frames import corrupt_png, truncated_mp4
from test_runner import IMAGE_SIZE, write_tiny

J = BABYPOSE12.num_joints
CSV_COLUMNS = ["frame", "name", "joint", "x", "y", "score"]


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "model").mkdir()
    return write_tiny(tmp_path / "model")




def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_folder_of_16bit_frames_end_to_end(tiny, folder, tmp_path, capsys):
    ckpt, params, _ = tiny
    out = tmp_path / "out"
    code = okdpose_main(["predict", str(folder), "--model", str(ckpt), "--stage", "2", "--params", str(params),
                         "--out", str(out), "--overlay"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "9 frames (0 skipped)" in stdout and "frames/s" in stdout
    rows = read_csv(out / "keypoints.csv")
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == 9 * J
    assert [r["joint"] for r in rows[:J]] == list(BABYPOSE12.names)
    results = json.loads((out / "keypoints.json").read_text())
    names = sorted(f.name for f in folder.glob("*.png"))
    assert [r["image_id"] for r in results] == [int(Path(n).stem) for n in names]      # BabyPose file names
    for r in results:
        assert set(r) == {"image_id", "category_id", "keypoints", "score"}
        assert r["category_id"] == BABYPOSE12.category_id and len(r["keypoints"]) == 3 * J
    first = np.array(results[0]["keypoints"]).reshape(J, 3)
    np.testing.assert_allclose(first[:, 0], [float(r["x"]) for r in rows[:J]], atol=1e-3)
    # evaluate's score: box score (1 for the whole frame) x mean of the joint maxima above in_vis_thre
    assert results[0]["score"] == pytest.approx(float(rescore(first[None, :, 2], np.ones(1), IN_VIS_THRE)[0]))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_predicted"] == 9 and summary["box_modes"] == {"frame": 9}
    assert summary["source"]["kind"] == "folder" and summary["stage"] == 2
    assert summary["refine"]["iterations"] == RefineParams.iterations        # the box search is the default
    assert 9 <= summary["model_calls"] <= 9 * (RefineParams.iterations + 1)
    assert sorted(p.name for p in (out / "overlay").glob("*.png")) == names


def test_mp4_end_to_end_with_anytime_smoothing_and_video(tiny, video, tmp_path, capsys):
    ckpt, params, _ = tiny
    out = tmp_path / "out"
    code, _, err = run([video, "--model", ckpt, "--exit-threshold", 0.0, "--params", params, "--out", out,
                        "--smooth", "--video-out", "--batch-size", 4], capsys)
    assert code == 0, err
    rows = read_csv(out / "keypoints.csv")
    assert list(rows[0]) == CSV_COLUMNS + ["exit_stage", "x_raw", "y_raw"]
    assert {r["exit_stage"] for r in rows} == {"1"}                  # τ = 0: everyone leaves at stage 1
    assert rows[0]["name"] == "frame_000000" and len(rows) == 9 * J
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoothing"]["fps"] == pytest.approx(10.0)        # the video's frame rate
    assert summary["exit_share"] == {"stage1": 1.0}
    cap = cv2.VideoCapture(str(out / "overlay.mp4"))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 9
    cap.release()


def test_onnx_export_end_to_end(tiny, folder, tmp_path, capsys):
    export = pytest.importorskip("okdpose.export")
    ckpt, params, model = tiny
    meta = load_runner(ckpt, stage=2, params=params).meta
    onnx_file = export.write_onnx(export.stage_model(model, 2), tmp_path / "stage2.onnx", meta)
    code, _, err = run([folder, "--model", onnx_file, "--out", tmp_path / "onnx"], capsys)
    assert code == 0, err
    code, _, err = run([folder, "--model", ckpt, "--stage", 2, "--params", params, "--out", tmp_path / "pt"], capsys)
    assert code == 0, err
    a, b = (json.loads((tmp_path / d / "keypoints.json").read_text()) for d in ("onnx", "pt"))
    assert [r["image_id"] for r in a] == [r["image_id"] for r in b]
    xa, xb = (np.array([r["keypoints"] for r in res]).reshape(-1, J, 3) for res in (a, b))
    same = np.abs(xa[..., :2] - xb[..., :2]).max(axis=-1) < 1e-3
    assert same.mean() >= 0.95          # float rounding may tip an argmax near-tie (export's compare bounds them)
    np.testing.assert_allclose(xa[..., 2], xb[..., 2], rtol=1e-3, atol=1e-5)


class ScriptedRunner(Runner):
    """Heatmaps with one peak per joint at fixed crop points; the peak value of the n-th call is
    `confidences[n]`, so a test decides when tracking is confident."""

    backend = "scripted"

    def __init__(self, meta, confidences):
        super().__init__(Path("scripted"), meta)
        self.confidences, self.calls, self.inputs = list(confidences), 0, []

    def run(self, batch):
        w, h = self.meta.heatmap_size
        hm = np.zeros((len(batch), J, h, w), np.float32)
        for j in range(J):                       # joints spread over the middle of the crop
            hm[:, j, 3 + (j % 4) * 3, 3 + (j // 4) * 2] = self.confidences[self.calls]
        self.calls += 1
        self.inputs.append(batch)
        return hm, np.full(len(batch), self.meta.stage)


def test_track_follows_the_keypoints_and_falls_back(tiny, folder):
    ckpt, params, _ = tiny
    meta = load_runner(ckpt, stage=1, params=params).meta
    conf = [0.9, 0.9, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    runner = ScriptedRunner(meta, conf)
    corrupt_png(sorted(folder.glob("*.png"))[6])
    source = open_source(folder, depth_range=DEPTH_RANGE, on_error="skip")
    res = predict_frames(runner, source, track=True, refine=None)       # --refine 0: one crop a frame
    kinds = [fp.box_kind for fp in res.frames]
    # first frame whole; frame 3 after frame 2's low confidence; frame 7 after the skipped frame 6
    assert kinds == ["frame", "track", "track", "frame", "track", "track", "frame", "track"]
    assert [fp.frame.index for fp in res.frames] == [0, 1, 2, 3, 4, 5, 7, 8]
    expected = keypoint_box(res.frames[0].raw[0], TrackParams())
    np.testing.assert_allclose(res.frames[1].boxes[0], expected)
    frame = res.frames[1].frame.image
    c, s = box_to_center_scale(expected, IMAGE_SIZE[0] / IMAGE_SIZE[1])
    np.testing.assert_array_equal(runner.inputs[1][0], normalise(crop_image(frame, c, s, IMAGE_SIZE), meta))
    assert res.summary()["box_modes"] == {"frame": 3, "track": 5}


def test_fixed_region_and_tracks_fallback_to_it(tiny, folder):
    ckpt, params, _ = tiny
    meta = load_runner(ckpt, stage=1, params=params).meta
    region = [100.0, 40.0, 300.0, 400.0]
    res = predict_frames(ScriptedRunner(meta, [0.9] * 9), open_source(folder, depth_range=DEPTH_RANGE), region=region,
                         refine=None)
    assert all(fp.box_kind == "region" and fp.boxes[0].tolist() == region for fp in res.frames)
    assert res.summary()["region"] == region
    res = predict_frames(ScriptedRunner(meta, [0.1] * 9), open_source(folder, depth_range=DEPTH_RANGE), region=region,
                         track=True, refine=None)
    assert {fp.box_kind for fp in res.frames} == {"region"}          # never confident: never tracked
    with pytest.raises(PredictError, match="W, H > 0"):
        predict_frames(ScriptedRunner(meta, [0.9]), open_source(folder, depth_range=DEPTH_RANGE), region=[0, 0, 0, 5])


def test_keypoint_box_margin_and_loss():
    p = TrackParams(margin=0.1, min_joints=2, min_confidence=0.3)
    kp = np.zeros((J, 3))
    kp[:, 2] = 0.5
    kp[:, 0], kp[:, 1] = np.linspace(100, 200, J), np.linspace(50, 250, J)
    np.testing.assert_allclose(keypoint_box(kp, p), [90, 30, 120, 240])      # 10% of w, h on every side
    kp[:, 2] = 0.25
    assert keypoint_box(kp, p) is None                                       # mean confidence too low
    kp[:, 2] = 0.0
    kp[:3, 2] = 1.0                                                          # mean 0.25 again, and few joints
    assert keypoint_box(kp, p) is None


def test_crops_are_normalised_like_pose_dataset(tiny_prepared, tiny_raw, tiny):
    _, params, _ = tiny
    meta = load_runner(tiny[0], stage=1, params=params).meta
    assert tuple(meta.image_size) == TINY_IMAGE_SIZE
    ds = PoseDataset(tiny_prepared, "test", BABYPOSE12, load_params(params).data.codec)
    recs = load_records(tiny_prepared, "test")
    frame = read_frame(tiny_raw / str(recs.images[recs.image[0]]), DEPTH_RANGE)
    mine = normalise(crop_image(frame, recs.center[0], recs.scale[0], meta.image_size), meta)
    np.testing.assert_array_equal(mine, ds[0][0].numpy())


@pytest.mark.parametrize("on_error", ["skip", "stop"])
def test_corrupt_png_in_the_folder(tiny, folder, tmp_path, capsys, caplog, on_error):
    ckpt, params, _ = tiny
    bad = corrupt_png(sorted(folder.glob("*.png"))[4])
    out = tmp_path / "out"
    code, stdout, err = run([folder, "--model", ckpt, "--stage", 1, "--params", params, "--out", out,
                             "--on-error", on_error], capsys)
    assert "Traceback" not in err
    if on_error == "stop":
        assert code == 2 and bad.name in err and "--on-error skip" in err
        assert not out.exists() and not list(tmp_path.glob(".out*"))          # nothing half-written
        return
    assert code == 0 and "1 skipped" in stdout and bad.name in caplog.text   # the warning names it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["source"]["skipped"] == 1 and summary["source"]["skipped_frames"][0]["name"] == bad.name
    assert summary["frames_predicted"] == 8


@pytest.mark.parametrize("on_error", ["skip", "stop"])
def test_truncated_mp4(tiny, video, tmp_path, capsys, on_error):
    ckpt, params, _ = tiny
    cut = truncated_mp4(video, tmp_path / "cut.mp4")
    code, _, err = run([cut, "--model", ckpt, "--stage", 1, "--params", params, "--out", tmp_path / "out",
                        "--on-error", on_error], capsys)
    assert "Traceback" not in err
    if on_error == "stop":
        assert code == 2 and "cut.mp4: frame" in err and "of the 9 frames" in err
        return
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["frames_predicted"] + summary["source"]["skipped"] == 9 and summary["source"]["skipped"] > 0


def test_joint_and_category_mismatches_are_named(tiny, folder, tmp_path, capsys):
    ckpt, params, _ = tiny
    base = [folder, "--model", ckpt, "--stage", 1, "--params", params, "--out", tmp_path / "out"]
    code, _, err = run(base + ["--joints", "coco17"], capsys)
    assert code == 2 and "predicts 'babypose12' joints (12" in err and "'coco17'" in err
    first = int(sorted(folder.glob("*.png"))[0].stem)
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"image_id": first, "category_id": 3, "bbox": [10, 10, 100, 100], "score": 0.9,
                                 "keypoints": [0.0] * 51}]))
    code, _, err = run(base + ["--boxes", dets], capsys)
    assert code == 2 and "record 0: has 17 keypoints, the model predicts 12" in err
    dets.write_text(json.dumps([{"image_id": first, "category_id": 1, "bbox": [10, 10, 100, 100], "score": 0.9}]))
    code, _, err = run(base + ["--boxes", dets], capsys)
    assert code == 2 and "no boxes of category 3 ('infant'" in err and "categories [1]" in err
    dets.write_text(json.dumps([{"image_id": 999, "category_id": 3, "bbox": [10, 10, 100, 100], "score": 0.9}]))
    code, _, err = run(base + ["--boxes", dets], capsys)
    assert code == 2 and "no detection's image_id matches a frame" in err
    assert "Traceback" not in err


def test_detection_boxes_by_file_name(tiny, tiny_raw, tmp_path, capsys):
    ckpt, params, _ = tiny
    frames = tmp_path / "test_frames"
    shutil.copytree(tiny_raw / "images" / "test", frames)
    dets_file = tiny_raw / "person_detection_results" / "results_test.json"
    dets = json.loads(dets_file.read_text())
    code, _, err = run([frames, "--model", ckpt, "--stage", 1, "--params", params, "--out", tmp_path / "out",
                        "--boxes", dets_file], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "keypoints.json").read_text())
    ids = {int(p.stem) for p in frames.glob("*.png")}
    assert {r["image_id"] for r in results} <= ids and 0 < len(results) <= len(dets)
    rows = read_csv(tmp_path / "out" / "keypoints.csv")
    assert list(rows[0]) == ["frame", "name", "instance", "joint", "x", "y", "score"]
    meta = load_runner(ckpt, stage=1, params=params).meta
    boxes = load_detections(dets_file, meta)
    top = max(boxes[results[0]["image_id"]], key=lambda b: b[1])[1]
    first = np.array(results[0]["keypoints"]).reshape(J, 3)
    assert results[0]["score"] <= top * max(first[:, 2].max(), 0) + 1e-9    # box score x joint confidence


def test_option_errors(tiny, folder, tmp_path, capsys):
    ckpt, params, _ = tiny
    with pytest.raises(SystemExit) as e:
        main([str(folder), "--model", str(ckpt), "--track", "--boxes", "d.json"])
    assert e.value.code == 2
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    code, _, err = run([folder, "--model", ckpt, "--stage", 1, "--params", params, "--out", taken], capsys)
    assert code == 2 and "not an earlier predict output" in err and (taken / "notes.txt").exists()
    code, _, err = run([folder, "--model", ckpt, "--params", params, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "--stage k" in err
    code, _, err = run([tmp_path / "missing", "--model", ckpt, "--stage", 1, "--params", params], capsys)
    assert code == 2 and "missing: not found" in err


def test_overlays_keep_colours_and_the_timeline(tiny, tmp_path, capsys):
    ckpt, params, _ = tiny
    frames = tmp_path / "rgb"
    frames.mkdir()
    for i in range(3):                               # 8-bit colour frames: pure red (BGR on disk)
        cv2.imwrite(str(frames / f"{i + 1:03d}.png"), np.full((120, 160, 3), (0, 0, 255), np.uint8))
    dets = tmp_path / "dets.json"                    # a box for the first frame only
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 3, "bbox": [20, 20, 60, 80], "score": 0.9}]))
    out = tmp_path / "out"
    code, stdout, err = run([frames, "--model", ckpt, "--stage", 1, "--params", params, "--out", out, "--boxes", dets,
                             "--overlay", "--video-out"], capsys)
    assert code == 0, err
    assert "2 without a box" in stdout
    assert json.loads((out / "summary.json").read_text())["frames_without_box"] == 2
    corner = cv2.imread(str(out / "overlay" / "003.png"))[-1, -1]
    assert corner.tolist() == [0, 0, 255]            # still red: RGB frames are drawn in BGR
    cap = cv2.VideoCapture(str(out / "overlay.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    cap.release()


# --------------------------------------------------------------------------- box search (--refine)

FRAME_WH = (320, 240)


class BlobRunner(Runner):
    """A stand-in model that "sees" the bright pixels of its crop: its joints lie on a 4 x 3 grid
    over their bounding box, with a confidence that grows with the share of the crop they fill
    and halves when the crop cuts them off (a small infant in a big crop is found, but with
    little confidence). Where a joint lands in the frame does not depend on the crop, so only a
    search that moves the box to it is stable."""

    backend = "blob"

    def __init__(self, meta):
        super().__init__(Path("blob"), meta)
        self.calls = 0

    def run(self, batch):
        w, h = self.meta.heatmap_size
        stride = self.meta.image_size[0] / w
        hm = np.zeros((len(batch), J, h, w), np.float32)
        for n, crop in enumerate(batch):
            ys, xs = np.nonzero(crop[0] > 0)              # white: (1 - mean) / std > 0, black < 0
            if not len(xs):
                hm[n, :, h // 2, w // 2] = 0.05            # nothing seen: a low-confidence guess
                continue
            conf = 0.1 + 0.8 * len(xs) / crop[0].size
            if xs.min() == 0 or ys.min() == 0 or xs.max() == crop.shape[2] - 1 or ys.max() == crop.shape[1] - 1:
                conf /= 2                                  # cut off by the crop: half the confidence
            gx = np.round(np.linspace(xs.min(), xs.max(), 4) / stride).astype(int).clip(0, w - 1)
            gy = np.round(np.linspace(ys.min(), ys.max(), 3) / stride).astype(int).clip(0, h - 1)
            for j in range(J):
                hm[n, j, gy[j // 4], gx[j % 4]] = conf
        self.calls += len(batch)
        return hm, np.full(len(batch), self.meta.stage)


def blob_frames(folder: Path, rects) -> Path:
    """8-bit frames of FRAME_WH, black with one white (x, y, w, h) rectangle each (None: empty)."""
    folder.mkdir()
    for i, r in enumerate(rects):
        im = np.zeros(FRAME_WH[::-1], np.uint8)
        if r is not None:
            x, y, w, h = r
            im[y:y + h, x:x + w] = 255
        cv2.imwrite(str(folder / f"{i + 1:03d}.png"), im)
    return folder


def blob_meta(tiny):
    ckpt, params, _ = tiny
    return load_runner(ckpt, stage=1, params=params).meta


def test_refinement_moves_the_box_to_the_infant(tiny, tmp_path):
    rect = (200, 30, 40, 60)                     # small and off-centre in a 320 x 240 frame
    frames = blob_frames(tmp_path / "blob", [rect] * 3)
    runner = BlobRunner(blob_meta(tiny))
    one = predict_frames(runner, open_source(frames), refine=None)
    # min_iou 0.8: the stand-in's joints snap to heatmap cells (1/12 of the crop's width) and jitter more
    res = predict_frames(runner, open_source(frames), refine=RefineParams(iterations=6, min_iou=0.8))
    s = res.summary()
    assert s["refine"]["unconverged"] == 0 and s["box_modes"] == {"frame": 3}
    target = joints_box(np.array([[200, 30], [239, 89]], float), RefineParams.margin, RefineParams.min_size)
    for fp, first in zip(res.frames, one.frames):
        assert 2 <= fp.model_calls <= 7                        # it moved, and stopped before the cap
        assert box_iou(fp.boxes, target[None])[0] > 0.8       # measured 0.86
        assert fp.raw[0][:, 2].mean() > 2 * first.raw[0][:, 2].mean()    # a tighter crop, more confident
        lo, hi = fp.raw[0][:, :2].min(axis=0), fp.raw[0][:, :2].max(axis=0)
        np.testing.assert_allclose(np.r_[lo, hi], [200, 30, 239, 89], atol=6)    # measured <= 3.4 px
    assert s["model_calls"] == sum(fp.model_calls for fp in res.frames)


def test_iteration_cap_keeps_the_most_confident_iteration():
    calls = []
    confidences = [0.3, 0.9, 0.5, 0.4, 0.8]

    def drifting(images, boxes):            # joints 50 px further right each call: never stable
        n = len(calls)
        calls.append(len(boxes))
        xy = np.stack(np.meshgrid(np.linspace(0, 40, 4), np.linspace(0, 60, 3)), -1).reshape(J, 2) + [50 * n, 0]
        kp = np.concatenate([np.broadcast_to(xy, (len(boxes), J, 2)), np.full((len(boxes), J, 1), confidences[n])], -1)
        return kp, np.full(len(boxes), 4)

    out = refine_boxes(drifting, [np.zeros((10, 10, 1), np.uint8)], np.array([[0.0, 0, 640, 480]]),
                       RefineParams(iterations=2))
    assert calls == [1, 1, 1] and out.calls.tolist() == [3] and not out.converged[0]     # 1 + 2 iterations
    assert out.confidence[0] == pytest.approx(0.9)                                      # the second call's
    assert out.keypoints[0, 0, 0] == pytest.approx(50.0)
    np.testing.assert_allclose(out.boxes[0], joints_box(np.array([[0, 0], [40, 60]], float), 0.2, 32.0))
    calls.clear()
    out = refine_boxes(drifting, [np.zeros((10, 10, 1), np.uint8)], np.array([[0.0, 0, 640, 480]]),
                       RefineParams(iterations=0))
    assert calls == [1] and out.calls.tolist() == [1]


def test_converged_frames_leave_the_batch():
    seen = []

    def fixed(images, boxes):               # joints at one place whatever the crop: stable after one move
        seen.append(len(boxes))
        xy = np.stack(np.meshgrid(np.linspace(100, 140, 4), np.linspace(50, 110, 3)), -1).reshape(J, 2)
        conf = np.where(boxes[:, 2] < 100, 0.7, 0.5)[:, None, None]          # tight crops: more confident
        kp = np.concatenate([np.broadcast_to(xy, (len(boxes), J, 2)), np.broadcast_to(conf, (len(boxes), J, 1))], -1)
        return kp, np.full(len(boxes), 3)

    target = joints_box(np.array([[100, 50], [140, 110]], float), 0.2, 32.0)
    seeds = np.stack([[0.0, 0, 640, 480], target])             # the second seed is already the answer
    out = refine_boxes(fixed, [None, None], seeds, RefineParams(iterations=3))
    assert seen == [2, 1] and out.calls.tolist() == [2, 1] and out.converged.all()
    np.testing.assert_allclose(out.boxes, [target, target])


def test_track_recovers_in_the_frame_it_is_lost_and_logs_it(tiny, tmp_path, caplog):
    a, b = (30, 20, 40, 60), (220, 150, 40, 60)               # the infant jumps between frames 2 and 3
    frames = blob_frames(tmp_path / "blob", [a, a, b, b, None, a])
    runner = BlobRunner(blob_meta(tiny))
    with caplog.at_level(logging.INFO, logger="okdpose.predict"):
        res = predict_frames(runner, open_source(frames), track=True)
    kinds = [fp.box_kind for fp in res.frames]
    # 3: the tracked box sees nothing and the frame is searched afresh; 5: empty, the afresh search finds
    # nothing better either (the tracked result is kept), so 6 starts from the frame
    assert kinds == ["frame", "track", "frame", "track", "track", "frame"]
    box_a, box_b = (joints_box(np.array([[x, y], [x + w - 1, y + h - 1]], float), 0.2, 32)[None]
                    for x, y, w, h in (a, b))
    assert box_iou(res.frames[1].boxes, box_a)[0] > 0.8 and box_iou(res.frames[2].boxes, box_b)[0] > 0.8
    assert "002.png: " not in caplog.text
    assert "003.png: tracked box lost the infant" in caplog.text and "searching from the frame" in caplog.text
    assert "006.png: the previous frame lost the infant" in caplog.text


def test_refine_options(tiny, folder, tmp_path, capsys):
    ckpt, params, _ = tiny
    base = [folder, "--model", ckpt, "--stage", 1, "--params", params]
    code, _, err = run(base + ["--out", tmp_path / "a", "--refine", -1], capsys)
    assert code == 2 and "--refine must be >= 0" in err
    dets = tmp_path / "dets.json"
    dets.write_text("[]")
    code, _, err = run(base + ["--out", tmp_path / "b", "--refine", 2, "--boxes", dets], capsys)
    assert code == 2 and "--refine" in err and "--boxes" in err
    code, stdout, err = run(base + ["--out", tmp_path / "c", "--refine", 0], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["refine"] is None and summary["model_calls"] == 9 and "model calls" not in stdout
    code, stdout, err = run(base + ["--out", tmp_path / "d", "--refine", 1], capsys)
    assert code == 0 and "model calls/frame" in stdout
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["refine"]["iterations"] == 1 and 9 <= summary["model_calls"] <= 18


# --------------------------------------------------------------------------- bad options, files and folders

def no_debris(root: Path) -> bool:
    """No temporary or moved-aside folder left anywhere under `root`."""
    return not [p for p in root.rglob(".*") if p.name.endswith((".tmp", ".old"))]


def test_exit_threshold_inf_is_null_in_the_summary(tiny, folder, tmp_path, capsys):
    ckpt, params, _ = tiny
    out = tmp_path / "out"
    code, _, err = run([folder, "--model", ckpt, "--exit-threshold", "inf", "--params", params, "--out", out,
                        "--refine", 0], capsys)
    assert code == 0, err                                       # json.dumps refused inf after all the work
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_threshold"] is None and summary["exit_share"] == {"stage2": 1.0}     # null: never early


@pytest.mark.parametrize("options, words", [
    (["--region", 0, 0, 1e300, 1e300], "--region must be"),                 # inf once cast to float32
    (["--smooth", "--min-cutoff", "inf"], "--min-cutoff must be a finite number"),
    (["--smooth", "--beta", "inf"], "--beta must be a finite number"),
    (["--fps", "inf"], "--fps must be a frame rate"),                       # hung in cv2.VideoWriter
    (["--fps", 1e-9], "--fps must be a frame rate"),
    (["--track", "--track-min-confidence", "nan"], "--track-min-confidence must be in [0, 1]"),
    (["--track", "--track-min-confidence", -5], "--track-min-confidence must be in [0, 1]"),
    (["--threads", 100000], "--threads must be from 1 to"),
])
def test_out_of_range_options_are_refused_before_any_work(tiny, folder, tmp_path, capsys, options, words):
    ckpt, params, _ = tiny
    out = tmp_path / "out"
    code, _, err = run([folder, "--model", ckpt, "--stage", 1, "--params", params, "--out", out, "--refine", 0,
                        "--video-out"] + options, capsys)
    assert code == 2 and words in err and "Traceback" not in err
    assert not out.exists() and no_debris(tmp_path)


def test_non_finite_model_outputs_name_the_model(tiny, folder, tmp_path, capsys):
    from okdpose.model.checkpoint import save_checkpoint

    ckpt, params, model = tiny
    with torch_no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    bad = tmp_path / "nan.pt"
    save_checkpoint(bad, model)
    out = tmp_path / "out"
    code, _, err = run([folder, "--model", bad, "--stage", 1, "--params", params, "--out", out, "--overlay"], capsys)
    assert code == 2 and "nan.pt: tensor" in err and "holds 1 non-finite values (NaN / inf)" in err  # refused when loaded
    assert not out.exists() and no_debris(tmp_path)
    with torch_no_grad():                    # finite weights whose heatmaps overflow float32: the outputs' check
        next(model.parameters()).view(-1)[0] = 0.0
        model.intermediate_layers["0"].weight.fill_(3e38)
    big = tmp_path / "big.pt"
    save_checkpoint(big, model)
    code, _, err = run([folder, "--model", big, "--stage", 1, "--params", params, "--out", out, "--overlay"], capsys)
    assert code == 2 and "big.pt: its outputs are not finite" in err
    assert not out.exists() and no_debris(tmp_path)


def torch_no_grad():
    import torch

    return torch.no_grad()


@pytest.mark.parametrize("record, words", [
    ({"category_id": [3]}, "record 0: category_id must be an integer"),       # was: unhashable type
    ({"category_id": {"id": 3}}, "record 0: category_id must be an integer"),
    ({"image_id": 110001.7}, "record 0: image_id must be an integer"),        # was: truncated to 110001
    ({"bbox": [[209, 150], [201, 329]]}, "record 0: bbox must be 4 numbers"),  # was: reshaped to 4
    ({"bbox": [1e300, 1e300, 1e300, 1e300]}, "record 0: bbox [1e+300"),       # was: inf in the JSON
    (None, "no detections in this file"),                                     # was: an empty result
])
def test_bad_detection_records_are_named(tiny, folder, tmp_path, capsys, record, words):
    ckpt, params, _ = tiny
    first = int(sorted(folder.glob("*.png"))[0].stem)
    dets = tmp_path / "dets.json"
    good = {"image_id": first, "category_id": 3, "bbox": [10, 10, 100, 100], "score": 0.9}
    dets.write_text(json.dumps([] if record is None else [{**good, **record}]))
    out = tmp_path / "out"
    code, _, err = run([folder, "--model", ckpt, "--stage", 1, "--params", params, "--out", out, "--boxes", dets],
                       capsys)
    assert code == 2 and f"dets.json: {words}" in err and "Traceback" not in err
    assert not out.exists()


def depth_frames(src: Path, dest: Path, names) -> Path:
    """`src`'s first frames copied under `names` (a suffix other than .png: re-encoded, 8-bit)."""
    dest.mkdir()
    for f, name in zip(sorted(src.glob("*.png")), names):
        if name.endswith(".png"):
            shutil.copy(f, dest / name)
        else:
            cv2.imwrite(str(dest / name), read_frame(f, DEPTH_RANGE)[..., 0])
    return dest


def test_frames_sharing_a_name_keep_their_overlays_and_ids(tiny, folder, tmp_path, capsys):
    ckpt, params, _ = tiny
    base = ["--model", ckpt, "--stage", 1, "--params", params, "--refine", 0]
    frames = depth_frames(folder, tmp_path / "ab", ["a.png", "a.jpg", "b.png", "\u00b2.png"])
    code, _, err = run([frames, *base, "--out", tmp_path / "ab_out", "--overlay"], capsys)
    assert code == 0, err                          # '\u00b2.png': isdigit() then int() was a ValueError
    overlays = sorted(p.name for p in (tmp_path / "ab_out" / "overlay").glob("*.png"))
    assert overlays == ["a_jpg.png", "a_png.png", "b.png", "\u00b2.png"]            # a.jpg overwrote a.png
    ids = [r["image_id"] for r in json.loads((tmp_path / "ab_out" / "keypoints.json").read_text())]
    assert sorted(ids) == [0, 1, 2, 3]
    frames = depth_frames(folder, tmp_path / "ones", ["1.png", "01.png"])
    out = tmp_path / "ones_out"
    code, _, err = run([frames, *base, "--out", out], capsys)
    assert code == 2 and "01.png and 1.png would both be image_id 1" in err and not out.exists()


def test_out_that_would_lose_something_is_refused_first(tiny, folder, tmp_path, capsys, monkeypatch):
    ckpt, params, _ = tiny
    base = ["--model", ckpt, "--stage", 1, "--params", params, "--refine", 0]
    nest = tmp_path / "out" / "nest"
    code, _, err = run([folder, *base, "--out", nest, "--overlay"], capsys)
    assert code == 0, err
    before = sorted(p.name for p in (nest / "overlay").iterdir())
    for out in (nest, nest.parent, nest / "overlay"):              # holds the input, or is it: it was deleted
        code, _, err = run([nest / "overlay", *base, "--out", out], capsys)
        assert code == 2 and "holds the input" in err
    assert sorted(p.name for p in (nest / "overlay").iterdir()) == before
    code, _, err = run([folder, "--model", ckpt, "--stage", 1, "--params", params, "--out", tmp_path / "model"],
                       capsys)
    assert code == 2 and "holds --model" in err and ckpt.exists()
    (tmp_path / "single.png").write_bytes(b"x")
    code, _, err = run([folder, *base, "--out", tmp_path / "single.png" / "sub"], capsys)
    assert code == 2 and "--out" in err and "single.png is a file, not a folder" in err
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    code, _, err = run([folder, *base, "--out", "."], capsys)       # was: EBUSY after the work, `..x.old/` left
    assert code == 2 and "--out . cannot be replaced" in err and "current folder" in err
    assert no_debris(tmp_path) and list(here.iterdir()) == []


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_interrupted_run_leaves_no_temporary_folder(tiny, folder, tmp_path, capsys, monkeypatch, signal_name):
    import os
    import signal

    from okdpose import predict

    ckpt, params, _ = tiny
    real = predict.OverlayWriter.__call__

    def draw_then_signal(self, fp):
        real(self, fp)
        if fp.frame.index == 2:                   # some overlays written: SIGTERM left them in out/.x.tmp
            os.kill(os.getpid(), getattr(signal, signal_name))

    monkeypatch.setattr(predict.OverlayWriter, "__call__", draw_then_signal)
    out = tmp_path / "out"
    code, _, err = run([folder, "--model", ckpt, "--stage", 1, "--params", params, "--out", out, "--refine", 0,
                        "--overlay"], capsys)
    assert code == (143 if signal_name == "SIGTERM" else 130) and "interrupted" in err and "Traceback" not in err
    assert not out.exists() and no_debris(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or signal_name == "SIGINT"   # put back


def test_video_out_names_the_frame_size(tiny, tmp_path, capsys):
    ckpt, params, _ = tiny
    frames = tmp_path / "thin"
    frames.mkdir()
    cv2.imwrite(str(frames / "001.png"), np.zeros((1, 64), np.uint8))
    code, _, err = run([frames, "--model", ckpt, "--stage", 1, "--params", params, "--out", tmp_path / "o",
                        "--refine", 0, "--video-out"], capsys)
    assert code == 2 and "frames are 64x1 px" in err and ".tmp" not in err     # not the vanished temporary path


def test_empty_video_says_so(tiny, tmp_path, capsys):
    ckpt, params, _ = tiny
    empty = tmp_path / "empty.avi"
    writer = cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    writer.release()
    code, _, err = run([empty, "--model", ckpt, "--stage", 1, "--params", params, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "empty.avi: holds no frame" in err and "warnings above" not in err
