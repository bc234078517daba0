"""okdpose.bench at tiny sizes: structure and sanity of every section, the measured limits, the
targets and the report (no wall-clock assertions: timings on a shared CPU are noise at these sizes)."""
import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import onnxruntime
import pytest
import torch

from okdpose import bench
from okdpose import device as okd_device
from okdpose.params import Params

# a fake measured limit: fp32 100 GFLOP/s, bf16 10 GFLOP/s (per CPU-second: 50 and 5)
PEAK = {"fp32": {"gflop_per_s": 100.0, "gflop_per_cpu_s": 50.0}, "bf16": {"gflop_per_s": 10.0, "gflop_per_cpu_s": 5.0}}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: OpenMP threads on a CPU shared with other work spin (seconds per tiny step)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_params() -> Params:
    p = Params()
    return dataclasses.replace(
        p, data=dataclasses.replace(p.data, image_size=(48, 64), heatmap_size=(12, 16)),
        model=dataclasses.replace(p.model, width=4, n_stage=2),
        loss=dataclasses.replace(p.loss, kld_couples=((1, 2),)),
        train=dataclasses.replace(p.train, batch_size=2))


def test_nominal_peak_and_interleaved_timing(monkeypatch):
    assert bench.nominal_gflops(cores=2, ghz=2.445) == pytest.approx(156.48)
    assert math.isnan(bench.nominal_gflops(cores=2, ghz=0.0))
    order = []
    t = bench.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=2, warmup=1)
    assert order == ["a", "b"] * 3                      # round robin, warm-up included
    assert set(t) == {"a", "b"} and all(len(x.wall) == len(x.cpu) == 2 for x in t.values())
    assert all(x.median >= 0 for x in t.values())
    order.clear()                                       # a slow variant with its own (warmup, repeats)
    t = bench.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=2, warmup=1,
                          plan={"b": (0, 1)})
    assert order == ["a", "b", "a", "a"] and len(t["a"].wall) == 2 and len(t["b"].wall) == 1
    order.clear()                                       # settle_s: an untimed pause before every call
    monkeypatch.setattr(bench.time, "sleep", lambda s: order.append(f"sleep {s}"))
    t = bench.interleaved({"a": lambda: order.append("a")}, repeats=1, warmup=1, settle_s=0.3)
    assert order == ["sleep 0.3", "a"] * 2 and t["a"].wall[0] < 0.3


def test_matmul_rates_are_measured_and_labelled(monkeypatch):
    r = bench.matmul_rates(n=64, repeats=1, warmup=0)
    assert set(r) == {"fp32", "bf16"}
    for v in r.values():
        assert v["n"] == 64 and v["gflop_per_s"] > 0 and v["gflop_per_cpu_s"] > 0 and v["source"] == "measured"
        assert v["gflop_per_s"] == pytest.approx(2 * 64 ** 3 / v["s_per_call"] / 1e9, rel=0.05)
    assert r["bf16"]["label"] == bench.bf16_label()
    monkeypatch.setattr(okd_device, "native_bf16", lambda device, flags=None: True)
    assert bench.matmul_rates(n=64, repeats=1, warmup=0)["bf16"]["label"] == "native"
    assert bench._matmul_size(torch.float32, min_s=0.0, max_n=512) == 256       # already long enough
    assert bench._matmul_size(torch.float32, min_s=10.0, max_n=320) == 320      # capped
    again = bench.matmul_rates(repeats=1, warmup=0, ns={"fp32": 64, "bf16": 128})   # re-measured at given sizes
    assert again["fp32"]["n"] == 64 and again["bf16"]["n"] == 128


