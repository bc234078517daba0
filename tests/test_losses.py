import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from okdpose.losses import (
    OKDLoss,
    consistency_weight,
    joints_mse,
    kl_distill,
    kld_weight_from_original,
    original_kld_weight,
)
from okdpose.params import LossParams, Params, ParamsError, params_from_dict

H, W, J = 64, 48, 12


def gaussian(h=H, w=W, cx=20.0, cy=30.0, sigma=2.0) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


# ------------------------------------------------------------------ reference loops (the original formulas)

def original_mse(output, target, target_weight, use_target_weight):
    """JointsMSELoss of the original HRNet, written as its loop (batch size > 1)."""
    b, j = output.shape[:2]
    crit = nn.MSELoss(reduction="mean")
    preds = output.reshape(b, j, -1).split(1, 1)
    gts = target.reshape(b, j, -1).split(1, 1)
    loss = 0
    for idx in range(j):
        p, g = preds[idx].squeeze(), gts[idx].squeeze()
        if use_target_weight:
            loss += 0.5 * crit(p.mul(target_weight[:, idx]), g.mul(target_weight[:, idx]))
        else:
            loss += 0.5 * crit(p, g)
    return loss / j


def original_kld(output, target, target_weight, T=1.0):
    """JointsKLDLoss of OKDHP / OnlineKD-HRNet, written as its loop (batch size > 1)."""
    b, j, h, w = output.shape
    crit = nn.KLDivLoss(reduction="none")
    preds = output.reshape(b, j, -1).split(1, 1)
    gts = target.reshape(b, j, -1).split(1, 1)
    loss = 0
    for idx in range(j):
        p, g = preds[idx].squeeze(), gts[idx].squeeze()
        p = F.log_softmax(p.mul(target_weight[:, idx]) / T, dim=1)
        g = F.softmax(g.mul(target_weight[:, idx] / T), dim=1)
        loss += crit(p, g)
    return torch.sum(torch.sum(loss, dim=1), dim=0) / b / (h * w)


# ------------------------------------------------------------------ known values

def test_known_values_zero_student_vs_gaussian_teacher():
    g = gaussian()
    teacher = torch.tensor(g, dtype=torch.float64).expand(2, J, H, W).contiguous()
    student = torch.zeros_like(teacher)

    # MSE: the sum of g^2 on the grid is pi*sigma^2 (the Gaussian is far from the border), so
    # 0.5 * pi * 4 / (64 * 48) = 2.0453e-3 for every joint.
    expected_mse = 0.5 * math.pi * 4.0 / (H * W)
    assert joints_mse(student, teacher).item() == pytest.approx(expected_mse, rel=1e-9)
    assert expected_mse == pytest.approx(2.0453e-3, rel=1e-4)

    # KL(p_t || uniform) = sum p_t log p_t + log(H*W), computed with numpy.
    e = np.exp(g)
    p = e / e.sum()
    expected_kl = float(np.sum(p * np.log(p)) + np.log(H * W))
    assert expected_kl == pytest.approx(3.1834e-3, rel=1e-4)
    assert kl_distill(student, teacher).item() == pytest.approx(expected_kl, rel=1e-9)
    # float32 (what training uses): p_t is nearly uniform, so the KL loses a few digits
    assert kl_distill(student.float(), teacher.float()).item() == pytest.approx(expected_kl, rel=2e-3)
    # the original divides the same sum by B*H*W instead of B*J: 3.1834e-3 * 12 / 3072 = 1.2435e-5
    orig = original_kld(student, teacher, torch.ones(2, J, 1, dtype=torch.float64)).item()
    assert orig == pytest.approx(expected_kl * J / (H * W), rel=1e-9)
    assert orig == pytest.approx(1.2435e-5, rel=1e-4)


def test_kld_weight_conversion():
    assert kld_weight_from_original(2000, 12, (48, 64)) == pytest.approx(7.8125)
    assert original_kld_weight(7.8125, 12, (48, 64)) == pytest.approx(2000)
    assert original_kld_weight(kld_weight_from_original(3.0, 17, (24, 32)), 17, (24, 32)) == pytest.approx(3.0)


