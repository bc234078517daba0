"""Runners: a checkpoint's stage (folded) equals the model's output, anytime exits at the ends of τ,
exported ONNX / TorchScript files run with their metadata, and bad model files are named."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from okdpose.deploy_meta import DeployMeta
from okdpose.model import MultiOutHRNet, save_checkpoint
from okdpose.params import load_params
from okdpose.runner import ModelError, load_runner

IMAGE_SIZE, HEATMAP_SIZE = (48, 64), (12, 16)      # (w, h): a 2-stage HRNet needs multiples of 8
PARAMS = f"""data:
  image_size: {list(IMAGE_SIZE)}
  heatmap_size: {list(HEATMAP_SIZE)}
  depth_range: [400.0, 1200.0]
model:
  width: 4
  n_stage: 2
loss:
  kld_couples: [[1, 2]]
"""


def random_model(n_stage: int = 2, multi: bool = True, seed: int = 0) -> MultiOutHRNet:
    """A W4 model with weights and BN statistics far from the init (so folding and heads matter)."""
    torch.manual_seed(seed)
    model = MultiOutHRNet(12, 4, n_stage, multi)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.normal_(0.0, 0.3)
    return model.eval()


def write_tiny(tmp: Path, n_stage: int = 2, multi: bool = True) -> tuple[Path, Path, MultiOutHRNet]:
    """-> (checkpoint, params file, model)."""
    model = random_model(n_stage, multi)
    ckpt, params = tmp / "model.pt", tmp / "params.yaml"
    save_checkpoint(ckpt, model)
    params.write_text(PARAMS)
    return ckpt, params, model


@pytest.fixture
def tiny(tmp_path):
    return write_tiny(tmp_path)


def batch(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, IMAGE_SIZE[1], IMAGE_SIZE[0])).astype(np.float32)


def reference(model: MultiOutHRNet, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in model(torch.from_numpy(x))]


def close(got: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    """Folded BN and channels-last change float rounding only (tests/test_fuse.py: inference_copy's bound)."""
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= rel * np.abs(ref).max() + 1e-6


@pytest.mark.parametrize("stage", [1, 2])
def test_checkpoint_stage_runs_like_the_model(tiny, stage):
    ckpt, params, model = tiny
    runner = load_runner(ckpt, stage=stage, params=params)
    x = batch()
    hm, exit_stage = runner(x)
    close(hm, reference(model, x)[stage - 1])
    assert hm.dtype == np.float32 and exit_stage.tolist() == [stage] * 3
    expected = DeployMeta.from_params(load_params(params), stage=stage, source={"checkpoint": str(ckpt)})
    assert runner.meta == dataclasses.replace(expected, width=4, n_stage_trained=2)
    assert runner.backend == "checkpoint" and "stage" in runner.describe()


def test_checkpoint_stage_choice_is_checked(tiny, tmp_path):
    ckpt, params, _ = tiny
    with pytest.raises(ModelError, match="choose one with --stage k"):
        load_runner(ckpt, params=params)
    with pytest.raises(ModelError, match=r"--stage 3 is not an output .* \[1, 2\]"):
        load_runner(ckpt, stage=3, params=params)
    (tmp_path / "single").mkdir()
    single, sparams, _ = write_tiny(tmp_path / "single", multi=False)
    with pytest.raises(ModelError, match="multi: false"):
        load_runner(single, stage=1, params=sparams)
    with pytest.raises(ModelError, match="multi-output"):
        load_runner(single, exit_threshold=0.5, params=sparams)


def test_checkpoint_joints_must_match_the_params(tiny, tmp_path):
    ckpt, _, _ = tiny
    other = tmp_path / "coco.yaml"
    other.write_text(PARAMS.replace("data:\n", "data:\n  source: local\n  path: /data\n  joints: coco17\n"))
    with pytest.raises(ModelError, match=r"predicts 12 joints but .*coco.yaml data.joints is 'coco17' \(17 joints\)"):
        load_runner(ckpt, stage=1, params=other)


def test_params_describing_another_input_than_training_are_warned_about(tmp_path, caplog):
    # the checkpoint keeps its training params: a params.yaml edited after training (here the
    # input size) would run the model at another size and move its keypoints without a word
    model = random_model()
    ckpt, given = tmp_path / "model.pt", tmp_path / "params.yaml"
    trained = load_params_text(tmp_path, PARAMS).to_dict()
    save_checkpoint(ckpt, model, params=trained)
    given.write_text(PARAMS)
    with caplog.at_level("WARNING", logger="okdpose.runner"):
        load_runner(ckpt, stage=2, params=given)
    assert not caplog.records, "the same params: no warning"
    given.write_text(PARAMS.replace(f"image_size: {list(IMAGE_SIZE)}", "image_size: [64, 96]")
                     .replace(f"heatmap_size: {list(HEATMAP_SIZE)}", "heatmap_size: [16, 24]"))
    with caplog.at_level("WARNING", logger="okdpose.runner"):
        load_runner(ckpt, stage=2, params=given)
    text = caplog.text
    assert "data.image_size [64, 96] (trained with [48, 64])" in text
    assert "data.heatmap_size [16, 24] (trained with [12, 16])" in text
    assert "sigma" not in text and str(given) in text


def load_params_text(tmp: Path, text: str):
    f = tmp / "trained.yaml"
    f.write_text(text)
    return load_params(f)


def test_anytime_runner_exits_at_the_ends_of_tau(tiny):
    ckpt, params, model = tiny
    x = batch(4)
    ref = reference(model, x)
    never = load_runner(ckpt, exit_threshold=math.inf, params=params)
    hm, exit_stage = never(x)
    assert exit_stage.tolist() == [2] * 4 and never.backend == "checkpoint anytime"
    close(hm, ref[1])
    always = load_runner(ckpt, exit_threshold=0.0, params=params)
    hm, exit_stage = always(x)
    assert exit_stage.tolist() == [1] * 4
    close(hm, ref[0])
    with pytest.raises(ModelError, match=">= 0"):
        load_runner(ckpt, exit_threshold=float("nan"), params=params)


@pytest.fixture
def exported(tiny, tmp_path):
    """The stage-1 export of the tiny model in both formats (okdpose.export, helper B's module)."""
    export = pytest.importorskip("okdpose.export")
    ckpt, params, model = tiny
    meta = load_runner(ckpt, stage=1, params=params).meta
    sm = export.stage_model(model, 1)
    return {"onnx": export.write_onnx(sm, tmp_path / "stage1.onnx", meta),
            "torchscript": export.write_torchscript(sm, tmp_path / "stage1.pt", meta),
            "meta": meta, "model": model, "export": export}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_files_run_with_their_metadata(exported, fmt):
    runner = load_runner(exported[fmt])
    assert runner.backend == fmt and runner.meta == exported["meta"]
    x = batch(5)                                    # another batch size than the export's example
    hm, exit_stage = runner(x)
    close(hm, reference(exported["model"], x)[0])
    assert exit_stage.tolist() == [1] * 5
    with pytest.raises(ModelError, match="stage-1 export; --stage 2"):
        load_runner(exported[fmt], stage=2)
    with pytest.raises(ModelError, match="cannot exit early"):
        load_runner(exported[fmt], exit_threshold=0.5)


def test_exported_file_disagreeing_with_its_metadata(exported, tmp_path):
    export, meta = exported["export"], exported["meta"]
    liar = dataclasses.replace(meta, joints="coco17", joint_names=tuple(f"j{i}" for i in range(17)))
    path = export.write_onnx(export.stage_model(exported["model"], 1), tmp_path / "liar.onnx", liar)
    runner = load_runner(path)
    with pytest.raises(ModelError, match=r"outputs \(2, 12, 16, 12\) heatmaps, its metadata says \(B, 17 joints"):
        runner(batch(2))
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(export.onnx_bytes(export.stage_model(exported["model"], 1), None, meta.image_size))
    with pytest.raises(ModelError, match="without okdpose metadata"):
        load_runner(bare)


def test_bad_model_files_are_named(tmp_path):
    with pytest.raises(ModelError, match="model file not found"):
        load_runner(tmp_path / "none.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ModelError, match="junk.onnx: onnxruntime cannot load it"):
        load_runner(junk)
    junk_pt = tmp_path / "junk.pt"
    junk_pt.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ModelError, match=r"junk.pt: not a checkpoint .* exported model"):
        load_runner(junk_pt)
    plain = tmp_path / "state_dict.pt"
    torch.save(random_model().state_dict(), plain)
    with pytest.raises(ModelError, match="not an okdpose checkpoint"):
        load_runner(plain, stage=1)
