"""okdpose.export, ExportParams and stages/export.py on tiny models (W4, 3 stages, 48x64 crops)."""
from __future__ import annotations

import json
import os
import runpy
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper
from torch import nn

from okdpose.codec import HeatmapCodec
from okdpose.data.dataset import PoseDataset
from okdpose.deploy_meta import DeployMeta, MetaError
from okdpose.export import (PRECISION_TOLERANCE, ExportError, Crops, compare, dataset_crops, export_precision,
                            export_report, export_stage, heatmaps, latency_lines, latency_ms, lowered, main,
                            near_ties, onnx_bytes, onnx_runner, precision_info, precision_shift, random_crops,
                            read_meta, stage_model, stage_test_ap, staged_out, torch_runner, torchscript_bytes,
                            torchscript_runner, write_onnx, write_torchscript)
from okdpose.joints import BABYPOSE12
from okdpose.model import MultiOutHRNet, save_checkpoint
from okdpose.params import ParamsError, params_from_dict

import fakes
from conftest import TINY_IMAGE_SIZE
from fakes import FakeTracker

ROOT = Path(__file__).resolve().parents[1]
J, WIDTH, N_STAGE = BABYPOSE12.num_joints, 4, 3
CODEC = HeatmapCodec(TINY_IMAGE_SIZE, (12, 16), 1.0)
TINY = {"data": {"image_size": list(TINY_IMAGE_SIZE), "heatmap_size": [12, 16]},
        "model": {"width": WIDTH, "n_stage": N_STAGE}, "loss": {"kld_couples": [[2, 3]]}}
# measured on a 2-core AVX2 CPU (these models, 48x64 crops): |folded - whole model|, |onnxruntime -
# PyTorch| and |TorchScript - PyTorch| <= 2e-6 x the heatmap scale; the default 1e-4 leaves ~50x
TOL = 1e-4


def trained_like(n_stage: int = N_STAGE, multi: bool = True, seed: int = 0) -> MultiOutHRNet:
    """A tiny model with non-trivial BN statistics (folding changes every conv) and peaked heatmaps."""
    return fakes.trained_like(n_stage, WIDTH, seed, multi=multi, num_joints=J, input_hw=(64, 48))


def meta_for(stage: int) -> DeployMeta:
    p = params_from_dict(TINY)
    return DeployMeta.from_params(p, stage=stage, test_ap=0.5, source={"commit": "abc"})


@pytest.fixture(scope="module")
def model() -> MultiOutHRNet:
    return trained_like()


@pytest.fixture(scope="module")
def crops(tiny_prepared) -> Crops:
    return dataset_crops(PoseDataset(tiny_prepared, "test", BABYPOSE12, CODEC), 8)


@pytest.fixture(scope="module")
def exported(model, crops, tmp_path_factory):
    """Stage 2 of `model` exported in both formats (once for the module)."""
    out = tmp_path_factory.mktemp("export")
    return export_stage(model, 2, out, meta_for(2), crops, tolerance=TOL)


# --------------------------------------------------------------------------- the standalone model

@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_model_builds_only_its_stage_and_equals_the_whole_models_output(model, stage):
    sm = stage_model(model, stage)
    names = {n.split(".")[1] for n, _ in sm.named_modules() if n.count(".") >= 1}
    assert not any(f"stage{k}" in names for k in range(stage + 1, 5))        # nothing after the stage
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sm.modules()) and not sm.training
    assert set(stage_model(model, stage, fold=False).state_dict()) <= {f"net.{k}" for k in model.state_dict()}
    x = torch.randn(3, 3, 64, 48)
    with torch.no_grad():
        full, alone = model(x)[stage - 1], sm(x)
    assert alone.shape == (3, J, 16, 12) and full.abs().max() > 0.1
    torch.testing.assert_close(alone, full, rtol=0, atol=TOL * full.abs().max().item())
    assert sm.stage == stage and sum(p.numel() for p in sm.parameters()) < sum(p.numel() for p in model.parameters())


def test_stage_model_refuses_a_stage_the_model_does_not_output_or_lacks_weights_for(model, monkeypatch):
    with pytest.raises(ExportError, match=r"stage 2 is not an output .*\[3\]"):
        stage_model(trained_like(multi=False), 2)
    with pytest.raises(ExportError, match="not an output"):
        stage_model(model, 4)
    broken = trained_like()
    sd = broken.state_dict()
    monkeypatch.setattr(broken, "state_dict", lambda: {k: v for k, v in sd.items() if k != "stage2.0.branches.1.0.conv1.weight"})
    with pytest.raises(ExportError, match="stage2.0.branches.1.0.conv1.weight"):
        stage_model(broken, 2)


