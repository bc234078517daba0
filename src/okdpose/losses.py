"""Heatmap losses and the online knowledge distillation (OKD) objective.

Legend: B batch, J joints, H x W heatmap pixels; `weight` is the (B, J) per-joint visibility
weight of the dataset (a (B, J, 1) tensor as the original datasets return is accepted too).
Losses are computed in float32 at least (half precision inputs are upcast, float64 is kept)
and return a 0-d tensor.

Scale note. `kl_distill` averages the per-heatmap KL over the B*J heatmaps. The original code
(OKDHP / OnlineKD-HRNet `JointsKLDLoss`) divides the same sum by B*H*W, so
ours = original * (H*W) / J and the original `KLD_WEIGHT` w corresponds to our
`kld_weight` = w * J / (H*W): 2000 -> 7.8125 for 12 joints on 48x64 heatmaps
(`kld_weight_from_original`, `original_kld_weight`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from okdpose.params import LossParams


# --------------------------------------------------------------------------- elementary losses

def _apply_weight(x: Tensor, weight: Optional[Tensor]) -> Tensor:
    """x (B, J, H, W) float32 times weight (B, J) broadcast over pixels; None means 1."""
    if weight is None:
        return x
    b, j = x.shape[:2]
    if weight.numel() != b * j:
        raise ValueError(f"weight must have B*J = {b}*{j} elements (shape (B, J)), got shape {tuple(weight.shape)}")
    return x * weight.reshape(b, j, 1, 1).to(dtype=x.dtype, device=x.device)


def _at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _check_pair(a: Tensor, b: Tensor, names: str) -> None:
    if a.dim() != 4 or a.shape != b.shape:
        raise ValueError(f"{names} must be two (B, J, H, W) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def joints_mse(pred: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Heatmap MSE: (1/J) sum_j 0.5 * mean_{b, pixels} (w_bj * (pred - target))^2.

    pred, target: (B, J, H, W); weight: (B, J) or None (= 1). Gradients reach `pred` (and
    `target` if it requires grad). Equals the original `JointsMSELoss` for any batch size.
    """
    _check_pair(pred, target, "pred and target")
    diff = _apply_weight(_at_least_float32(pred) - _at_least_float32(target), weight)
    # every joint has the same B*H*W pixels, so the mean of per-joint means is the global mean
    return 0.5 * diff.pow(2).mean()


def kl_distill(
    student: Tensor,
    teacher: Tensor,
    weight: Optional[Tensor] = None,
    temperature: float = 1.0,
    detach_teacher: bool = False,
) -> Tensor:
    """Spatial KL(p_teacher || p_student), averaged over the B*J heatmaps.

    p_t = softmax over the H*W pixels of (w * teacher / T), log p_s = log_softmax(w * student / T),
    KL = sum_pixels p_t (log p_t - log p_s). student, teacher: (B, J, H, W); weight: (B, J) or
    None. As in the original, the weight scales the heatmaps before the softmax: a zero-weight
    joint compares two uniform distributions and contributes 0 (it still counts in the mean).
    With `detach_teacher=False` (the original) the gradient also flows into the teacher; with
    True the teacher is detached (one-way distillation). No T^2 factor, as the original.
    """
    _check_pair(student, teacher, "student and teacher")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if detach_teacher:
        teacher = teacher.detach()
    b, j = student.shape[:2]
    s = _apply_weight(_at_least_float32(student), weight).reshape(b, j, -1) / temperature
    t = _apply_weight(_at_least_float32(teacher), weight).reshape(b, j, -1) / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)   # (B, J)
    return kl.mean()


def kld_weight_from_original(weight: float, num_joints: int, heatmap_size: Sequence[int]) -> float:
    """Our `kld_weight` equal to the original `TRAIN.KLD_WEIGHT`: w * J / (H * W). heatmap_size (w, h)."""
    w, h = heatmap_size
    return weight * num_joints / (w * h)


def original_kld_weight(kld_weight: float, num_joints: int, heatmap_size: Sequence[int]) -> float:
    """Inverse of `kld_weight_from_original`: the original KLD_WEIGHT for our `kld_weight`."""
    w, h = heatmap_size
    return kld_weight * (w * h) / num_joints


def consistency_weight(epoch: float, rampup_epochs: float) -> float:
    """Sigmoid ramp-up exp(-5 (1 - t/L)^2), t clipped to [0, L]; 1.0 when L is 0 (the original's)."""
    if rampup_epochs <= 0:
        return 1.0
    t = min(max(float(epoch), 0.0), float(rampup_epochs))
    phase = 1.0 - t / rampup_epochs
    return float(math.exp(-5.0 * phase * phase))


