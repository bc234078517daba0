"""Inference copies of a model: BatchNorm folded into the convolution before it, channels-last.

    fast = inference_copy(model)              # eval-mode copy; `model` itself is not touched
    with torch.no_grad():
        heatmaps = fast(x.contiguous(memory_format=torch.channels_last))

In eval mode a BatchNorm2d is an affine map per channel, y = (x - mean) / sqrt(var + eps) * g + b,
so after a bias-free Conv2d it folds into that conv's weight and a bias
(`torch.nn.utils.fusion.fuse_conv_bn_weights`): one pass over the activations less per BN, 292 of
them in HRNet-W32. The folded BN becomes an `nn.Identity`, so module names, hooks on other modules
and the outputs stay as they were (equal up to float rounding; `check` compares them). What it
buys is measured by `okdpose bench` (README, "Benchmarks").

Folding needs to know that the BN reads the conv's output and nothing else: the pairs folded are
the `convN`/`bnN` attributes of the HRNet blocks and stem (whose forward applies `bnN` right
after `convN`) and adjacent (Conv2d, BatchNorm2d) children of an `nn.Sequential`.
"""
from __future__ import annotations

import copy
import weakref
from typing import Collection, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from okdpose.model.hrnet import BasicBlock, Bottleneck, HRNetTrunk

_ATTR_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
_ATTR_TYPES = (BasicBlock, Bottleneck, HRNetTrunk)


class FoldError(RuntimeError):
    """The folded copy does not compute what the model computes (see `inference_copy`)."""


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats
            and bn.running_mean is not None and conv.out_channels == bn.num_features)


def conv_bn_pairs(model: nn.Module) -> Iterator[tuple[nn.Module, str, str]]:
    """(parent, conv attribute, bn attribute) of every foldable pair, in module order."""
    for parent in model.modules():
        if isinstance(parent, _ATTR_TYPES):
            for c, b in _ATTR_PAIRS:
                if _foldable(getattr(parent, c, None), getattr(parent, b, None)):
                    yield parent, c, b
        if type(parent) is nn.Sequential:
            names = list(parent._modules)
            for c, b in zip(names, names[1:]):
                if _foldable(parent._modules[c], parent._modules[b]):
                    yield parent, c, b


def fold_batchnorm(model: nn.Module, keep: Collection[str] = ()) -> int:
    """Fold in place every foldable BN of `model` (must be in eval mode) into its conv, except
    pairs whose conv or BN is named in `keep` (e.g. CAM target layers whose own output must stay
    the pre-BN one); -> number of BNs folded."""
    if model.training:
        raise ValueError("fold_batchnorm: the model is in training mode (BN uses batch statistics); "
                         "call model.eval() or use inference_copy(model)")
    names = {id(m): n for n, m in model.named_modules()}
    folded = 0
    for parent, c, b in list(conv_bn_pairs(model)):
        conv, bn = getattr(parent, c), getattr(parent, b)
        if names.get(id(conv)) in keep or names.get(id(bn)) in keep:
            continue
        with torch.no_grad():        # the conv gets the folded weight and a bias (new tensors)
            conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                          bn.eps, bn.weight, bn.bias)
        conv.requires_grad_(False)
        setattr(parent, b, nn.Identity())
        folded += 1
    return folded


def inference_copy(model: nn.Module, *, channels_last: Optional[bool] = None, keep: Collection[str] = (),
                   check: bool = False, atol: float = 1e-6, rtol: float = 1e-4) -> nn.Module:
    """An eval-mode deep copy of `model` with its BNs folded (`fold_batchnorm`), in channels-last
    memory format when `channels_last` (default: when the model is on the CPU), parameters frozen.

    Hooks registered on `model` are copied with it (they fire on the copy's modules). `check`:
    also run the copy and the model (eval, no_grad) on one small random input and raise FoldError
    when any output differs by more than `atol + rtol * max |model's output|` (off by default: that
    extra forward would fire hooks; tests/test_fuse.py checks every stage count).
    """
    was_training = model.training
    fast = copy.deepcopy(model).eval()
    fast.requires_grad_(False)
    fold_batchnorm(fast, keep)
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    if channels_last if channels_last is not None else device.type == "cpu":
        fast = fast.to(memory_format=torch.channels_last)
    if check:
        try:
            model.eval()
            _check_same(model, fast, device, atol, rtol)
        finally:
            model.train(was_training)
    return fast


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]]" = weakref.WeakKeyDictionary()