# --------------------------------------------------------------------------- files

def test_exports_carry_their_metadata_and_agree_with_pytorch_at_any_batch_size(exported, crops):
    files = exported.files
    assert sorted(files) == ["onnx", "torchscript"] and [p.name for p in files.values()] == ["stage2.onnx", "stage2.pt"]
    for path in files.values():
        assert read_meta(path) == meta_for(2)
    proto = onnx.load(str(files["onnx"]))
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["heatmaps"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    ref = heatmaps(torch_runner(exported.model), crops)
    for fmt, run in (("onnx", onnx_runner(files["onnx"])), ("torchscript", torchscript_runner(files["torchscript"]))):
        v = exported.verify[fmt]
        assert v["mismatches"] == 0 and v["rel_diff"] <= TOL and v["crops"] == len(crops) == 3
        for b in (1, 3):                                              # the trace's batch was 2
            got = heatmaps(run, crops, batch=b)
            assert got.shape == ref.shape
            np.testing.assert_allclose(got, ref, rtol=0, atol=TOL * np.abs(ref).max())
    assert exported.verify["full_model"]["mismatches"] == 0


def test_channels_last_inputs_and_outputs_as_predict_runs_them(exported, crops):
    x = torch.from_numpy(crops.images).contiguous(memory_format=torch.channels_last)
    ts = torchscript_runner(exported.files["torchscript"])
    ref = heatmaps(torch_runner(exported.model, channels_last=False), crops)
    with torch.no_grad():
        np.testing.assert_allclose(ts(x.numpy()), ref, rtol=0, atol=TOL * np.abs(ref).max())


def test_read_meta_round_trip_and_names_the_file_when_there_is_none(tmp_path, model):
    sm = stage_model(model, 1)
    assert read_meta(write_onnx(sm, tmp_path / "s1.onnx", meta_for(1))) == meta_for(1)
    assert read_meta(write_torchscript(sm, tmp_path / "s1.pt", meta_for(1))) == meta_for(1)
    with pytest.raises(MetaError, match="nothere.onnx: not found"):
        read_meta(tmp_path / "nothere.onnx")
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(onnx_bytes(sm, None, TINY_IMAGE_SIZE))
    with pytest.raises(MetaError, match="bare.onnx: no 'okdpose' metadata"):
        read_meta(bare)
    ckpt = tmp_path / "model.pt"                                      # a training checkpoint, not an export
    save_checkpoint(ckpt, model)
    with pytest.raises(MetaError, match=r"model.pt: no okdpose.json .*--stage k"):
        read_meta(ckpt)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    for name in ("junk.onnx", "junk.pt"):
        with pytest.raises(MetaError, match=name):
            read_meta(tmp_path / name)
    (tmp_path / "m.tflite").write_bytes(b"")
    with pytest.raises(MetaError, match="expected an exported .onnx or .pt"):
        read_meta(tmp_path / "m.tflite")


# --------------------------------------------------------------------------- verification

def test_a_corrupted_onnx_file_or_another_model_fails_verification(exported, crops, tmp_path, model):
    proto = onnx.load(str(exported.files["onnx"]))
    init = next(i for i in proto.graph.initializer if numpy_helper.to_array(i).ndim == 4)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))   # 1 % off one conv
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(proto.SerializeToString())
    ref = heatmaps(torch_runner(exported.model), crops)
    with pytest.raises(ExportError, match="bad.onnx.*above the tolerance"):
        compare(ref, heatmaps(onnx_runner(bad), crops), crops, tolerance=TOL, what=str(bad))
    other = heatmaps(torch_runner(stage_model(trained_like(seed=1), 2)), crops)
    with pytest.raises(ExportError, match="does not compute the model"):
        compare(ref, other, crops, tolerance=TOL)
    with pytest.raises(ExportError, match="shape"):
        compare(ref, ref[:, :-1], crops, tolerance=TOL)


def codec_crops(n: int) -> Crops:
    return random_crops(n, CODEC)