def test_limit_drift_is_reported_and_warned_beyond_15_percent():
    m = {"matmul": {"fp32": {"gflop_per_s": 100.0, "source": "measured", "n": 64, "gflop_per_cpu_s": 50.0,
                             "s_per_call": 1.0, "cpu_util": 2.0},
                    "bf16": {"gflop_per_s": 200.0, "source": "measured", "n": 64, "gflop_per_cpu_s": 100.0,
                             "s_per_call": 1.0, "cpu_util": 2.0, "label": "native"}},
         "native_bf16": True, "cores": 2, "flops_per_cycle": 32, "ghz": 2.5, "nominal_gflops": 160.0}
    assert bench.limit_drift(m) == {} and "again at the end" not in "\n".join(bench._limits(m))
    m["matmul_end"] = {"fp32": {"gflop_per_s": 110.0}, "bf16": {"gflop_per_s": 190.0}}
    assert bench.limit_drift(m) == pytest.approx({"fp32": 10.0, "bf16": -5.0})
    text = "\n".join(bench._limits(m))
    assert "again at the end of the run: fp32 110.0 GFLOP/s (+10 %), bf16 190.0 GFLOP/s (-5 %)" in text
    assert "WARNING" not in text
    m["matmul_end"]["fp32"]["gflop_per_s"] = 200.0
    assert "WARNING: the machine's speed changed during the run (matmul +100 %)" in "\n".join(bench._limits(m))
    m["matmul"]["fp32"]["source"] = "given"                 # --peak-gflops: nothing to compare for fp32
    assert set(bench.limit_drift(m)) == {"bf16"}


def test_train_bench_variants_percentages_of_their_precision_and_bf16_finite():
    r = bench.train_bench(width=4, n_stage=2, image_size=(32, 32), batch=1, repeats=1, warmup=0, peak=PEAK,
                          native=False, bf16_warmup=0)
    assert set(r["variants"]) == {f"okd/{p}/{f}" for p in ("fp32", "bf16") for f in bench.FORMATS} | {
        "single/fp32/contiguous", "single/fp32/channels_last"}
    assert r["config"]["couples"] == [[1, 2]] and r["config"]["bf16"] == "emulated"
    f = r["forward_gflop_per_image"]
    assert f["okd"] >= f["single"] > 0      # the multi-output model has more heads
    assert set(r["conv_share"]) == {"contiguous", "channels_last"}
    assert all(0 < c["conv_share"] < 1 and c["conv_pct_peak"] > 0 for c in r["conv_share"].values())
    for name, v in r["variants"].items():
        assert v["s_per_step"] > 0 and v["img_per_s"] > 0 and v["gflop_per_s"] > 0 and math.isfinite(v["pct_peak"])
        scale = 1.0 if v["precision"] == "fp32" else 10.0        # % of the matmul rate of its own precision
        assert v["pct_peak"] == pytest.approx(scale * v["gflop_per_s"], abs=0.2 * scale)
        assert (v.get("bf16") == "emulated") == (v["precision"] == "bf16")
    assert set(r["ratios"]) == {"okd_vs_single/contiguous", "okd_vs_single/channels_last",
                                "channels_last_speedup/okd/fp32", "channels_last_speedup/okd/bf16",
                                "channels_last_speedup/single/fp32",
                                "bf16_speedup/okd/contiguous", "bf16_speedup/okd/channels_last"}
    assert all(x > 0 for x in r["ratios"].values())
    assert r["best"].startswith("okd/")
    assert "n_stage 4" in r["vs_original"]["note"]          # the original is compared with 4 stages only


def test_train_bench_against_the_original_and_without_it(tmp_path):
    r = bench.train_bench(width=4, n_stage=4, image_size=(64, 64), batch=1, repeats=1, warmup=0, peak=100.0,
                          bf16=False, formats=("contiguous",))
    assert set(r["variants"]) == {"okd/fp32/contiguous", "single/fp32/contiguous", "original/fp32/contiguous"}
    assert r["vs_original"]["speedup"] > 0 and r["config"]["bf16"] == "off"      # bf16=False: --no-bf16
    assert r["vs_original"]["best"] == "okd/fp32/contiguous"
    missing = bench.train_bench(width=4, n_stage=2, image_size=(32, 32), batch=1, repeats=1, warmup=0, peak=100.0,
                                bf16=False, formats=("contiguous",), original=tmp_path / "absent.py")
    assert "original/fp32/contiguous" not in missing["variants"]
    assert missing["vs_original"]["note"] == bench.ORIGINAL_MISSING
    assert bench.load_original(tmp_path / "absent.py") is None
    (tmp_path / "broken.py").write_text("raise RuntimeError('no')\n")
    assert bench.load_original(tmp_path / "broken.py") is None
    t = bench.check_targets({"machine": {"native_bf16": False}, "train": missing})
    (row,) = t.values()
    assert row["met"] is None and row["value"] is None and row["detail"] == bench.ORIGINAL_MISSING


