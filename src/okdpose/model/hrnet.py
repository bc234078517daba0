"""HRNet trunk with the official `pose_hrnet` key names, built in loops from a spec table.

Shapes: B batch, H x W input (both divisible by `HRNetTrunk.input_multiple`). Branch b runs at
H/2**(b+2) x W/2**(b+2) with width * 2**b channels; branch 0 is the H/4 x W/4 heatmap resolution.

Key names equal the official checkpoint's (`conv1.weight`, `layer1.0.downsample.0.weight`,
`transition1.1.0.0.weight`, `stage4.2.fuse_layers.0.3.1.weight`, ...): absent transitions and the
j == i fuse entries are parameter-free `nn.Identity` where the official code stores None, so they
add no keys. Stage k (2..4) is built only when k <= n_stage; the last module of the last built
stage fuses into branch 0 only, as the official stage 4 does.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

BN_MOMENTUM = 0.1
STEM_CHANNELS = 64
LAYER1_PLANES, LAYER1_BLOCKS, BOTTLENECK_EXPANSION = 64, 4, 4
LAYER1_CHANNELS = LAYER1_PLANES * BOTTLENECK_EXPANSION   # 256
MAX_STAGES = 4
STEM_MODULES = ("conv1", "bn1", "conv2", "bn2", "layer1")


@dataclass(frozen=True)
class StageSpec:
    """One HRNet stage of HighResolutionModules with BASIC blocks and SUM fusion."""

    modules: int
    branches: int
    blocks: int      # BasicBlocks per branch


# Official HRNet-W18/32/48 pose configs (w*_256x192): stage number -> spec. Stage 1 is layer1.
HRNET_STAGES: dict[int, StageSpec] = {
    2: StageSpec(modules=1, branches=2, blocks=4),
    3: StageSpec(modules=4, branches=3, blocks=4),
    4: StageSpec(modules=3, branches=4, blocks=4),
}


def branch_channels(width: int, branches: int) -> list[int]:
    """Channels of each branch: width, 2*width, 4*width, ..."""
    return [width * 2**b for b in range(branches)]


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = False) -> nn.Sequential:
    """Conv (no bias, 'same' padding) + BN [+ ReLU]; keys `0.weight`, `1.weight`, ..."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout, momentum=BN_MOMENTUM),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity shortcut; (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x            # in place on a fresh tensor: `x` (maybe a tapped feature) is untouched
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) with a projected shortcut when channels change."""

    def __init__(self, cin: int, planes: int) -> None:
        super().__init__()
        cout = planes * BOTTLENECK_EXPANSION
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = conv_bn(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


def make_fuse(channels: list[int], i: int, j: int) -> nn.Module:
    """Map branch j onto branch i: 1x1 conv + nearest upsampling (j > i), a chain of
    stride-2 3x3 convs (j < i; ReLU between, none after the last), identity (j == i)."""
    if j == i:
        return nn.Identity()
    if j > i:
        return nn.Sequential(*conv_bn(channels[j], channels[i], 1),
                             nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"))
    steps = i - j
    return nn.Sequential(*[
        conv_bn(channels[j], channels[i] if s == steps - 1 else channels[j], 3, 2, relu=s < steps - 1)
        for s in range(steps)
    ])


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks, then SUM fusion across resolutions.

    list of (B, c_b, h_b, w_b) -> the same list (or only branch 0 when not multi-scale).
    """

    def __init__(self, channels: list[int], blocks: int, multi_scale_output: bool = True) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError("HighResolutionModule needs at least two branches")
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(c) for _ in range(blocks)]) for c in channels
        )
        outputs = len(channels) if multi_scale_output else 1
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(make_fuse(channels, i, j) for j in range(len(channels)))
            for i in range(outputs)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for fuse in self.fuse_layers:
            y = fuse[0](xs[0])
            for j in range(1, len(xs)):      # same summation order as the official code
                y = y + fuse[j](xs[j])
            out.append(self.relu(y))
        return out


def make_stage(channels: list[int], spec: StageSpec, last: bool) -> nn.Sequential:
    """`spec.modules` HighResolutionModules; in the last stage built, the final module fuses
    into branch 0 only (the official stage 4; for a truncated model the other fusions are unread)."""
    return nn.Sequential(*[
        HighResolutionModule(channels, spec.blocks, multi_scale_output=not (last and m == spec.modules - 1))
        for m in range(spec.modules)
    ])