def test_decoded_points_agree_except_counted_near_ties():
    ref = np.zeros((2, 3, 16, 12), np.float32)
    ref[:, :, 5, 5], ref[:, :, 5, 4], ref[:, :, 4, 5] = 1.0, 0.5, 0.4   # clear peaks, clear refinement sides
    ref[0, 0, 9, 9] = 1.0 - 1e-7                                       # a near-tie: runner-up within reach
    got = ref.copy()
    got[0, 0, 9, 9] += 2e-7                                            # ... which the export tips
    r = compare(ref, got, codec_crops(2), tolerance=TOL, max_near_ties=0.2)
    assert r["near_ties"] == 1 and r["differing_points"] == 1 and r["mismatches"] == 0 and r["points"] == 6
    assert near_ties(ref, 4e-7).sum() == 1 and near_ties(ref, 0.0).sum() == 0
    assert r["keypoint_check"] == "passed"
    # too many ties: the keypoint check means little; said so (the heatmaps still agree)
    assert compare(ref, got, codec_crops(2), tolerance=TOL, max_near_ties=0.1)["keypoint_check"] == "inconclusive"
    # a clear point cannot decode elsewhere within the bound (its runner-up is > 2 max |diff| below):
    # moving one needs a difference the tolerance refuses first
    moved = ref.copy()
    moved[1, 2, 5, 4] = 1.0 + 1e-5
    with pytest.raises(ExportError, match="above the tolerance"):
        compare(ref, moved, codec_crops(2), tolerance=TOL, max_near_ties=0.5)


# --------------------------------------------------------------------------- cost

def test_report_times_every_runtime_next_to_the_teacher(model, exported, crops):
    r = export_report(model, [exported], crops, batches=(1, 2), repeats=1, threads=1)
    assert set(r) == {"teacher", "stage2"} and r["teacher"]["stage"] == 3
    s = r["stage2"]
    assert set(s["latency_ms"]) == set(s["speedup"]) == {"pytorch", "onnxruntime", "torchscript"}
    assert set(s["latency_ms"]["onnxruntime"]) == {"b1", "b2"} == set(r["teacher"]["latency_ms"]["pytorch"])
    assert s["flop_ratio"] > 1 and s["gflops"] < r["teacher"]["gflops"] and s["params_M"] < r["teacher"]["params_M"]
    assert s["file_MB"]["onnx"] > 0 and s["verify"] is exported.verify
    assert s["precision"] == {"pytorch": "fp32", "onnxruntime": "fp32", "torchscript": "fp32"}
    json.dumps(r, allow_nan=False)
    t = latency_ms({"a": {"x": lambda x: x}}, crops.images, (1, 4), repeats=2, warmup=0)
    assert set(t["a"]["x"]) == {"b1", "b4"}


def test_report_times_the_files_as_verified_without_loading_them_again(model, exported, crops, monkeypatch):
    import okdpose.export as export_mod

    assert set(exported.runners) == {"onnx", "torchscript"}
    calls = {fmt: 0 for fmt in exported.runners}

    def counted(fmt):
        run = exported.runners[fmt]

        def wrapped(x):
            calls[fmt] += 1
            return run(x)
        return wrapped

    def no_reload(*_args, **_kw):
        raise AssertionError("a verified file was loaded again")

    monkeypatch.setattr(export_mod, "onnx_runner", no_reload)
    monkeypatch.setattr(export_mod, "torchscript_runner", no_reload)
    again = replace(exported, runners={fmt: counted(fmt) for fmt in exported.runners})
    r = export_report(model, [again], crops, batches=(1,), repeats=2, threads=1, formats=())
    assert calls == {"onnx": 4, "torchscript": 4}               # 2 warm-up + 2 timed calls each
    assert set(r["stage2"]["latency_ms"]) == {"pytorch", "onnxruntime", "torchscript"}


# --------------------------------------------------------------------------- precision

def weight_dtypes(path: Path) -> set:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)       # torch 2.14: torch.jit.load is deprecated
        return {q.dtype for q in torch.jit.load(str(path)).parameters()}


@pytest.fixture(scope="module")
def exported_fp16(model, crops, tmp_path_factory):
    """Stage 2 of `model` exported in fp16, both formats (once for the module)."""
    return export_stage(model, 2, tmp_path_factory.mktemp("fp16"), meta_for(2), crops, tolerance=TOL, precision="fp16")


