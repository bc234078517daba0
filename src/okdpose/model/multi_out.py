"""Multi-output HRNet: a 1x1 heatmap head after every stage, the last output being the teacher.

Shapes: B batch, J joints, H x W input; every output is (B, J, H/4, W/4).

Head names follow the original OKD-HRNet checkpoints: the head on stage k (1-based, k < 4) is
`intermediate_layers.{k-1}`, the stage-4 head is the official `final_layer`. A model truncated
to n_stage stages builds and runs nothing after that stage; with multi=False only the last head
exists. (The original also built an `intermediate_layers.3` that was never used; loading such a
checkpoint reports it as skipped.)
"""
from __future__ import annotations

from torch import Tensor, nn

from okdpose.model.hrnet import MAX_STAGES, HRNetTrunk


def head_name(stage: int) -> str:
    """Dotted name of the head on `stage` (1-based)."""
    return "final_layer" if stage == MAX_STAGES else f"intermediate_layers.{stage - 1}"


class MultiOutHRNet(HRNetTrunk):
    """HRNet trunk + per-stage heads; `forward(x)` -> list of (B, J, H/4, W/4), ordered by stage.

    `output_stages` gives the 1-based stage of each output; the last one is the teacher.
    """

    def __init__(self, num_joints: int, width: int = 32, n_stage: int = MAX_STAGES, multi: bool = True) -> None:
        if num_joints < 1:
            raise ValueError(f"num_joints must be >= 1, got {num_joints}")
        super().__init__(width, n_stage)
        self.num_joints, self.multi = num_joints, multi
        self.output_stages: tuple[int, ...] = tuple(range(1, n_stage + 1)) if multi else (n_stage,)
        self.intermediate_layers = nn.ModuleDict({
            str(k - 1): nn.Conv2d(width, num_joints, 1) for k in self.output_stages if k < MAX_STAGES
        })
        if n_stage == MAX_STAGES:
            self.final_layer = nn.Conv2d(width, num_joints, 1)
        self.init_weights()

    def config(self) -> dict[str, int | bool]:
        """Constructor arguments, as stored in okdpose checkpoints."""
        return {"num_joints": self.num_joints, "width": self.width, "n_stage": self.n_stage, "multi": self.multi}

    def head_layer_names(self) -> list[str]:
        """Dotted names of the heads, ordered like the outputs."""
        return [head_name(k) for k in self.output_stages]

    def feature_layer_names(self) -> list[str]:
        """Dotted names of the modules whose tensor output is the (B, width, H/4, W/4) feature
        each head reads, ordered like the outputs (targets for CAM hooks)."""
        return [f"feature_taps.{k - 1}" for k in self.output_stages]

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> [(B, J, H/4, W/4)] per output stage; the last is the teacher."""
        features = self.forward_features(x)
        return [self.get_submodule(name)(features[k - 1])
                for k, name in zip(self.output_stages, self.head_layer_names())]