def make_transition(pre: list[int], cur: list[int]) -> nn.ModuleList:
    """Branches of the previous stage -> inputs of the next: a 3x3 conv where the width of an
    existing branch changes, identity where it does not, stride-2 3x3 convs from the lowest
    resolution branch for each new branch."""
    layers: list[nn.Module] = []
    for i, c in enumerate(cur):
        if i < len(pre):
            layers.append(nn.Identity() if c == pre[i] else conv_bn(pre[i], c, 3, relu=True))
        else:
            steps = i + 1 - len(pre)
            layers.append(nn.Sequential(*[
                conv_bn(pre[-1], c if s == steps - 1 else pre[-1], 3, 2, relu=True) for s in range(steps)
            ]))
    return nn.ModuleList(layers)


def run_transition(transition: nn.ModuleList, ys: list[Tensor]) -> list[Tensor]:
    """Apply a transition: existing branches read their own input, new ones the last branch."""
    return [t(ys[i] if i < len(ys) else ys[-1]) for i, t in enumerate(transition)]


class HRNetTrunk(nn.Module):
    """HRNet stem, layer1, transitions and stages 2..n_stage (official key names).

    `forward_features`: (B, 3, H, W) -> one (B, width, H/4, W/4) branch-0 feature per stage
    1..n_stage. Stage 1's feature is branch 0 after transition1 (256 -> width conv-BN-ReLU);
    stage k's (k >= 2) is branch 0 of stage k. With n_stage = 1 transition1 holds branch 0 only.
    Each feature passes through a parameter-free tap `feature_taps.{k-1}` (for CAM hooks).
    """

    def __init__(self, width: int = 32, n_stage: int = MAX_STAGES) -> None:
        super().__init__()
        if not 1 <= n_stage <= MAX_STAGES:
            raise ValueError(f"n_stage must be 1..{MAX_STAGES}, got {n_stage}")
        if width < 1:
            raise ValueError(f"width must be >= 1 (official: 18, 32, 48), got {width}")
        self.width, self.n_stage = width, n_stage
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(STEM_CHANNELS, STEM_CHANNELS, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(STEM_CHANNELS, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(*[
            Bottleneck(STEM_CHANNELS if b == 0 else LAYER1_CHANNELS, LAYER1_PLANES) for b in range(LAYER1_BLOCKS)
        ])
        # (stage module name or None, transition name or None) per stage 1..n_stage
        self._steps: list[tuple[str | None, str | None]] = []
        channels = [LAYER1_CHANNELS]
        for k in range(1, n_stage + 1):
            stage_name = transition_name = None
            if k > 1:
                stage_name = f"stage{k}"
                self.add_module(stage_name, make_stage(channels, HRNET_STAGES[k], last=k == n_stage))
            if k < n_stage or k == 1:      # stage 1's output is read after transition1
                nxt = branch_channels(width, HRNET_STAGES[k + 1].branches if k < n_stage else 1)
                transition_name = f"transition{k}"
                self.add_module(transition_name, make_transition(channels, nxt))
                channels = nxt
            self._steps.append((stage_name, transition_name))
        self.feature_taps = nn.ModuleList(nn.Identity() for _ in range(n_stage))
        self.input_multiple = 4 * 2 ** (HRNET_STAGES[n_stage].branches - 1 if n_stage > 1 else 0)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> [(B, width, H/4, W/4)] * n_stage, branch 0 after each stage."""
        m = self.input_multiple
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % m or x.shape[3] % m:
            raise ValueError(
                f"HRNet input must be (B, 3, H, W) with H and W divisible by {m} "
                f"(n_stage={self.n_stage}), got {tuple(x.shape)}; choose data.image_size accordingly"
            )
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        ys = [self.layer1(x)]
        features = []
        for (stage_name, transition_name), tap in zip(self._steps, self.feature_taps):
            if stage_name is not None:
                ys = getattr(self, stage_name)(ys)
            if transition_name is not None:
                ys = run_transition(getattr(self, transition_name), ys)
            features.append(tap(ys[0]))
        return features

    def init_weights(self) -> None:
        """The original HRNet initialisation: conv N(0, 0.001), bias 0; BN weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


@functools.lru_cache(maxsize=8)
def full_trunk_keys(width: int) -> frozenset[str]:
    """state_dict keys of the complete 4-stage trunk (built on the meta device: no memory)."""
    with torch.device("meta"):
        return frozenset(HRNetTrunk(width, MAX_STAGES).state_dict())