def test_fp32_files_are_as_before_no_casts_no_precision_field(exported, model):
    sm = stage_model(model, 2)
    assert lowered(sm, "fp32") is sm and exported.precision == {"onnx": "fp32", "torchscript": "fp32"}
    proto = onnx.load(str(exported.files["onnx"]))
    assert "Cast" not in {n.op_type for n in proto.graph.node}
    assert "precision" not in json.loads({p.key: p.value for p in proto.metadata_props}["okdpose"])
    assert exported.verify["onnx"]["precision"] == "fp32" and exported.verify["onnx"]["tolerance"] == TOL
    v = exported.verify["torchscript"]["vs_fp32"]            # fp32: rounding only
    assert v["max_rel_diff"] <= TOL and v["shift_px_max"] < 1e-3 and v["points_moved_1px"] == 0


def test_fp16_exports_compute_in_fp16_with_float32_io_and_record_the_cost(exported_fp16, crops):
    from okdpose.runner import load_runner

    e = exported_fp16
    assert e.precision == {"onnx": "fp16", "torchscript": "fp16"}
    for path in e.files.values():
        assert read_meta(path) == replace(meta_for(2), precision="fp16")
    proto = onnx.load(str(e.files["onnx"]))
    f32 = onnx.TensorProto.FLOAT
    assert proto.graph.input[0].type.tensor_type.elem_type == f32 == proto.graph.output[0].type.tensor_type.elem_type
    assert {i.data_type for i in proto.graph.initializer if len(i.dims) == 4} == {onnx.TensorProto.FLOAT16}
    assert weight_dtypes(e.files["torchscript"]) == {torch.float16}
    ref32 = heatmaps(torch_runner(e.model, channels_last=False), crops)
    for fmt, path in e.files.items():
        v = e.verify[fmt]
        assert v["precision"] == "fp16" and v["tolerance"] == PRECISION_TOLERANCE["fp16"] and v["mismatches"] == 0
        s32 = v["vs_fp32"]
        # it does compute in fp16 (not silently fp32), within what fp16 costs (measured <= 3e-3 here)
        assert 0 < s32["max_rel_diff"] <= PRECISION_TOLERANCE["fp16"]
        assert all(np.isfinite(x) for x in s32.values()) and s32["points"] == len(crops) * J
        runner = load_runner(path)                           # as okdpose predict loads it: float32 in and out
        assert runner.meta.precision == "fp16"
        hm, _ = runner(crops.images)
        assert hm.dtype == np.float32 and hm.shape == ref32.shape
        np.testing.assert_allclose(hm, ref32, rtol=0, atol=PRECISION_TOLERANCE["fp16"] * np.abs(ref32).max())
    assert e.verify["full_model"]["tolerance"] == TOL         # the fp32 stage model itself: fp32's bound


def tiniest():
    """bf16 is emulated on CPUs without bf16 units (16-36x slower): the tiniest model, meta and crops."""
    p = params_from_dict({"data": {"image_size": [32, 32], "heatmap_size": [8, 8]},
                          "model": {"width": 2, "n_stage": 2}, "loss": {"kld_couples": [[1, 2]]}})
    m = fakes.trained_like(2, 2, 0, num_joints=J, input_hw=(32, 32))
    return m, DeployMeta.for_model(p, m, stage=2), random_crops(2, HeatmapCodec((32, 32), (8, 8), 1.0))


def test_bf16_torchscript_export_runs_and_is_verified(tmp_path):
    m, meta, crops = tiniest()
    e = export_stage(m, 2, tmp_path, meta, crops, formats=("torchscript",), precision="bf16", max_near_ties=1.0)
    path = e.files["torchscript"]
    assert read_meta(path).precision == "bf16" and e.precision == {"torchscript": "bf16"}
    assert weight_dtypes(path) == {torch.bfloat16}
    v = e.verify["torchscript"]
    assert v["precision"] == "bf16" and v["tolerance"] == PRECISION_TOLERANCE["bf16"] and v["mismatches"] == 0
    assert 0 < v["vs_fp32"]["max_rel_diff"] <= PRECISION_TOLERANCE["bf16"]
    out = torchscript_runner(path)(crops.images)
    assert out.dtype == np.float32 and out.shape == (2, J, 8, 8)


