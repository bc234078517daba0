"""okdpose.bench at tiny sizes: structure and sanity of every section, targets and the report
(no wall-clock assertions: timings on a shared CPU are noise at these sizes)."""
import dataclasses
import json
import math

import pytest
import torch

from okdpose import bench
from okdpose.params import Params


def tiny_params() -> Params:
    p = Params()
    return dataclasses.replace(
        p, data=dataclasses.replace(p.data, image_size=(48, 64), heatmap_size=(12, 16)),
        model=dataclasses.replace(p.model, width=4, n_stage=2),
        loss=dataclasses.replace(p.loss, kld_couples=((1, 2),)),
        train=dataclasses.replace(p.train, batch_size=2))


def test_peak_and_interleaved_timing():
    assert bench.peak_gflops(cores=2, ghz=2.445) == pytest.approx(156.48)
    assert math.isnan(bench.peak_gflops(cores=2, ghz=0.0))
    order = []
    t = bench.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=2, warmup=1)
    assert order == ["a", "b"] * 3                      # round robin, warm-up included
    assert set(t) == {"a", "b"} and all(len(x.wall) == len(x.cpu) == 2 for x in t.values())
    assert all(x.median >= 0 for x in t.values())


def test_train_bench_compares_okd_and_single_in_both_formats():
    r = bench.train_bench(width=4, n_stage=2, image_size=(32, 32), batch=1, repeats=1, warmup=0, peak=100.0)
    assert set(r["variants"]) == {"okd/contiguous", "okd/channels_last", "single/contiguous", "single/channels_last"}
    assert r["config"]["couples"] == [[1, 2]]
    # the multi-output model has one more head: slightly more FLOPs than the single-output one
    f = r["forward_gflop_per_image"]
    assert f["okd"] >= f["single"] > 0
    assert set(r["conv_share"]) == {"contiguous", "channels_last"}
    assert all(0 < c["conv_share"] < 1 and c["conv_pct_peak"] > 0 for c in r["conv_share"].values())
    for v in r["variants"].values():
        assert v["s_per_step"] > 0 and v["img_per_s"] > 0 and v["gflop_per_s"] > 0
        assert v["pct_peak"] == pytest.approx(v["gflop_per_s"], abs=0.1)       # peak 100 GFLOP/s
    assert set(r["ratios"]) == {"okd_vs_single/contiguous", "okd_vs_single/channels_last",
                                "channels_last_speedup/okd", "channels_last_speedup/single"}
    assert all(x > 0 for x in r["ratios"].values())


def test_train_step_learns():
    torch.manual_seed(0)
    from okdpose.losses import OKDLoss
    from okdpose.model import MultiOutHRNet
    from okdpose.params import LossParams

    loss = OKDLoss(LossParams(kld_couples=((1, 2),)), (1, 2))
    step = bench.make_train_step(MultiOutHRNet(12, 4, 2), loss, 2, (32, 32), "channels_last")
    losses = [step() for _ in range(5)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_inference_bench_rows_per_stage_and_format():
    r = bench.inference_bench(width=4, stages=(1, 2), image_size=(32, 32), batch=1, repeats=1, warmup=0, peak=100.0)
    assert set(r["variants"]) == {f"stage{k}/{f}" for k in (1, 2) for f in bench.INFER_FORMATS}
    assert bench.INFER_FORMATS == ("contiguous", "channels_last", "folded")
    s1, s2 = r["variants"]["stage1/contiguous"], r["variants"]["stage2/contiguous"]
    assert 0 < s1["params_M"] < s2["params_M"] and 0 < s1["gflop_per_image"] < s2["gflop_per_image"]
    assert r["variants"]["stage2/folded"]["gflop_per_image"] == s2["gflop_per_image"]
    assert set(r["ratios"]) == {f"{f}_speedup/stage{k}" for f in ("channels_last", "folded") for k in (1, 2)}
    c = r["conv_share"]
    assert c["variant"] == "stage2/folded" and 0 < c["conv_s"] < c["call_s"] and 0 < c["conv_share"] < 1


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


def test_eigencam_bench_maps_equal_stock():
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


def test_loader_bench_on_a_synthetic_set_and_the_report(tmp_path):
    p = tiny_params()
    prepared = bench.synthetic_prepared(tmp_path, p)
    params, found = bench.find_prepared(tmp_path / "absent.yaml", prepared)
    assert found == prepared and params == Params()
    r = bench.loader_bench(prepared, p, samples=6, repeats=1, train_repeats=1)
    assert r["config"]["batch"] == 2 and r["config"]["crop_cache"] and not r["config"]["augment"]
    assert r["loader_img_per_s_per_worker"] > 0 and r["train_img_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["loader_img_per_s_per_worker"] / r["train_img_per_s"], rel=0.05)
    aug = dataclasses.replace(p, data=dataclasses.replace(p.data, augment=dataclasses.replace(
        p.data.augment, flip=True, rotation=30.0)))
    assert r["augmented"]["loader_img_per_s_per_worker"] > 0 and r["augmented"]["augment"]["flip"]
    ra = bench.loader_bench(prepared, aug, samples=4, repeats=1, train_repeats=1)
    assert ra["config"]["augment"] and not ra["config"]["crop_cache"] and "augmented" not in ra

    result = {"machine": {"cores": 2, "ghz": 2.4, "flops_per_cycle": 32, "peak_gflops": 153.6, "threads": 1,
                          "loadavg_1min": 0.0, "torch": torch.__version__}, "load_after": 0.0,
              "loader": {**r, "config": {**r["config"], "source": "synthetic"}},
              "train": bench.train_bench(width=4, n_stage=2, image_size=(32, 32), batch=1, repeats=1, warmup=0)}
    result["targets"] = bench.check_targets(result)
    assert set(result["targets"]) == {"train OKD step time / single-output", "train OKD % of fp32 peak",
                                      "loader per worker / training consumption"}
    assert all(isinstance(t["met"], bool) for t in result["targets"].values())
    text = bench.format_report(result, quick=True)
    assert "a. training step" in text and "b. data loading" in text and "targets:" in text
    json.dumps(result)                                  # --json writes it as is
