"""Anytime inference: exits where the confidence says, costs exactly the truncated model, and the
sweep's ends reproduce the first stage and the teacher exactly."""
import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from okdpose.anytime import AnytimeHRNet, anytime_curve, confidence, exit_costs, exit_positions, select_exits
from okdpose.data.dataset import PoseDataset
from okdpose.evaluation import evaluate_report
from okdpose.inference import predict
from okdpose.joints import BABYPOSE12
from okdpose.model import MultiOutHRNet, forward_flops
from okdpose.model.fuse import inference_copy
from okdpose.params import DataParams

from conftest import TINY_IMAGE_SIZE

J = BABYPOSE12.num_joints


def random_model(n_stage=4, width=4, seed=0):
    torch.manual_seed(seed)
    model = MultiOutHRNet(J, width, n_stage).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


def inputs(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 3.0, n).view(n, 1, 1, 1)      # confidences that differ per sample
    x = torch.randn(n, 3, 64, 64, generator=g) * scale
    return x.contiguous(memory_format=torch.channels_last)


def test_exit_positions_rule():
    conf = np.array([[0.1, 0.6, -0.2], [0.5, 0.7, -0.1], [0.2, 0.1, -0.3]])     # (S=3, N=3)
    assert exit_positions(conf, 0.5).tolist() == [1, 0, 2]       # first confident output, else the last
    assert exit_positions(conf, 0.0).tolist() == [0, 0, 0]       # τ = 0 asks for nothing, whatever the sign
    assert exit_positions(conf, math.inf).tolist() == [2, 2, 2]
    assert confidence(np.array([[0.2, 0.4, 0.9]]), "mean_max") == pytest.approx([0.5])
    assert confidence(np.array([[0.2, 0.4, 0.9]]), "min_max") == pytest.approx([0.2])
    with pytest.raises(ValueError, match="unknown exit confidence 'nope'"):
        confidence(np.zeros((1, 2)), "nope")


def test_the_two_ends_are_the_first_stage_and_the_teacher_bit_for_bit():
    model = random_model()
    x = inputs()
    full = inference_copy(model)(x)
    anytime = AnytimeHRNet(model)
    hm, stage = anytime(x, math.inf)
    assert torch.equal(hm, full[-1]) and stage.tolist() == [4] * len(x)
    hm, stage = anytime(x, 0.0)
    assert torch.equal(hm, full[0]) and stage.tolist() == [1] * len(x)


def test_mixed_exits_follow_the_confidence_and_reuse_the_features():
    model = random_model()
    x = inputs()
    full = [o.detach() for o in inference_copy(model)(x)]
    conf = np.stack([confidence(o.flatten(2).amax(2).numpy()) for o in full])   # (4, N)
    # τ halfway between two neighbouring first-stage confidences: a mix of exits, far from any tie
    c = np.sort(conf[0])
    tau = float((c[len(c) // 2 - 1] + c[len(c) // 2]) / 2)
    margin = np.abs(conf[:-1] - tau).min()
    assert margin > 1e-4 * np.abs(conf).max()
    expected = exit_positions(conf, tau) + 1
    assert len(set(expected.tolist())) > 1, "the test needs samples exiting at different stages"
    hm, stage = AnytimeHRNet(model)(x, tau)
    assert stage.tolist() == expected.tolist()
    for i, k in enumerate(stage.tolist()):
        ref = full[k - 1][i]
        # subsets of the batch run the same convolutions on fewer rows: equal up to float rounding
        assert (hm[i] - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("n_stage", [2, 4])
def test_exiting_at_stage_k_costs_exactly_the_model_truncated_there(n_stage):
    model = random_model(n_stage)
    anytime = AnytimeHRNet(model)
    costs = exit_costs(J, 4, n_stage, (64, 64))
    x = inputs(1)
    for k in range(1, n_stage + 1):
        with FlopCounterMode(display=False) as counter:
            anytime(x, force_exit=k)
        truncated = forward_flops(MultiOutHRNet(J, 4, k, multi=True), (64, 64))
        assert counter.get_total_flops() == truncated == costs[k]["flops"]
    assert costs[n_stage]["flops"] == forward_flops(model, (64, 64))


def test_a_single_output_model_is_refused():
    with pytest.raises(ValueError, match="multi-output"):
        AnytimeHRNet(MultiOutHRNet(J, 4, 2, multi=False))


def test_curve_ends_equal_the_stage_metrics(tiny_prepared):
    data = DataParams(image_size=TINY_IMAGE_SIZE, heatmap_size=(12, 16))
    ds = PoseDataset(tiny_prepared, "test", BABYPOSE12, data.codec)
    model = random_model(n_stage=2)
    preds = predict(model, ds, batch_size=2)
    gt = tiny_prepared / "test_gt.json"

    def evaluate(pr):
        return evaluate_report(pr, gt, BABYPOSE12).metrics

    per_stage = evaluate(preds)
    for s, stage in enumerate(preds.stages):             # selecting one output everywhere = that output
        assert evaluate(select_exits(preds, np.full(len(preds), s)))[0] == per_stage[stage]
    costs = exit_costs(J, 4, 2, TINY_IMAGE_SIZE)
    curve = anytime_curve(preds, [0.3], costs, evaluate)
    assert [r["threshold"] for r in curve] == [0.0, 0.3, "inf"]
    first, last = curve[0], curve[-1]
    assert first["AP"] == per_stage[1]["AP"] and first["exit_stage1"] == 1.0
    assert last["AP"] == per_stage[2]["AP"] and last["exit_stage2"] == 1.0 and last["gflops_saved"] == 0.0
    assert first["gflops"] == round(costs[1]["flops"] / 1e9, 5)
    for row in curve:
        assert row["exit_stage1"] + row["exit_stage2"] == pytest.approx(1.0)