def test_bf16_onnx_is_refused_with_the_fix(model, crops, tmp_path):
    with pytest.raises(ParamsError) as err:
        params_from_dict({"export": {"precision": "bf16"}})            # default formats: onnx and torchscript
    for w in ("export.precision", "bf16", "export.formats: [torchscript]", "fp16"):
        assert w in str(err.value)
    assert params_from_dict({"export": {"precision": "bf16", "formats": ["torchscript"]}}).export.precision == "bf16"
    assert params_from_dict({"export": {"precision": "auto"}}).export.precision == "auto"
    with pytest.raises(ExportError, match=r"bf16 cannot be written as onnx.*export.formats: \[torchscript\]"):
        export_stage(model, 2, tmp_path / "x", meta_for(2), crops, precision="bf16")
    assert not (tmp_path / "x").exists()                              # refused before any work
    with pytest.raises(ParamsError, match=r"export.precision is 'int8'; choose one of"):
        params_from_dict({"export": {"precision": "int8"}})


def test_auto_precision_follows_the_cpus_bf16_units_where_measured_faster():
    # speedup: what okdpose.device.cpu_bf16_probe would report on that CPU (as in test_device)
    for flags, speedup, ts in (({"avx2", "fma"}, 2.0, "fp32"), ({"avx2", "avx512f"}, 2.0, "fp32"),
                               ({"avx512_bf16"}, 2.2, "bf16"), ({"amx_bf16", "amx_tile"}, 5.8, "bf16"),
                               ({"avx512_bf16"}, 0.6, "fp32")):        # bf16 units slower than fp32 (Xeon, no AMX)
        assert export_precision("auto", "torchscript", flags, speedup) == ts
        assert export_precision("auto", "onnx", flags, speedup) == "fp32"   # onnxruntime's CPU fp16 is slower than fp32
    for asked in ("fp32", "fp16", "bf16"):
        assert export_precision(asked, "torchscript", {"avx2"}) == asked
    assert precision_info("auto", ["onnx", "torchscript"], {"fma", "avx2"}) == {
        "precision_asked": "auto", "precision": {"onnx": "fp32", "torchscript": "fp32"}, "cpu_flags": "avx2 fma"}


def test_precision_info_records_the_probe_that_auto_decided_by(monkeypatch):
    monkeypatch.setattr("okdpose.export.native_bf16", lambda device, flags=None: True)
    monkeypatch.setattr("okdpose.export.fast_bf16", lambda device, flags=None, speedup=None: True)
    probe = {"fp32_ms": 9.0, "bf16_ms": 4.0, "speedup": 2.25, "min_speedup": 1.3, "threads": 2}
    monkeypatch.setattr("okdpose.export.cpu_bf16_probe", lambda: dict(probe))
    info = precision_info("auto", ["onnx", "torchscript"])
    assert info["precision"] == {"onnx": "fp32", "torchscript": "bf16"} and info["bf16_probe"] == probe
    assert "bf16_probe" not in precision_info("fp32", ["onnx", "torchscript"])      # asked by name: no probe


def test_precision_info_on_given_flags_and_speedup():
    assert precision_info("auto", ["onnx", "torchscript"], {"fma", "amx_bf16", "avx2"}, speedup=5.8) == {
        "precision_asked": "auto", "precision": {"onnx": "fp32", "torchscript": "bf16"},
        "cpu_flags": "avx2 fma amx_bf16"}


def test_auto_exports_bf16_torchscript_and_fp32_onnx_on_a_cpu_with_bf16_units(tmp_path, monkeypatch):
    m, meta, crops = tiniest()
    monkeypatch.setattr("okdpose.export.native_bf16", lambda device, flags=None: True)     # e.g. AMX
    monkeypatch.setattr("okdpose.export.fast_bf16", lambda device, flags=None, speedup=None: True)
    e = export_stage(m, 2, tmp_path, meta, crops, precision="auto", max_near_ties=1.0)
    assert e.precision == {"onnx": "fp32", "torchscript": "bf16"}
    assert read_meta(e.files["onnx"]) == meta and read_meta(e.files["torchscript"]).precision == "bf16"
    assert e.verify["onnx"]["tolerance"] == 1e-4 and e.verify["torchscript"]["tolerance"] == PRECISION_TOLERANCE["bf16"]


def test_a_file_cannot_claim_another_precision_than_it_computes(model):
    sm = stage_model(model, 1)
    with pytest.raises(ExportError, match="metadata says precision fp32 but the model computes in fp16"):
        torchscript_bytes(lowered(sm, "fp16"), meta_for(1), TINY_IMAGE_SIZE)
    with pytest.raises(ExportError, match="fp16 already"):
        lowered(lowered(sm, "fp16"), "bf16")