def test_train_step_learns_in_both_precisions():
    from okdpose.losses import OKDLoss
    from okdpose.model import MultiOutHRNet
    from okdpose.params import LossParams

    loss = OKDLoss(LossParams(kld_couples=((1, 2),)), (1, 2))
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        step = bench.make_train_step(MultiOutHRNet(12, 4, 2), loss, 2, (32, 32), "channels_last", precision=precision)
        losses = [step() for _ in range(5)]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_inference_bench_rows_per_stage_format_precision_and_the_original():
    r = bench.inference_bench(width=4, stages=(1, 2), image_size=(32, 32), batch=1, repeats=1, warmup=0, peak=PEAK,
                              native=False, bf16_warmup=0)
    ours = {f"stage{k}/fp32/{f}" for k in (1, 2) for f in bench.INFER_FORMATS + ("onnxruntime",)}
    emulated = {f"stage2/bf16/{f}" for f in bench.INFER_FORMATS}           # teacher only where emulated
    assert set(r["variants"]) == ours | emulated | {"stage1/original", "stage2/original"}
    for k in (1, 2):                         # the exported stage computes what the folded model does
        o = r["variants"][f"stage{k}/fp32/onnxruntime"]
        assert o["threads"] == torch.get_num_threads() and 0 <= o["max_abs_diff_vs_folded"] < 1e-4
    assert r["config"]["onnxruntime"] == onnxruntime.__version__
    assert bench.INFER_FORMATS == ("contiguous", "channels_last", "folded")
    s1, s2 = r["variants"]["stage1/fp32/contiguous"], r["variants"]["stage2/fp32/contiguous"]
    assert 0 < s1["params_M"] < s2["params_M"] and 0 < s1["gflop_per_image"] < s2["gflop_per_image"]
    assert r["variants"]["stage2/fp32/folded"]["gflop_per_image"] == s2["gflop_per_image"]
    assert all(math.isfinite(v["img_per_s"]) and v["img_per_s"] > 0 for v in r["variants"].values())
    assert r["variants"]["stage2/bf16/folded"]["pct_peak"] == pytest.approx(
        10 * r["variants"]["stage2/bf16/folded"]["gflop_per_s"], abs=2)
    assert set(r["ratios"]) == ({f"{f}_speedup/stage{k}/fp32" for f in ("channels_last", "folded", "onnxruntime")
                                 for k in (1, 2)}
                                | {f"{f}_speedup/stage2/bf16" for f in ("channels_last", "folded")}
                                | {f"bf16_speedup/stage2/{f}" for f in bench.INFER_FORMATS})
    assert r["config"]["bf16_stages"] == [2]
    assert all(v["speedup"] > 0 and not v["best"].endswith("original") for v in r["vs_original"].values())
    st = r["students"]["stage1"]
    assert st["flop_ratio"] > 1 and st["speedup_over_flop_ratio"] == pytest.approx(st["speedup"] / st["flop_ratio"],
                                                                                   rel=0.01)
    c = r["conv_share"]
    assert c["variant"] == "stage2/fp32/folded" and 0 < c["conv_s"] < c["call_s"] and 0 < c["conv_share"] < 1
    native = bench.inference_bench(width=4, stages=(1, 2), image_size=(32, 32), batch=1, repeats=1, warmup=0,
                                   peak=PEAK, native=True, formats=("contiguous",), original=False, onnx=False)
    assert set(native["variants"]) == {f"stage{k}/{p}/contiguous" for k in (1, 2) for p in ("fp32", "bf16")}
    assert native["vs_original"]["stage1"] == {"note": "original not run"}
    assert native["config"]["onnxruntime"] == "onnxruntime not run"
    missing = bench.inference_bench(width=4, stages=(1,), image_size=(32, 32), batch=1, repeats=1, warmup=0,
                                    peak=PEAK, bf16=False, formats=("contiguous",), original=Path("absent.py"),
                                    onnx=False)
    assert set(missing["variants"]) == {"stage1/fp32/contiguous"} and not missing["students"]
    assert missing["vs_original"]["stage1"] == {"note": bench.ORIGINAL_MISSING}