def test_zero_loss_when_equal():
    x = torch.randn(3, J, 8, 6)
    assert joints_mse(x, x).item() == 0.0
    assert kl_distill(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_distill(x, x.clone(), torch.rand(3, J), temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ equality with the original loops

@pytest.mark.parametrize("use_target_weight", [False, True])
def test_mse_equals_original_loop(use_target_weight):
    torch.manual_seed(0)
    pred, target = torch.rand(4, J, 16, 12), torch.rand(4, J, 16, 12)
    tw = (torch.rand(4, J, 1) > 0.3).float()
    ours = joints_mse(pred, target, tw[..., 0] if use_target_weight else None)
    assert ours.item() == pytest.approx(original_mse(pred, target, tw, use_target_weight).item(), rel=1e-6)
    # (B, J, 1) weights, as the original datasets return them, are accepted too
    if use_target_weight:
        assert joints_mse(pred, target, tw).item() == pytest.approx(ours.item(), rel=1e-7)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kld_equals_original_loop_times_scale(T):
    torch.manual_seed(1)
    b, h, w = 4, 16, 12
    s, t = torch.randn(b, J, h, w), torch.randn(b, J, h, w)
    tw = (torch.rand(b, J, 1) > 0.3).float()
    ours = kl_distill(s, t, tw[..., 0], temperature=T)
    orig = original_kld(s, t, tw, T)
    # ours = original * (H*W) / J
    assert ours.item() == pytest.approx(orig.item() * (h * w) / J, rel=1e-5)
    # so the converted weight gives the same weighted loss as the original KLD_WEIGHT
    assert (kld_weight_from_original(2000, J, (w, h)) * ours).item() == pytest.approx(2000 * orig.item(), rel=1e-5)


# ------------------------------------------------------------------ masks, gradients, batch size 1

def test_masked_joints_do_not_contribute():
    torch.manual_seed(2)
    pred, target = torch.rand(2, J, 8, 6), torch.rand(2, J, 8, 6)
    weight = torch.ones(2, J)
    weight[0, 3] = 0
    weight[1, 7] = 0
    changed = pred.clone()
    changed[0, 3] += 5.0
    changed[1, 7] -= 3.0
    assert joints_mse(changed, target, weight).item() == pytest.approx(joints_mse(pred, target, weight).item(), rel=1e-7)
    assert kl_distill(changed, target, weight).item() == pytest.approx(kl_distill(pred, target, weight).item(), rel=1e-6)
    # a zero-weight joint compares two uniform distributions: KL 0, still counted in the mean
    all_masked = torch.zeros(2, J)
    assert kl_distill(pred, target, all_masked).item() == pytest.approx(0.0, abs=1e-7)
    # without the mask the changes do count
    assert joints_mse(changed, target).item() > joints_mse(pred, target).item()


@pytest.mark.parametrize("detach", [False, True])
def test_kl_gradient_reaches_teacher_only_when_not_detached(detach):
    torch.manual_seed(3)
    student = torch.randn(2, J, 8, 6, requires_grad=True)
    teacher = torch.randn(2, J, 8, 6, requires_grad=True)
    kl_distill(student, teacher, detach_teacher=detach).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    if detach:
        assert teacher.grad is None
    else:
        assert teacher.grad is not None and teacher.grad.abs().sum() > 0


def test_batch_size_one_matches_per_sample_values():
    torch.manual_seed(4)
    pred, target = torch.rand(3, J, 8, 6), torch.rand(3, J, 8, 6)
    weight = torch.rand(3, J)
    for fn in (lambda a, b, w: joints_mse(a, b, w), lambda a, b, w: kl_distill(a, b, w)):
        singles = [fn(pred[i:i + 1], target[i:i + 1], weight[i:i + 1]) for i in range(3)]
        assert all(s.dim() == 0 and torch.isfinite(s) for s in singles)
        assert torch.stack(singles).mean().item() == pytest.approx(fn(pred, target, weight).item(), rel=1e-5)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="same shape"):
        joints_mse(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5))
    with pytest.raises(ValueError, match="B\\*J"):
        kl_distill(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.ones(2, 4))