def test_a_precision_whose_range_cannot_hold_the_model_is_refused(crops, tmp_path):
    tiny = trained_like()
    with torch.no_grad():
        head = tiny.get_submodule(tiny.head_layer_names()[-1])
        head.weight.mul_(1e-10)
        head.bias.mul_(1e-10)                                # ~1e-10 heatmaps: below fp16's smallest subnormal
    with pytest.raises(ExportError, match=r"stage 3 in fp16: PyTorch's own fp16 heatmaps underflow to zero.*bf16"):
        export_stage(tiny, 3, tmp_path, meta_for(3), crops, formats=("onnx",), precision="fp16")


def test_precision_shift_measures_heatmaps_and_keypoints():
    ref = np.zeros((1, 2, 16, 12), np.float32)
    ref[0, :, 5, 5] = 1.0
    got = ref.copy()
    got[0, 1, 5, 5], got[0, 1, 9, 9] = 0.9, 0.95                # joint 1's peak moves 4 heatmap px each way
    s = precision_shift(ref, got, codec_crops(1))
    assert s["max_rel_diff"] == pytest.approx(0.95) and s["points_moved_1px"] == 1 and s["points"] == 2
    assert s["shift_px_max"] > 1 and s["shift_px_mean"] == pytest.approx(s["shift_px_max"] / 2)


def test_report_times_a_lower_precision_next_to_its_fp32_counterpart(model, exported_fp16, crops):
    r = export_report(model, [exported_fp16], crops, batches=(1,), repeats=1, threads=1)
    want = {"pytorch": "fp32", "onnxruntime": "fp16", "onnxruntime_fp32": "fp32", "torchscript": "fp16",
            "torchscript_fp32": "fp32"}
    assert r["stage2"]["precision"] == r["teacher"]["precision"] == want     # the teacher in the same precision
    assert set(r["stage2"]["latency_ms"]) == set(r["stage2"]["speedup"]) == set(want)
    lines = latency_lines(r)
    assert "precision" in lines[0] and any(" onnxruntime_fp32 " in ln and " fp32 " in ln for ln in lines)
    assert any(ln.split()[1:3] == ["onnxruntime", "fp16"] for ln in lines)


# --------------------------------------------------------------------------- params

@pytest.mark.parametrize("export, words", [
    ({"stages": []}, ["export.stages", "distinct"]),
    ({"stages": [2, 2]}, ["export.stages", "distinct"]),
    ({"stages": [5]}, ["export.stages", "1..4"]),
    ({"formats": ["tflite"]}, ["export.formats[0]", "onnx", "torchscript"]),
    ({"formats": []}, ["export.formats"]),
    ({"opset": 9}, ["export.opset", "11..20"]),
    ({"tolerance": 0}, ["export.tolerance"]),
    ({"max_near_ties": 2}, ["export.max_near_ties"]),
    ({"latency_batches": [0]}, ["export.latency_batches"]),
    ({"threads": 0}, ["export.threads"]),
    ({"verify_samples": 0}, ["export.verify_samples"]),
])
def test_bad_export_params_name_the_key(export, words):
    with pytest.raises(ParamsError) as err:
        params_from_dict({"export": export})
    for w in words:
        assert w in str(err.value)


def test_export_stages_must_be_outputs_of_the_trained_model():
    assert params_from_dict({}).export_stages() == (3, 4)
    with pytest.raises(ParamsError, match=r"stage 4 is not an output .*n_stage 3.*\[1, 2, 3\].*export.stages=\[3\]"):
        params_from_dict(TINY).export_stages()                         # default [3, 4] on a 3-stage model
    single = params_from_dict({"model": {"multi": False}, "loss": {"use_kld": False}, "export": {"stages": [3]}})
    with pytest.raises(ParamsError, match=r"stage 3 .*multi false: outputs \[4\]"):
        single.export_stages()


def test_stage_test_ap_reads_eval_metrics(tmp_path):
    f = tmp_path / "eval.json"
    f.write_text(json.dumps({"stage2": {"AP": 0.25}, "stage3": {"AP": None}}))
    assert stage_test_ap(f, 2) == 0.25 and stage_test_ap(f, 3) is None and stage_test_ap(tmp_path / "no.json", 2) is None


# --------------------------------------------------------------------------- the stage and the command