def test_inference_bench_without_onnxruntime_names_why_and_the_report_says_so(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else object())
    r = bench.inference_bench(width=4, stages=(1,), image_size=(32, 32), batch=1, repeats=1, warmup=0, peak=PEAK,
                              bf16=False, formats=("contiguous",), original=False)
    assert set(r["variants"]) == {"stage1/fp32/contiguous"}
    assert r["config"]["onnxruntime"] == "onnxruntime not installed (pip install -r requirements.txt)"
    machine = bench.machine_info(1, bench.matmul_rates(n=64, repeats=1, warmup=0))
    text = bench.format_report({"machine": machine, "inference": r, "targets": {}}, quick=True)
    assert "onnxruntime variants skipped: onnxruntime not installed" in text
    monkeypatch.undo()
    found = bench.inference_bench(width=4, stages=(1,), image_size=(32, 32), batch=1, repeats=1, warmup=0, peak=PEAK,
                                  bf16=False, formats=("contiguous",), original=False)
    text = bench.format_report({"machine": machine, "inference": found, "targets": {}}, quick=True)
    assert "stage1/fp32/onnxruntime" in text and "what `okdpose predict` runs on a .onnx" in text
    full = bench.format_report({"machine": machine, "inference": found, "targets": {}}, quick=False)
    assert full.startswith("okdpose bench (full sizes, only inference); ")       # not "(full)" for --only


def test_conv_share_profiles_the_convolutions_of_a_call():
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 32, 32)
    flop = 2 * 8 * 8 * 9 * 32 * 32 * 2

    def call():
        with torch.no_grad():
            y = conv(x)
            for _ in range(20):            # non-convolution work the share must leave out
                y = torch.relu(y * 1.0001)

    r = bench.conv_share(call, flop, peak=100.0)
    assert 0 < r["conv_s"] < r["call_s"] and 0 < r["conv_share"] < 1
    assert r["conv_pct_peak"] == pytest.approx(r["conv_gflop_per_s"], abs=0.1)
    assert r["conv_gflop_per_s"] == pytest.approx(flop / r["conv_s"] / 1e9, rel=0.01)


def test_eigencam_bench_maps_equal_stock_and_the_explain_stage_cost():
    r = bench.eigencam_bench(map_size=(12, 16), channels=8, width=4, n_stage=2, image_size=(48, 64), repeats=1)
    assert r["config"]["layer"] == "feature_taps.1"
    for part in ("projection", "end_to_end"):
        assert r[part]["stock_ms"] > 0 and r[part]["ours_ms"] > 0 and r[part]["speedup"] > 0
        assert r[part]["max_abs_diff"] <= 1e-5
    # economy vs full SVD are two LAPACK code paths: equal up to float32 rounding of the [0, 1] maps
    # (bit for bit on the CPUs measured so far, which a test must not rely on)
    assert r["end_to_end"]["max_abs_diff"] <= 1e-6
    f = r["end_to_end_folded"]
    assert f["ms"] > 0 and f["copy_ms_once"] > 0 and f["speedup"] > 0 and f["max_abs_diff"] <= 1e-4
    x = bench.explain_bench(tiny_params(), images=1, repeats=1, warmup=0)
    assert x["config"]["layers"] == ["feature_taps.0", "intermediate_layers.0", "feature_taps.1",
                                     "intermediate_layers.1"]          # every stage's feature and head
    assert x["stock_ms_per_image"] > 0 and x["ours_ms_per_image"] > 0 and x["speedup"] > 0
    assert "speedup_bf16" not in x
    xb = bench.explain_bench(tiny_params(), images=1, repeats=1, warmup=0, bf16=True)   # emulated here: tiny
    assert xb["ours_bf16_ms_per_image"] > 0 and xb["speedup_bf16"] > 0


def fake_result(native: bool, train: float, infer: float, student: float, explain: float, loader: float) -> dict:
    """A result dict with only what check_targets reads."""
    return {"machine": {"native_bf16": native},
            "train": {"best": "okd/bf16/channels_last", "vs_original": {"speedup": train}},
            "inference": {"config": {"batch": 8},
                          "vs_original": {"stage4": {"best": "stage4/fp32/folded", "speedup": infer}},
                          "students": {"stage2": {"speedup": 2.0 * student, "flop_ratio": 2.0,
                                                  "speedup_over_flop_ratio": student}}},
            "eigencam": {"explain": {"config": {"layers": ["l"] * 8}, "speedup": explain},
                         "projection": {"max_abs_diff": 0.0}, "end_to_end": {"max_abs_diff": 0.0}},
            "loader": {"ratio": 5.0, "ratio_augmented": loader, "train_fastest": "fp32/channels_last"}}