# ------------------------------------------------------------------ the OKD objective

def _outputs(n=4, b=2, seed=5, grad=True):
    g = torch.Generator().manual_seed(seed)
    outs = [torch.rand(b, J, 8, 6, generator=g).requires_grad_(grad) for _ in range(n)]
    target = torch.rand(b, J, 8, 6, generator=g)
    weight = (torch.rand(b, J, generator=g) > 0.2).float()
    return outs, target, weight


def _expected(outs, target, weight, stages, couples, use_mse, use_kld, kw, tw, utw=False, cons=1.0):
    idx = {s: i for i, s in enumerate(stages)}
    mw = weight if utw else None
    total = tw * joints_mse(outs[-1], target, mw)
    if use_mse:
        for s in sorted({s for s, _ in couples}):
            total = total + joints_mse(outs[idx[s]], target, mw)
    if use_kld:
        total = total + cons * kw * sum(kl_distill(outs[idx[s]], outs[idx[t]], weight) for s, t in couples)
    return total


@pytest.mark.parametrize("couples", [((3, 4),), ((2, 4), (3, 4)), ((2, 3), (3, 4))])
@pytest.mark.parametrize("use_mse", [True, False])
def test_okd_total_composition(couples, use_mse):
    outs, target, weight = _outputs()
    stages = (1, 2, 3, 4)
    loss = OKDLoss(LossParams(kld_couples=couples, use_mse=use_mse, use_kld=True, kld_weight=7.8125,
                              teacher_weight=2.0), stages)
    total, terms = loss(outs, target, weight, consistency=0.5)
    expected = _expected(outs, target, weight, stages, couples, use_mse, True, 7.8125, 2.0, cons=0.5)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)

    students = sorted({s for s, _ in couples}) if use_mse else []
    assert set(terms) == ({"mse_teacher", "total", "kl_weight"} | {f"mse_stage{s}" for s in students}
                          | {f"kl_{s}_{t}" for s, t in couples})
    assert terms["kl_weight"].item() == pytest.approx(0.5 * 7.8125)
    recomposed = 2.0 * terms["mse_teacher"] + sum(terms[f"mse_stage{s}"] for s in students) \
        + terms["kl_weight"] * sum(terms[f"kl_{s}_{t}"] for s, t in couples)
    assert recomposed.item() == pytest.approx(total.item(), rel=1e-6)
    assert total.requires_grad and not any(v.requires_grad for v in terms.values())

    # only the teacher and the stages in couples get a gradient (stage 1 is in none)
    total.backward()
    in_couple = {s for c in couples for s in c} | {4}
    assert [o.grad is not None for o in outs] == [s in in_couple for s in stages]


def test_okd_target_weight():
    outs, target, weight = _outputs()
    loss = OKDLoss(LossParams(kld_couples=((2, 4), (3, 4)), use_mse=True, use_kld=True, kld_weight=1.5,
                              teacher_weight=1.0, use_target_weight=True), (1, 2, 3, 4))
    total, _ = loss(outs, target, weight)
    expected = _expected(outs, target, weight, (1, 2, 3, 4), ((2, 4), (3, 4)), True, True, 1.5, 1.0, utw=True)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_okd_mse_only_without_kld_supervises_couple_students():
    outs, target, weight = _outputs()
    total, terms = OKDLoss(LossParams(kld_couples=((3, 4),), use_mse=True, use_kld=False), (1, 2, 3, 4))(outs, target, weight)
    assert set(terms) == {"mse_teacher", "mse_stage3", "total"}
    assert total.item() == pytest.approx((joints_mse(outs[3], target) + joints_mse(outs[2], target)).item(), rel=1e-6)