# --------------------------------------------------------------------------- OKD objective

@dataclass(frozen=True)
class OKDLoss:
    """The OKD objective over a model's list of stage outputs (the last output is the teacher),
    configured by the `loss` params section as it is.

    total = teacher_weight * MSE(last)
          + [use_mse] sum_{students} MSE(student)
          + [use_kld] consistency * kld_weight * sum_{(s, t) in kld_couples} KL(s || t)

    `output_stages` gives the 1-based stage of each output (`Params.output_stages()`, e.g.
    (1, 2, 3, 4), or (4,) for multi: false); couples are 1-based (student, teacher) stages.
    Students are the stages that appear as the student of a couple (the original supervises only
    those with MSE, also when use_kld is off); a stage in no couple gets no loss. With a single
    output only the teacher MSE applies. MSE uses the target weight only when `use_target_weight`;
    KL always uses it when given (as the original).
    """

    params: LossParams
    output_stages: tuple[int, ...]

    def __post_init__(self) -> None:
        self.params.validate("loss")
        object.__setattr__(self, "output_stages", tuple(int(s) for s in self.output_stages))
        stages, p = self.output_stages, self.params
        if not stages or list(stages) != sorted(set(stages)):
            raise ValueError(f"output_stages must be increasing 1-based stages, got {stages}")
        if p.use_kld and len(stages) == 1 and p.kld_couples:
            raise ValueError("use_kld needs a multi-output model: a single output has no students")
        if len(stages) > 1 and (p.use_kld or p.use_mse):
            for s, t in p.kld_couples:
                if s not in stages or t not in stages:
                    raise ValueError(f"couple ({s}, {t}): both stages must be model outputs {stages}")
                if t <= s:
                    raise ValueError(f"couple ({s}, {t}): the teacher stage must come after the student")

    @property
    def student_stages(self) -> tuple[int, ...]:
        """1-based stages supervised by MSE besides the teacher (empty for a single output)."""
        if len(self.output_stages) == 1 or not self.params.use_mse:
            return ()
        return tuple(sorted({s for s, _ in self.params.kld_couples}))

    @property
    def trained_stages(self) -> tuple[int, ...]:
        """1-based stages whose output gets a gradient: the teacher, the students and, with
        use_kld, both stages of every couple (the others are unused outputs under DDP)."""
        kd = {s for c in self.params.kld_couples for s in c} if self.params.use_kld else set()
        return tuple(sorted({self.output_stages[-1], *self.student_stages, *kd}))

    def consistency(self, epoch: float) -> float:
        return consistency_weight(epoch, self.params.rampup_epochs)

    def __call__(
        self,
        outputs: Sequence[Tensor],
        target: Tensor,
        weight: Optional[Tensor] = None,
        consistency: float = 1.0,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """outputs: one (B, J, H, W) tensor per output stage; target (B, J, H, W); weight (B, J).

        Returns (total, terms). `total` carries the gradient; `terms` are detached, unweighted
        values for logging: `mse_teacher`, `mse_stage{k}` per student, `kl_{s}_{t}` per couple
        (when use_kld), `kl_weight` (= consistency * kld_weight) and `total`.
        """
        if len(outputs) != len(self.output_stages):
            raise ValueError(f"got {len(outputs)} outputs for output stages {self.output_stages}")
        p = self.params
        index = {stage: i for i, stage in enumerate(self.output_stages)}
        mse_weight = weight if p.use_target_weight else None

        teacher_mse = joints_mse(outputs[-1], target, mse_weight)
        total = p.teacher_weight * teacher_mse
        terms: dict[str, Tensor] = {"mse_teacher": teacher_mse}
        for s in self.student_stages:
            mse = joints_mse(outputs[index[s]], target, mse_weight)
            terms[f"mse_stage{s}"] = mse
            total = total + mse
        if p.use_kld and len(self.output_stages) > 1 and p.kld_couples:
            kl_sum = 0.0
            for s, t in p.kld_couples:
                kl = kl_distill(outputs[index[s]], outputs[index[t]], weight,
                                temperature=p.temperature, detach_teacher=p.detach_teacher)
                terms[f"kl_{s}_{t}"] = kl
                kl_sum = kl_sum + kl
            kl_weight = consistency * p.kld_weight
            terms["kl_weight"] = torch.tensor(kl_weight)
            total = total + kl_weight * kl_sum
        terms["total"] = total
        return total, {k: v.detach() for k, v in terms.items()}