# random weights: stage 1's heatmaps have near-tied refinement neighbours (5 of 36 points measured)
STAGE_PARAMS = {**TINY, "export": {"stages": [2, 3], "verify_samples": 4, "latency_batches": [1, 2],
                                   "latency_repeats": 1, "max_near_ties": 0.5}}


@pytest.fixture()
def root(tmp_path, tiny_prepared, monkeypatch) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(STAGE_PARAMS))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepared").symlink_to(tiny_prepared)
    save_checkpoint(tmp_path / "models" / "model.pt", trained_like())
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps({"stage2": {"AP": 0.3}, "stage3": {"AP": 0.4}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-tiny")
    return tmp_path


def test_stage_writes_verified_exports_and_metrics(root, capsys, monkeypatch):
    monkeypatch.setattr("okdpose.tracking.Tracker", FakeTracker)
    FakeTracker.runs = []
    (root / "metrics" / "train.json").write_text(json.dumps({"mlflow_run_id": "abc123"}))
    runpy.run_path(str(ROOT / "stages" / "export.py"), run_name="__main__")
    files = sorted(p.name for p in (root / "models" / "export").iterdir())
    assert files == ["stage2.onnx", "stage2.pt", "stage3.onnx", "stage3.pt"]
    meta = read_meta(root / "models" / "export" / "stage3.onnx")
    assert meta.stage == 3 and meta.test_ap == 0.4 and meta.source["dvc_experiment"] == "exp-tiny"
    assert meta.image_size == TINY_IMAGE_SIZE and meta.heatmap_size == (12, 16) and meta.n_stage_trained == 3
    m = json.loads((root / "reports" / "export.json").read_text())
    assert set(m) >= {"threads", "opset", "teacher", "stage2", "stage3"} and m["teacher"]["stage"] == 3
    assert m["stage2"]["verify"]["onnx"]["mismatches"] == 0 and m["stage3"]["flop_ratio"] == 1.0
    assert "stage2" in capsys.readouterr().out
    (run,) = FakeTracker.runs                                        # the numbers went into the training run
    assert run.id == "abc123" and run.artifacts == [("reports/export.json", "export")]
    assert run.metrics["export.stage2.gflops"] == m["stage2"]["gflops"]
    assert run.metrics["export.stage3.latency_ms.onnxruntime.b2"] == m["stage3"]["latency_ms"]["onnxruntime"]["b2"]


def test_stage_errors_name_the_fix_and_leave_no_outputs(root):
    (root / "params.yaml").write_text(yaml.safe_dump({**TINY, "export": {"stages": [4]}}))
    with pytest.raises(SystemExit) as err:
        runpy.run_path(str(ROOT / "stages" / "export.py"), run_name="__main__")
    assert "export.stages" in str(err.value) and "stage 4" in str(err.value)
    assert not (root / "models" / "export").exists() and not (root / "reports" / "export.json").exists()


def test_command_exports_one_stage_and_reports_user_errors(root, capsys):
    assert main(["--stage", "1", "--formats", "onnx", "--out", "cli"], prog="okdpose export") == 0
    assert [p.name for p in (root / "cli").iterdir()] == ["stage1.onnx"]
    assert read_meta(root / "cli" / "stage1.onnx").stage == 1
    assert "verified on" in capsys.readouterr().out
    assert main(["--stage", "4", "--out", "cli"], prog="okdpose export") == 2
    assert "stage 4 is not an output" in capsys.readouterr().err
    assert main(["--model", "missing.pt", "--stage", "1"], prog="okdpose export") == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["--stage", "1", "--formats", "onnx", "--precision", "bf16", "--out", "bf"], prog="okdpose export") == 2
    assert "export.formats: [torchscript]" in capsys.readouterr().err and not (root / "bf").exists()


def test_command_exports_fp16_and_says_what_it_costs(root, capsys):
    assert main(["--stage", "2", "--formats", "onnx", "--precision", "fp16", "--out", "cli16"]) == 0
    assert read_meta(root / "cli16" / "stage2.onnx").precision == "fp16"
    out = capsys.readouterr().out
    assert "onnx, fp16, verified on" in out and "vs fp32:" in out and "keypoints moved" in out


def test_stage_records_the_precision_and_what_it_moves(root, monkeypatch):
    monkeypatch.setattr("okdpose.tracking.Tracker", FakeTracker)
    FakeTracker.runs = []
    (root / "params.yaml").write_text(yaml.safe_dump({**STAGE_PARAMS, "export": {
        **STAGE_PARAMS["export"], "stages": [2], "latency_batches": [1], "precision": "fp16"}}))
    runpy.run_path(str(ROOT / "stages" / "export.py"), run_name="__main__")
    m = json.loads((root / "reports" / "export.json").read_text())
    assert m["precision_asked"] == "fp16" and m["precision"] == {"onnx": "fp16", "torchscript": "fp16"}
    assert "avx2" in m["cpu_flags"].split() or not m["cpu_flags"]   # this CPU's reported flags
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".pt")):
        v = m["stage2"]["verify"][fmt]
        assert v["precision"] == "fp16" and set(v["vs_fp32"]) >= {"max_rel_diff", "shift_px_mean", "shift_px_max"}
        assert read_meta(root / "models" / "export" / f"stage2{suffix}").precision == "fp16"
    assert m["stage2"]["precision"]["onnxruntime"] == "fp16" and "onnxruntime_fp32" in m["stage2"]["latency_ms"]


