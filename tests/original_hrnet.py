"""Test-only reference: the ORIGINAL OKD-HRNet multi-output model, rebuilt from its code's facts.

Independent of okdpose.model on purpose (imports torch only), so tests/test_released.py can check
that our MultiOutHRNet runs released files exactly as the original did. Facts reproduced, from the
official `lib/models/pose_hrnet.py` (PoseHighResolutionNet) and OKD-HRNet's
`lib/models/multi_out_pose_hrnet.py` (MultiOutPoseHrnet, a subclass of it):

- stem: two stride-2 3x3 convs (3 -> 64 -> 64) with BN + ReLU; layer1: 4 Bottlenecks (64 -> 256).
- stages 2/3/4: 1/4/3 HighResolutionModules of 2/3/4 branches, 4 BasicBlocks per branch, branch b
  of width * 2**b channels; SUM fusion: j > i 1x1 conv + BN + nearest upsampling by 2**(j-i),
  j < i a chain of stride-2 3x3 conv + BN (ReLU between, none after the last), j == i identity
  (stored as None: no keys); the last module of stage 4 fuses into branch 0 only.
- transitions: a 3x3 conv + BN + ReLU where an existing branch changes width (only 256 -> width
  after layer1), None where it does not; each new branch: stride-2 3x3 convs + BN + ReLU from
  the previous stage's last branch.
- the whole 4-stage trunk and `final_layer` (1x1, width -> J) are built whatever N_STAGE;
  MultiOutPoseHrnet adds N_STAGE heads `intermediate_layers.{0..N_STAGE-1}` (1x1, width -> J).
- MultiOutPoseHrnet.forward: for stages 2, 3, 4 in turn, apply the transition, run head `index`
  on branch 0 of the transition's output, stop after N_STAGE heads, else run the stage; with
  N_STAGE 4 append final_layer on stage 4's branch 0 (so intermediate_layers.3 never runs).
- BN momentum 0.1 everywhere (BN_MOMENTUM or the default); every conv without bias but the heads.
"""
from __future__ import annotations

import torch
from torch import nn

# stage -> (NUM_MODULES, NUM_BRANCHES, NUM_BLOCKS per branch) of the W18/W32/W48 pose configs
STAGES = {2: (1, 2, 4), 3: (4, 3, 4), 4: (3, 4, 4)}


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, planes: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(planes, planes), nn.BatchNorm2d(planes, momentum=0.1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes, momentum=0.1)

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += residual
        return self.relu(out)


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes, momentum=0.1)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes, momentum=0.1)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4, momentum=0.1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += residual
        return self.relu(out)