@pytest.mark.parametrize("native", [True, False])
def test_targets_goals_depend_on_native_bf16(native, monkeypatch):
    # 1.5x training, 1.5x inference: met on an AVX2 CPU (>= 1.25, >= 1.3), not with bf16 units (>= 1.7, >= 2)
    t = bench.check_targets(fake_result(native, train=1.5, infer=1.5, student=0.9, explain=12.0, loader=3.5))
    by = {k.split(",")[0]: v for k, v in t.items()}
    assert by["train step speed-up vs original fp32"]["met"] is (not native)
    assert by["train step speed-up vs original fp32"]["goal"] == (">= 1.7" if native else ">= 1.25")
    assert by["inference stage4 vs original eager"]["met"] is (not native)
    assert by["inference stage4 vs original eager"]["goal"] == (">= 2" if native else ">= 1.3")
    assert by["stage2 speed-up over teacher / FLOP ratio"]["met"] is True
    assert by["explain per image vs stock grad-cam"]["met"] is True and by["loader per worker / fastest training step"]["met"] is True
    assert by["train step speed-up vs original fp32"]["detail"] == "ours: okd/bf16/channels_last"
    assert all(isinstance(v["met"], bool) for v in t.values())
    bad = bench.check_targets(fake_result(native, 2.5, 2.5, student=0.8, explain=9.0, loader=2.9))
    assert [v["met"] for v in bad.values()] == [True, True, False, False, True, False]
    # without a machine record: this CPU's native_bf16 decides (monkeypatched)
    monkeypatch.setattr(okd_device, "native_bf16", lambda device, flags=None: native)
    r = fake_result(native, 1.5, 1.5, 0.9, 12.0, 3.5)
    del r["machine"]
    assert bench.check_targets(r) == t


def test_bf16_units_slower_than_fp32_are_named_with_the_other_goals():
    slow = {"fp32_ms": 8.7, "bf16_ms": 14.0, "speedup": 0.62, "min_speedup": 1.3, "threads": 2}
    r = fake_result(True, train=1.36, infer=1.4, student=0.97, explain=17.8, loader=6.3)
    r["machine"].update(cpu_model="Xeon", cpu_flags=["avx512f", "avx512_bf16"], bf16_probe=slow)
    r["targets"] = bench.check_targets(r)
    assert r["targets"]["train step speed-up vs original fp32"]["met"] is False       # bf16 goals kept: 1.7
    note = bench.slow_bf16_note(r)
    assert "0.62x fp32 (below 1.3)" in note and "`auto` runs fp32 here" in note
    assert "train step speed-up vs original fp32 1.36 >= 1.25 yes" in note
    assert "inference stage4 vs original eager, batch 8 1.4 >= 1.3 yes" in note
    assert "explain" not in note                          # the same goal on every CPU: not repeated
    assert bench.machine_line(r["machine"]).endswith("bf16 native, bf16 conv 0.62x fp32 -> auto fp32")
    r["machine"]["bf16_probe"] = {**slow, "speedup": 2.2}
    assert bench.slow_bf16_note(r) is None and bench.machine_line(r["machine"]).endswith("2.2x fp32 -> auto bf16")
    r["machine"].update(native_bf16=False, bf16_probe=None)
    assert bench.slow_bf16_note(r) is None and bench.machine_line(r["machine"]).endswith("bf16 emulated")
    r["machine"].update(isa_cap="AVX2", aten_capability="AVX2", cpu_flags=["avx2"], cpu_flags_all=["avx2", "avx512f"])
    assert "ISA CAPPED: oneDNN at AVX2, ATen AVX2, MKL unset (the CPU's own flags: avx2 avx512f)" in bench.machine_line(
        r["machine"])


