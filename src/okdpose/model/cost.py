"""Parameter and FLOP counts of a MultiOutHRNet, without allocating its weights.

FLOPs are those of `torch.utils.flop_counter.FlopCounterMode`: convolutions and matmuls, a
multiply-add counted as 2 FLOPs; BN, ReLU, additions and upsampling are not counted.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from okdpose.model.multi_out import MultiOutHRNet


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: nn.Module, image_size: tuple[int, int], batch: int = 1) -> int:
    """FLOPs of one eval-mode forward pass on a (batch, 3, h, w) input; image_size is (w, h).
    Runs on the meta device when the model lives there (no compute)."""
    device = next(model.parameters()).device
    x = torch.empty(batch, 3, image_size[1], image_size[0], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def stage_costs(num_joints: int, width: int, n_stage: int, image_size: tuple[int, int]) -> list[dict[str, int]]:
    """Cost of producing each stage's output alone, i.e. of the model truncated there with one
    head: [{"stage": k, "params": ..., "flops": ...}] for k = 1..n_stage (FLOPs per image)."""
    costs = []
    for k in range(1, n_stage + 1):
        with torch.device("meta"):
            model = MultiOutHRNet(num_joints, width, k, multi=False)
        costs.append({"stage": k, "params": count_params(model), "flops": forward_flops(model, image_size)})
    return costs
