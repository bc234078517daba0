from pathlib import Path

import pytest
import torch

from okdpose.model import MultiOutHRNet, count_params

REFERENCE = Path(__file__).parent / "data" / "pose_hrnet_w32_17joints_state_dict.tsv"
B, J, W, H = 2, 5, 32, 64          # tiny CPU config: batch, joints, input width, height


def official_keys() -> list[tuple[str, tuple[int, ...]]]:
    rows = [line.split("\t") for line in REFERENCE.read_text().splitlines()]
    return [(key, tuple(int(d) for d in shape.strip("(,)").split(",") if d.strip())) for key, shape in rows]


def keys_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.fixture(scope="module")
def w32() -> MultiOutHRNet:
    torch.manual_seed(0)
    return MultiOutHRNet(17, 32, 4, multi=False)


def test_w32_state_dict_equals_the_official_checkpoint(w32):
    ref = official_keys()
    assert len(ref) == 1754
    assert keys_shapes(w32) == ref                      # same keys, shapes and order
    assert count_params(w32) == 28_536_113              # 28.5M, as the official W32 / 17 joints
    assert w32.head_layer_names() == ["final_layer"] and w32.output_stages == (4,)


def test_multi_heads_add_only_intermediate_layers():
    model = MultiOutHRNet(17, 32, 4, multi=True)
    extra = set(model.state_dict()) - {k for k, _ in official_keys()}
    assert extra == {f"intermediate_layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    assert model.head_layer_names() == [f"intermediate_layers.{i}" for i in range(3)] + ["final_layer"]
    assert model.feature_layer_names() == [f"feature_taps.{i}" for i in range(4)]
    assert model.output_stages == (1, 2, 3, 4)


# W32 / 17 joints, one head: each stage output alone. Smaller than a full stage would be
# because the last module of the last built stage fuses into branch 0 only (see hrnet.py).
@pytest.mark.parametrize("n_stage, params, absent", [
    (1, 399_409, ("transition1.1.", "stage2.", "final_layer.")),
    (2, 919_281, ("stage2.0.fuse_layers.1.", "transition2.", "stage3.", "final_layer.")),
    (3, 7_686_193, ("stage3.3.fuse_layers.1.", "transition3.", "stage4.", "final_layer.")),
])
def test_truncated_model_builds_nothing_after_its_last_stage(n_stage, params, absent):
    model = MultiOutHRNet(17, 32, n_stage, multi=False)
    keys = list(model.state_dict())
    assert count_params(model) == params
    assert not [k for k in keys if k.startswith(absent)]
    assert model.head_layer_names() == [f"intermediate_layers.{n_stage - 1}"]
    official = {k for k, _ in official_keys()}
    assert set(keys) - official == {f"intermediate_layers.{n_stage - 1}.weight", f"intermediate_layers.{n_stage - 1}.bias"}


@pytest.mark.parametrize("n_stage", [1, 2, 3, 4])
def test_output_shapes_per_stage(n_stage):
    torch.manual_seed(0)
    x = torch.randn(B, 3, H, W)
    multi = MultiOutHRNet(J, 4, n_stage, multi=True)
    outs = multi(x)
    assert [tuple(o.shape) for o in outs] == [(B, J, H // 4, W // 4)] * n_stage
    single = MultiOutHRNet(J, 4, n_stage, multi=False)
    single.load_state_dict(multi.state_dict(), strict=False)
    (out,) = single(x)
    torch.testing.assert_close(out, outs[-1])           # same trunk + teacher head, same output
    heads = {k.rsplit(".", 1)[0] for k in single.state_dict() if k.startswith(("intermediate", "final"))}
    assert heads == set(single.head_layer_names())


def test_feature_taps_are_what_the_heads_read_and_add_no_keys():
    torch.manual_seed(0)
    model = MultiOutHRNet(J, 4, 4, multi=True).eval()
    assert not [k for k in model.state_dict() if "feature_taps" in k]
    grabbed = {}
    for name in model.feature_layer_names():
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: grabbed.__setitem__(name, o))
    with torch.no_grad():
        outs = model(torch.randn(B, 3, H, W))
        for feat, head, out in zip(model.feature_layer_names(), model.head_layer_names(), outs):
            assert isinstance(grabbed[feat], torch.Tensor) and grabbed[feat].shape == (B, 4, H // 4, W // 4)
            torch.testing.assert_close(model.get_submodule(head)(grabbed[feat]), out)


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    model = MultiOutHRNet(J, 4, 4, multi=True).eval()
    for p in model.parameters():        # weights large enough that a layout bug would show
        p.data.normal_(0, 0.3)
    x = torch.randn(B, 3, H, W)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_w32_runs_at_a_small_resolution(w32):
    with torch.no_grad():
        (out,) = w32.eval()(torch.randn(1, 3, 64, 32))
    assert out.shape == (1, 17, 16, 8) and torch.isfinite(out).all()


def test_original_initialisation():
    model = MultiOutHRNet(J, 8, 4, multi=True)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert abs(weights.std().item() - 0.001) < 1e-4
    assert all(m.bias is None or not m.bias.any() for m in convs)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all((m.weight == 1).all() and not m.bias.any() for m in bns)


def test_bad_arguments_and_inputs_are_refused():
    with pytest.raises(ValueError, match="n_stage"):
        MultiOutHRNet(J, 4, 5)
    with pytest.raises(ValueError, match="num_joints"):
        MultiOutHRNet(0, 4, 4)
    with pytest.raises(ValueError, match="divisible by 32"):
        MultiOutHRNet(J, 4, 4)(torch.randn(1, 3, 48, 40))
    MultiOutHRNet(J, 4, 2)(torch.randn(1, 3, 48, 40))    # 2 stages only need multiples of 8