class HighResolutionModule(nn.Module):
    def __init__(self, channels: list[int], blocks: int, multi_scale_output: bool = True) -> None:
        super().__init__()
        self.num_branches = len(channels)
        self.branches = nn.ModuleList(nn.Sequential(*[BasicBlock(c) for _ in range(blocks)]) for c in channels)
        fuse_layers = []
        for i in range(self.num_branches if multi_scale_output else 1):
            row: list[nn.Module | None] = []
            for j in range(self.num_branches):
                if j > i:
                    row.append(nn.Sequential(nn.Conv2d(channels[j], channels[i], 1, 1, 0, bias=False),
                                             nn.BatchNorm2d(channels[i]),
                                             nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")))
                elif j == i:
                    row.append(None)
                else:
                    steps = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        cout = channels[i] if last else channels[j]
                        layers = [nn.Conv2d(channels[j], cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout)]
                        steps.append(nn.Sequential(*layers) if last else nn.Sequential(*layers, nn.ReLU(True)))
                    row.append(nn.Sequential(*steps))
            fuse_layers.append(nn.ModuleList(row))
        self.fuse_layers = nn.ModuleList(fuse_layers)
        self.relu = nn.ReLU(True)

    def forward(self, x):
        for i in range(self.num_branches):
            x[i] = self.branches[i](x[i])
        x_fuse = []
        for i in range(len(self.fuse_layers)):
            y = x[0] if i == 0 else self.fuse_layers[i][0](x[0])
            for j in range(1, self.num_branches):
                y = y + x[j] if i == j else y + self.fuse_layers[i][j](x[j])
            x_fuse.append(self.relu(y))
        return x_fuse


def make_transition(pre: list[int], cur: list[int]) -> nn.ModuleList:
    layers: list[nn.Module | None] = []
    for i in range(len(cur)):
        if i < len(pre):
            layers.append(None if cur[i] == pre[i] else nn.Sequential(
                nn.Conv2d(pre[i], cur[i], 3, 1, 1, bias=False), nn.BatchNorm2d(cur[i]), nn.ReLU(inplace=True)))
        else:
            convs = []
            for j in range(i + 1 - len(pre)):
                cout = cur[i] if j == i - len(pre) else pre[-1]
                convs.append(nn.Sequential(nn.Conv2d(pre[-1], cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout),
                                           nn.ReLU(inplace=True)))
            layers.append(nn.Sequential(*convs))
    return nn.ModuleList(layers)


class PoseHighResolutionNet(nn.Module):
    """The official single-output pose HRNet: (B, 3, H, W) -> final_layer's (B, J, H/4, W/4)."""

    def __init__(self, num_joints: int, width: int = 32) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64, momentum=0.1)
        self.conv2, self.bn2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64, momentum=0.1)
        self.relu = nn.ReLU(inplace=True)
        downsample = nn.Sequential(nn.Conv2d(64, 256, 1, 1, bias=False), nn.BatchNorm2d(256, momentum=0.1))
        self.layer1 = nn.Sequential(Bottleneck(64, 64, downsample), *[Bottleneck(256, 64) for _ in range(3)])
        self.num_branches = {}
        pre = [256]
        for stage, (modules, branches, blocks) in STAGES.items():
            cur = [width * 2 ** b for b in range(branches)]
            setattr(self, f"transition{stage - 1}", make_transition(pre, cur))
            setattr(self, f"stage{stage}", nn.Sequential(*[
                HighResolutionModule(cur, blocks, multi_scale_output=not (stage == 4 and m == modules - 1))
                for m in range(modules)]))
            self.num_branches[stage] = branches
            pre = cur
        self.final_layer = nn.Conv2d(width, num_joints, 1, 1, 0)

    def stem(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.layer1(x)

    def transition(self, stage: int, y_list: list) -> list:
        transition = getattr(self, f"transition{stage - 1}")
        return [y_list[i] if transition[i] is None else transition[i](y_list[-1])
                for i in range(self.num_branches[stage])]

    def forward(self, x):
        y_list = [self.stem(x)]
        for stage in STAGES:
            y_list = getattr(self, f"stage{stage}")(self.transition(stage, y_list))
        return self.final_layer(y_list[0])


class MultiOutPoseHrnet(PoseHighResolutionNet):
    """OKD-HRNet's model: forward -> [intermediate_layers.k(...)] * n_stage (+ final_layer for n_stage 4)."""

    def __init__(self, num_joints: int, width: int = 32, n_stage: int = 4) -> None:
        super().__init__(num_joints, width)
        self.n_stage = n_stage
        self.intermediate_layers = nn.ModuleList(nn.Conv2d(width, num_joints, 1, 1, 0) for _ in range(n_stage))

    def forward(self, x):
        y_list = [self.stem(x)]
        outputs = []
        for index, stage in enumerate(STAGES):
            x_list = self.transition(stage, y_list)
            outputs.append(self.intermediate_layers[index](x_list[0]))
            if self.n_stage == index + 1:
                break
            y_list = getattr(self, f"stage{stage}")(x_list)
        if self.n_stage == 4:
            outputs.append(self.final_layer(y_list[0]))
        return outputs


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.5) -> nn.Module:
    """Random weights AND random BN running statistics (eval mode reads them), in place; -> model.

    Convs get N(0, scale / sqrt(fan_in)): with 0.5 the outputs of a W4 model stay within about +-3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * scale / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    return model
