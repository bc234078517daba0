import numpy as np
import pytest
import torch
from torch import nn

from okdpose.explain import eigencam
from okdpose.model import fuse as fuse_mod
from okdpose.model.fuse import FoldError, conv_bn_pairs, fold_batchnorm, inference_copy

from fakes import trained_like




def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("n_stage", [1, 2, 3, 4])
def test_folded_copy_computes_the_same_outputs_without_any_bn(n_stage):
    model = trained_like(n_stage)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    before = state(model)
    x = torch.randn(2, 3, 64, 96)
    fast = inference_copy(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())      # every BN folded
    assert sum(1 for _ in conv_bn_pairs(model)) == bns
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)   # CPU: channels-last
    assert not any(p.requires_grad for p in fast.parameters())
    with torch.no_grad():
        ref, got = model(x), fast(x.contiguous(memory_format=torch.channels_last))
    assert len(ref) == len(got) == n_stage
    for r, g in zip(ref, got):
        assert r.abs().max() > 1                                               # not trivially zero
        # float rounding (channels-last alone differs as much): relative to the output's scale
        torch.testing.assert_close(g, r, rtol=0, atol=1e-4 * r.abs().max().item())
    # the model itself is untouched: weights, BN modules, mode
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bns and not model.training


def test_training_mode_is_restored_and_fold_in_place_refuses_training_mode():
    model = trained_like(2).train()
    inference_copy(model)
    assert model.training
    with pytest.raises(ValueError, match="training mode"):
        fold_batchnorm(model)


def test_keep_leaves_named_pairs_unfolded():
    model = trained_like(2)
    conv = "stage2.0.branches.0.0.conv1"
    fast = inference_copy(model, keep=[conv])
    assert isinstance(fast.get_submodule("stage2.0.branches.0.0.bn1"), nn.BatchNorm2d)
    assert torch.equal(fast.get_submodule(conv).weight, model.get_submodule(conv).weight)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) == 1


def test_check_catches_a_wrong_fold(monkeypatch):
    model = trained_like(2)
    inference_copy(model, check=True)                  # a correct fold passes

    def wrong(*args):
        weight, bias = torch.nn.utils.fusion.fuse_conv_bn_weights(*args)
        return weight, nn.Parameter(bias + 0.5)

    monkeypatch.setattr(fuse_mod, "fuse_conv_bn_weights", wrong)
    with pytest.raises(FoldError, match="differs"):
        inference_copy(model, check=True)


def test_eigencam_on_the_folded_copy_equals_the_model_itself_also_for_a_folded_conv():
    model = trained_like(3)
    x = torch.randn(2, 3, 64, 64)
    layers = model.feature_layer_names() + ["stage3.0.branches.1.0.conv2", "stage2.0.branches.0.1.bn1"]
    fast = eigencam(model, x, layers, fold_bn=True)    # the conv keeps its BN: its own output is pre-BN
    exact = eigencam(model, x, layers)
    for name in layers:                                # float rounding of Kaiming-initialised activations
        np.testing.assert_allclose(fast[name], exact[name], rtol=0, atol=1e-4, err_msg=name)


def _train_step(model: nn.Module) -> None:
    """One Adam step and BN running-stat update, in place (as an epoch of training changes the model)."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    out = model(torch.randn(2, 3, 64, 96))
    sum(o.square().mean() for o in out).backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("keep", [(), ("stage2.0.branches.0.0.conv1",)])
def test_cached_copy_is_refolded_in_place_to_exactly_a_new_copy(keep):
    from okdpose.model.fuse import cached_inference_copy, refold

    model = trained_like(2)
    first = cached_inference_copy(model, keep=keep)
    assert cached_inference_copy(model, keep=keep) is first                   # unchanged model: as is
    _train_step(model)
    again = cached_inference_copy(model, keep=keep)
    fresh = inference_copy(model, keep=keep)
    assert again is first                                                     # refolded, not copied
    assert again.state_dict().keys() == fresh.state_dict().keys()
    for k, v in fresh.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k                       # the same numbers, bit for bit
    assert again.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(again(x), fresh(x)))
    # another structure (the pair kept unfolded in one but not the other): refused, nothing written
    other = inference_copy(model, keep=() if keep else ("stage2.0.branches.0.0.conv1",))
    before = state(other)
    _train_step(model)
    assert not refold(model, other, keep)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_cached_copy_is_made_anew_when_the_model_moves_to_another_dtype_or_its_modes_change():
    from okdpose.model.fuse import cached_inference_copy

    model = trained_like(1)
    first = cached_inference_copy(model)
    model.double()
    again = cached_inference_copy(model)
    assert again is not first and again.conv1.weight.dtype == torch.float64
    model.layer1.train()
    assert cached_inference_copy(model) is not again                          # another mode: a new copy
