import pytest
import torch

from okdpose.joints import BABYPOSE12
from okdpose.model import (MultiOutHRNet, count_params, forward_flops, stage_costs, stage_costs_table,
                           stage_latencies_ms, truncated_cost)

J = BABYPOSE12.num_joints


def test_w32_cost_agrees_with_the_design_numbers():
    costs = {c["stage"]: c for c in stage_costs(17, 32, 4, (192, 256))}
    assert costs[4]["flops"] / 1e9 == pytest.approx(15.29, abs=0.01)    # DESIGN §8: 15.3 GFLOP
    assert costs[4]["params"] == 28_536_113
    # each student alone: DESIGN's 9.46 / 3.63 include the unused lower-resolution fusions
    assert costs[3]["flops"] / 1e9 == pytest.approx(9.373, abs=0.01)
    assert costs[2]["flops"] / 1e9 == pytest.approx(3.597, abs=0.01)


def test_stage_latencies_cover_each_stage():
    lat = stage_latencies_ms(J, 2, 2, (32, 64), repeats=1, warmup=0)
    assert list(lat) == [1, 2] and all(v > 0 for v in lat.values())


def test_stage_costs_table_has_one_row_per_output_stage():
    model = MultiOutHRNet(J, 2, 3, multi=True)
    model.train()
    table = stage_costs_table(model, (32, 64), repeats=1)
    assert list(table) == [1, 2, 3] and all(tuple(r) == ("params_M", "gflops", "latency_ms") for r in table.values())
    assert table[1]["gflops"] < table[2]["gflops"] < table[3]["gflops"] and model.training
    assert list(stage_costs_table(MultiOutHRNet(J, 2, 3, multi=False), (32, 64), repeats=1)) == [3]


@pytest.mark.parametrize("n_stage,multi", [(1, False), (3, True), (4, False)])
def test_truncated_cost_counts_what_the_meta_device_counts_and_leaves_the_rng_alone(n_stage, multi):
    with torch.device("meta"):                 # no weights: the counts depend on shapes only
        shadow = MultiOutHRNet(J, 4, n_stage, multi=multi)
    truncated_cost.cache_clear()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert truncated_cost(J, 4, n_stage, multi, (64, 64)) == (count_params(shadow), forward_flops(shadow, (64, 64)))
    assert torch.equal(torch.get_rng_state(), before)
    assert truncated_cost.cache_info().misses == 1
    truncated_cost(J, 4, n_stage, multi, (64, 64))
    assert truncated_cost.cache_info().hits == 1


def _flop_counter(model, image_size):
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, image_size[1], image_size[0])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("width,n_stage,multi", [(2, 1, False), (2, 4, True), (4, 3, False), (4, 2, True)])
def test_hook_count_is_the_flop_counters_for_trained_folded_and_exported_models(width, n_stage, multi):
    from okdpose.export import stage_model
    from okdpose.model.cost import module_flops
    from okdpose.model.fuse import inference_copy

    model = MultiOutHRNet(J, width, n_stage, multi=multi)
    x = torch.zeros(1, 3, 64, 32)
    with torch.no_grad():
        assert module_flops(model.eval(), x) == forward_flops(model, (32, 64)) == _flop_counter(model, (32, 64)) > 0
    for other in (inference_copy(model), stage_model(model, n_stage)):      # folded convs carry a bias: not counted
        assert forward_flops(other, (32, 64)) == _flop_counter(other, (32, 64))


def test_a_model_computing_outside_conv_modules_is_counted_by_the_flop_counter():
    from okdpose.model.cost import module_flops

    class Functional(torch.nn.Module):          # a matmul in its own forward: hooks would miss it
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x).flatten(1)
            return y @ y.T

    for model in (Functional(), torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Flatten(), torch.nn.Linear(64, 2))):
        x = torch.zeros(1, 3, 4, 4)
        assert module_flops(model, x) is None        # not ours, or a Linear: FlopCounterMode counts it
        assert forward_flops(model, (4, 4)) == _flop_counter(model, (4, 4))


def test_stage_costs_table_counts_as_stage_costs_and_leaves_the_rng_alone():
    model = MultiOutHRNet(J, 2, 3, multi=True)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    table = stage_costs_table(model, (32, 64), repeats=1)
    assert torch.equal(torch.get_rng_state(), before)
    for c in stage_costs(J, 2, 3, (32, 64)):
        assert table[c["stage"]]["params_M"] == round(c["params"] / 1e6, 4)
        assert table[c["stage"]]["gflops"] == round(c["flops"] / 1e9, 4)