def test_loader_bench_on_a_synthetic_set_and_the_report(tmp_path, monkeypatch):
    p = tiny_params()
    prepared = bench.synthetic_prepared(tmp_path, p)
    params, found = bench.find_prepared(tmp_path / "absent.yaml", prepared)
    assert found == prepared and params == Params()
    r = bench.loader_bench(prepared, p, samples=6, repeats=1, train_repeats=1, native=False)
    assert r["config"]["batch"] == 2 and r["config"]["crop_cache"] and not r["config"]["augment"]
    assert set(r["train_variants_img_per_s"]) == {"fp32/contiguous", "fp32/channels_last"}
    assert r["train_img_per_s"] == max(r["train_variants_img_per_s"].values())       # the fastest step
    assert r["loader_img_per_s_per_worker"] > 0 and r["train_img_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["loader_img_per_s_per_worker"] / r["train_img_per_s"], rel=0.05)
    assert r["augmented"]["loader_img_per_s_per_worker"] > 0 and r["augmented"]["augment"]["flip"]
    assert r["ratio_augmented"] == r["augmented"]["ratio"]
    aug = dataclasses.replace(p, data=dataclasses.replace(p.data, augment=dataclasses.replace(
        p.data.augment, flip=True, rotation=30.0)))
    ra = bench.loader_bench(prepared, aug, samples=4, repeats=1, train_repeats=1, native=True)
    assert ra["config"]["augment"] and not ra["config"]["crop_cache"] and "augmented" not in ra
    assert ra["ratio_augmented"] == ra["ratio"] and len(ra["train_variants_img_per_s"]) == 4   # + bf16 (native)

    monkeypatch.setattr(okd_device, "cpu_model", lambda: "Fake CPU 9000")
    monkeypatch.setattr(okd_device, "reported_flags", lambda flags=None: ["avx2", "fma"])
    monkeypatch.setattr(okd_device, "native_bf16", lambda device, flags=None: False)
    machine = bench.machine_info(1, bench.matmul_rates(n=64, repeats=1, warmup=0))
    assert machine["cpu_model"] == "Fake CPU 9000" and machine["cpu_flags"] == ["avx2", "fma"]
    result = {"machine": machine, "load_after": 0.0,
              "loader": {**r, "config": {**r["config"], "source": "synthetic"}},
              "train": bench.train_bench(width=4, n_stage=2, image_size=(32, 32), batch=1, repeats=1, warmup=0,
                                         peak=machine["matmul"], bf16_warmup=0)}
    result["targets"] = bench.check_targets(result)
    assert list(result["targets"]) == [
        "train step speed-up vs original fp32", "loader per worker / fastest training step"]
    assert result["targets"][next(iter(result["targets"]))]["met"] is None      # n_stage 2: no original
    text = bench.format_report(result, quick=True)
    assert "Fake CPU 9000" in text and "flags avx2 fma" in text and "bf16 emulated" in text
    assert "fp32 torch.mm 64x64" in text and "nominal, not a limit" in text and "(emulated)" in text
    assert "a. training step" in text and "b. data loading" in text and "targets (CPU Fake CPU 9000" in text
    assert "okd/bf16/channels_last" in text
    json.dumps(result)                                  # --json writes it as is


def test_run_all_measures_the_limits_at_both_ends():
    sizes = dataclasses.replace(bench.QUICK, matmul_min_s=0.0, matmul_repeats=1)
    r = bench.run_all(sizes, threads=1, sections=())
    start, end = r["machine"]["matmul"], r["machine"]["matmul_end"]
    assert set(end) == {"fp32", "bf16"} and all(end[p]["n"] == start[p]["n"] and end[p]["gflop_per_s"] > 0 for p in end)
    assert set(bench.limit_drift(r["machine"])) == {"fp32", "bf16"}
    assert "again at the end of the run" in bench.format_report(r, quick=True)
    assert bench.format_report(r, quick=False).startswith("okdpose bench (full sizes, only the limits); ")


@pytest.mark.parametrize("argv, words", [
    (["--threads", "-3"], ["--threads must be from 1 to", "got -3"]),          # was torch's RuntimeError
    (["--threads", "0"], ["--threads must be from 1 to"]),
    (["--threads", "100000"], ["4 per core", "got 100000"]),                # oversubscribed: ran for ever
    (["--peak-gflops", "0"], ["--peak-gflops must be a positive number", "got 0.0"]),   # every % was inf
    (["--peak-gflops", "nan"], ["--peak-gflops", "got nan"]),
    (["--json", "."], ["--json . is a folder", "bench.json"]),              # was IsADirectoryError at the end
    (["--json", "afile/b.json"], ["afile is a file, not a folder"]),
])
def test_impossible_options_are_refused_before_any_measuring(argv, words, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep")
    monkeypatch.setattr(bench, "run_all", lambda *a, **kw: pytest.fail("measured before refusing"))
    with pytest.raises(SystemExit) as err:
        bench.main(["--quick", "--only", "loader", *argv])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "Traceback" not in msg and all(w in msg for w in words), msg
    assert (tmp_path / "afile").read_text() == "keep"