def cached_inference_copy(model: nn.Module, *, channels_last: Optional[bool] = None,
                          keep: Collection[str] = ()) -> nn.Module:
    """`inference_copy`, made once per model: the copy is kept (one per model, dropped with the
    model) and returned as is while no parameter or buffer of `model` has been replaced or changed
    in place (torch's version counters), nor its train/eval modes. When only the values changed (a
    model validated after every training epoch), the kept copy is re-folded in place from them
    (`refold`: the same numbers a new copy would hold) instead of deep-copied again; a copy
    returned earlier then holds the new values too. For repeated calls: making the copy costs more
    than a batch-1 forward pass (`okdpose bench` times it; W8 0.26-0.42 s against 0.06 s refolded)."""
    key = (channels_last, tuple(sorted(keep)), _state_key(model))
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    if hit is not None and hit[0][:2] == key[:2] and hit[0][2][1] == key[2][1] and refold(model, hit[1], keep):
        _CACHE[model] = (key, hit[1])
        return hit[1]
    fast = inference_copy(model, channels_last=channels_last, keep=keep)
    _CACHE[model] = (key, fast)
    return fast


def refold(model: nn.Module, fast: nn.Module, keep: Collection[str] = ()) -> bool:
    """Bring `fast`, an `inference_copy(model, keep=keep)` made from an earlier state of `model`,
    up to `model`'s current parameters and buffers in place (BNs folded again, `fast`'s memory
    format kept) -> True; False, with `fast` untouched, when the two no longer match (other
    modules, names, shapes, dtypes or devices: make a new copy)."""
    names = {id(m): n for n, m in model.named_modules()}
    values = dict(model.state_dict())
    folded_bns = set()
    with torch.no_grad():
        for parent, c, b in conv_bn_pairs(model):
            conv, bn = getattr(parent, c), getattr(parent, b)
            cname, bname = names.get(id(conv)), names.get(id(bn))
            if cname in keep or bname in keep:
                continue
            weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                bn.weight, bn.bias)
            values[f"{cname}.weight"], values[f"{cname}.bias"] = weight, bias
            folded_bns.add(bname)
    values = {k: v for k, v in values.items() if k.rpartition(".")[0] not in folded_bns}
    target = fast.state_dict(keep_vars=True)
    if target.keys() != values.keys() or any(
            t.shape != values[k].shape or t.dtype != values[k].dtype or t.device != values[k].device
            for k, t in target.items()):
        return False
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(values[k])
    return True


def _state_key(model: nn.Module) -> tuple:
    tensors = model.state_dict(keep_vars=True).values()
    return (tuple((t.data_ptr(), t._version, t.device.type) for t in tensors),
            tuple(m.training for m in model.modules()))


def _probe_input(model: nn.Module, device: torch.device) -> Tensor:
    m = int(getattr(model, "input_multiple", 32))
    side = max(2 * m, 32)
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, side, side, generator=g).to(device)


def _flat(out: object) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    return []


def _check_same(model: nn.Module, fast: nn.Module, device: torch.device, atol: float, rtol: float) -> None:
    x = _probe_input(model, device)
    with torch.no_grad():
        ref, got = _flat(model(x)), _flat(fast(x.contiguous(memory_format=torch.channels_last)))
    if len(ref) != len(got):
        raise FoldError(f"the folded copy returned {len(got)} tensors, the model {len(ref)}")
    for i, (r, g) in enumerate(zip(ref, got)):
        diff = (g.float() - r.float()).abs().max().item() if r.shape == g.shape else float("nan")
        if not diff <= atol + rtol * r.float().abs().max().item():
            raise FoldError(f"output {i} of the folded copy differs from the model's (max |diff| {diff:.3g}, "
                            f"shapes {tuple(g.shape)} vs {tuple(r.shape)}); use the model itself")