def test_okd_single_output_and_truncated_model():
    outs, target, weight = _outputs(n=1)
    # multi: false -> only the last stage; the couples in params are unused without KD
    total, terms = OKDLoss(LossParams(kld_couples=((3, 4),), use_mse=True, use_kld=False, teacher_weight=3.0),
                           (4,))(outs, target, weight)
    assert set(terms) == {"mse_teacher", "total"}
    assert total.item() == pytest.approx(3.0 * joints_mse(outs[0], target).item(), rel=1e-6)

    outs, target, weight = _outputs(n=3)
    total, terms = OKDLoss(LossParams(kld_couples=((2, 3),)), (1, 2, 3))(outs, target, weight)
    expected = _expected(outs, target, weight, (1, 2, 3), ((2, 3),), True, True, 1.0, 1.0)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert {"mse_stage2", "kl_2_3"} <= set(terms)


def test_okd_detach_teacher_leaves_teacher_gradient_to_its_mse():
    outs, target, weight = _outputs()
    total, _ = OKDLoss(LossParams(kld_couples=((3, 4),), detach_teacher=True), (1, 2, 3, 4))(outs, target, weight)
    total.backward()
    ref = outs[3].detach().clone().requires_grad_(True)
    joints_mse(ref, target).backward()
    assert torch.allclose(outs[3].grad, ref.grad)

    outs, target, weight = _outputs()
    total, _ = OKDLoss(LossParams(kld_couples=((3, 4),), detach_teacher=False), (1, 2, 3, 4))(outs, target, weight)
    total.backward()
    assert not torch.allclose(outs[3].grad, ref.grad)


def test_okd_from_params_and_bad_configs():
    p = Params().validate()
    loss = OKDLoss(p.loss, p.output_stages())
    assert loss.output_stages == (1, 2, 3, 4) and loss.params.kld_couples == ((1, 4), (2, 4), (3, 4))
    assert loss.student_stages == (1, 2, 3) and loss.trained_stages == (1, 2, 3, 4)
    p2 = params_from_dict({"model": {"multi": False}, "loss": {"use_kld": False}})
    loss2 = OKDLoss(p2.loss, p2.output_stages())
    assert loss2.output_stages == (4,) and loss2.student_stages == () and loss2.trained_stages == (4,)
    p3 = params_from_dict({"loss": {"kld_couples": [[3, 4]]}})         # stages 1 and 2 get no loss
    assert OKDLoss(p3.loss, p3.output_stages()).trained_stages == (3, 4)

    with pytest.raises(ValueError, match="model outputs"):
        OKDLoss(LossParams(kld_couples=((3, 4),)), (1, 2, 3))
    with pytest.raises(ValueError, match="after the student"):
        OKDLoss(LossParams(kld_couples=((4, 3),)), (1, 2, 3, 4))
    with pytest.raises(ValueError, match="multi-output"):
        OKDLoss(LossParams(kld_couples=((3, 4),), use_kld=True), (4,))
    with pytest.raises(ParamsError, match="loss.temperature must be > 0"):
        OKDLoss(LossParams(kld_couples=((3, 4),), temperature=0.0), (1, 2, 3, 4))
    outs, target, _ = _outputs(n=3)
    with pytest.raises(ValueError, match="3 outputs"):
        OKDLoss(LossParams(kld_couples=((3, 4),)), (1, 2, 3, 4))(outs, target)


def test_consistency_ramp_up_matches_original_formula():
    assert consistency_weight(0, 0) == 1.0
    assert consistency_weight(7, 0.0) == 1.0
    assert consistency_weight(0, 5) == pytest.approx(math.exp(-5.0))
    assert consistency_weight(2.5, 5) == pytest.approx(math.exp(-1.25))
    assert consistency_weight(5, 5) == 1.0
    assert consistency_weight(50, 5) == 1.0
    assert consistency_weight(-1, 5) == pytest.approx(math.exp(-5.0))
    assert OKDLoss(LossParams(kld_couples=((1, 2),), rampup_epochs=4), (1, 2)).consistency(2) == pytest.approx(math.exp(-1.25))