@pytest.mark.parametrize("out", ["afile", "afile/sub", "locked/cli"])
def test_command_refuses_an_out_it_cannot_write_before_any_work(root, capsys, monkeypatch, out):
    (root / "afile").write_text("keep")
    (root / "locked").mkdir()
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp",                            # as root, chmod does not stop writes
                        lambda *a, **kw: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if Path(str(kw.get("dir"))).name == "locked" else real(*a, **kw))
    assert main(["--stage", "1", "--formats", "onnx", "--out", out]) == 2
    cap = capsys.readouterr()
    assert f"--out {out}:" in cap.err and "folder" in cap.err and "Traceback" not in cap.err
    assert "model.pt" not in cap.out                                   # refused before loading the model
    assert (root / "afile").read_text() == "keep" and list((root / "locked").iterdir()) == []


def test_command_writes_every_file_or_none(root, capsys, monkeypatch):
    (root / "cli").mkdir()
    (root / "cli" / "stage2.onnx").write_bytes(b"an earlier good file")
    real = compare

    def stage3_fails(ref, got, crops, *, what="export", **kw):           # stage 2 passes, stage 3's file fails
        if "stage3.onnx" in what:
            raise ExportError(f"{what}: max |diff| above the tolerance")
        return real(ref, got, crops, what=what, **kw)
    monkeypatch.setattr("okdpose.export.compare", stage3_fails)
    assert main(["--stage", "2", "3", "--formats", "onnx", "--out", "cli"]) == 2
    err = capsys.readouterr().err
    assert "cli/stage3.onnx (onnxruntime" in err and ".tmp" not in err
    assert [p.name for p in (root / "cli").iterdir()] == ["stage2.onnx"]
    assert (root / "cli" / "stage2.onnx").read_bytes() == b"an earlier good file"
    assert main(["--stage", "3", "--formats", "onnx", "--out", "new/cli"]) == 2
    assert not (root / "new").exists() and not list(root.glob(".okdpose-export.*"))


def test_command_blames_a_checkpoint_with_a_nan_weight(root, capsys):
    m = trained_like()
    with torch.no_grad():
        m.conv1.weight[0, 0, 0, 0] = float("nan")
    save_checkpoint(root / "nan.pt", m)
    assert main(["--model", "nan.pt", "--stage", "1", "--formats", "onnx", "--out", "nan"]) == 2
    err = capsys.readouterr().err
    # refused when loaded (okdpose.model.checkpoint), before any export work; the key is named
    assert "nan.pt: tensor 'conv1.weight' holds 1 non-finite values" in err
    assert "does not compute" not in err and not (root / "nan").exists()


def test_command_names_params_when_it_is_a_folder(root, capsys):
    (root / "pdir").mkdir()
    assert main(["--params", "pdir", "--stage", "1", "--formats", "onnx", "--out", "cli"]) == 2
    err = capsys.readouterr().err
    assert "--params pdir: is a folder" in err and "Traceback" not in err and not (root / "cli").exists()


def test_staged_out_undoes_its_moves_when_one_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space left"))
                        if Path(dst).name == "b" else real(src, dst))
    for target in (out, tmp_path / "new" / "out"):
        with pytest.raises(ExportError, match=r"--out .*out: could not move .*left as it was"):
            with staged_out(target) as tmp:
                (tmp / "a").write_text("new")
                (tmp / "b").write_text("new")
    assert (out / "a").read_text() == "old" and [p.name for p in tmp_path.rglob("*")] == ["out", "a"]
