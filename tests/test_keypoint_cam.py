import numpy as np
import pytest
import torch
from pytorch_grad_cam import EigenCAM
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange

from okdpose.keypoint_cam import (METHODS, KeypointTarget, PoseTarget, StageHeatmaps, confidence_change,
                                  explain_methods, gt_peaks, image_targets, joint_cams, predicted_peaks, road_scores)
from okdpose.model import MultiOutHRNet
from okdpose.params import CAM_METHODS

H, W, J = 64, 48, 5


@pytest.fixture(scope="module")
def model() -> MultiOutHRNet:
    """A tiny 2-stage model with weights and BN statistics that give non-trivial maps."""
    torch.manual_seed(0)
    m = MultiOutHRNet(num_joints=J, width=4, n_stage=2)
    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight)
        elif isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None
    with torch.no_grad():
        m.train()(torch.randn(8, 3, H, W, generator=torch.Generator().manual_seed(2)))
    return m.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))


def hooks_left(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_the_wrapper_gives_stage_k_heatmaps_and_repeats_features(model, images):
    with torch.no_grad():
        full = model(images)
        for k in (1, 2):
            net = StageHeatmaps(model, k)
            torch.testing.assert_close(net(images), full[k - 1], rtol=0, atol=0)
            net.copies = 3
            torch.testing.assert_close(net(images), full[k - 1].repeat_interleave(3, 0), rtol=0, atol=0)
    assert StageHeatmaps(model, 2).layer_name("feature_taps.1") == "tap"
    with pytest.raises(ValueError, match="stage 3 is not an output"):
        StageHeatmaps(model, 3)
    with pytest.raises(TypeError, match="MultiOutHRNet"):
        StageHeatmaps(torch.nn.Conv2d(3, 3, 1), 1)


def test_targets_and_peaks():
    out = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)       # (J, h, w)
    assert KeypointTarget(1, x=2, y=1)(out).item() == out[1, 1, 2].item()
    peaks = np.array([[3, 0], [1, 2]])
    assert PoseTarget(peaks)(out).item() == out[0, 0, 3].item() + out[1, 2, 1].item()
    hm = np.zeros((1, 2, 3, 4), np.float32)
    hm[0, 0, 2, 1] = hm[0, 1, 0, 3] = 1
    np.testing.assert_array_equal(predicted_peaks(hm), [[[1, 2], [3, 0]]])
    gt = np.array([[[5.0, 9.4, 2], [1.0, 1.0, 0]]])                         # stride 4: (1, 2); unlabelled
    np.testing.assert_array_equal(gt_peaks(gt, 4, (4, 3), predicted_peaks(hm)), [[[1, 2], [3, 0]]])
    np.testing.assert_array_equal(gt_peaks(gt - [[[4, 4, 0]]], 4, (4, 3), predicted_peaks(hm))[0, 0], [0, 1])
    ts = image_targets(peaks, joints=[1])
    assert len(ts) == 2 and isinstance(ts[0], KeypointTarget) and isinstance(ts[1], PoseTarget)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_equals_a_plain_stock_call(model, images, method):
    net = StageHeatmaps(model, 2)
    with torch.no_grad():
        peaks = predicted_peaks(net(images).numpy())
    joints = [0, 3]
    ours = joint_cams(net, method, "feature_taps.1", images, peaks, joints=joints, batch_size=4, sign="stock")
    assert ours.shape == (2, 3, H, W) and ours.dtype == np.float32
    if method == "eigencam":                 # no target: one map per image, from one batch (as ours)
        with EigenCAM(net, [net.tap]) as cam:
            stock = cam(images, targets=None)
        for t in range(3):
            np.testing.assert_allclose(ours[:, t], stock, rtol=0, atol=1e-6)
    else:
        for b in range(2):                   # batch_size 4 // 3 targets: one image per trunk forward
            for t, target in enumerate(image_targets(peaks[b], joints)):
                # the plain way: one CAM object per layer and target, one image
                with METHODS[method](net, [net.tap]) as cam:
                    stock = cam(images[b:b + 1], targets=[target])[0]
                np.testing.assert_allclose(ours[b, t], stock, rtol=0, atol=1e-6, err_msg=f"{method} image {b} target {t}")
        assert not np.allclose(ours[:, 0], ours[:, 1], atol=1e-3)   # joints 0 and 3 differ


def test_oriented_eigencam_on_the_wrapper_and_gradient_methods_on_the_tap_only(model, images):
    net = StageHeatmaps(model, 2)
    peaks = np.zeros((2, J, 2), np.int64)
    oriented = joint_cams(net, "eigencam", "feature_taps.1", images, peaks)
    with EigenCAM(net, [net.tap]) as cam:
        stock = cam(images, targets=None)
    for o, s in zip(oriented[:, 0], stock):       # either stock's map or its flip's
        assert np.abs(o - s).max() < 1e-6 or np.corrcoef(o.ravel(), s.ravel())[0, 1] < 0.5
    with pytest.raises(ValueError, match="feature layer"):
        joint_cams(net, "gradcam", "stage2.0.branches.0", images, peaks)
    with pytest.raises(ValueError, match="unknown CAM method 'fullgrad'"):
        joint_cams(net, "fullgrad", "feature_taps.1", images, peaks)


def test_method_names_match_the_params():
    assert tuple(METHODS) == CAM_METHODS


def test_confidence_change_is_grad_cams_relative_to_the_score(model, images):
    net = StageHeatmaps(model, 2)
    with torch.no_grad():
        out = net(images)
    peaks = predicted_peaks(out.numpy())
    targets = [PoseTarget(p) for p in peaks]
    ones, half = np.ones((2, H, W), np.float32), np.full((2, H, W), 0.5, np.float32)
    np.testing.assert_allclose(confidence_change(net, images, ones, targets), 0, atol=1e-6)
    base = np.array([t(o).item() for t, o in zip(targets, out)])
    stock = CamMultImageConfidenceChange()(images, half, targets, net)
    np.testing.assert_allclose(confidence_change(net, images, half, targets), stock / np.abs(base), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(confidence_change(net, images, half, targets, base=base),
                                  confidence_change(net, images, half, targets))


def test_road_scores_are_seeded_and_signed(model, images):
    net = StageHeatmaps(model, 2)
    with torch.no_grad():
        peaks = predicted_peaks(net(images).numpy())
    targets = [PoseTarget(p) for p in peaks]
    cams = joint_cams(net, "gradcam", "feature_taps.1", images, peaks)[:, -1]
    a, b = road_scores(net, images, cams, targets), road_scores(net, images, cams, targets)
    assert set(a) == {"morf", "lerf", "road", "score"} and a["road"].shape == (2,)
    np.testing.assert_array_equal(a["road"], b["road"])
    np.testing.assert_allclose(a["road"], (a["lerf"] - a["morf"]) / 2, rtol=1e-6)


def test_explain_methods_per_stage_and_method(model, images):
    with torch.no_grad():
        heatmaps = {k: h.numpy() for k, h in zip(model.output_stages, model(images))}
    gt = np.zeros((2, J, 3), np.float32)
    out = explain_methods(model, images, heatmaps, gt, 4, ["eigencam", "gradcam"], target_peak="gt")
    assert list(out) == [1, 2] and list(out[1]) == ["eigencam", "gradcam"]
    e, g = out[2]["eigencam"], out[2]["gradcam"]
    assert e.joints is None and e.pose.shape == (2, H, W) and set(e.faith) == {"confidence_change"}
    assert g.joints.shape == (2, J, H, W) and g.faith["joint_confidence_change"].shape == (2, J)
    assert np.all(g.faith["confidence_change"] <= 1e-6 + 10)
    assert hooks_left(model) == 0 and all(p.grad is None for p in model.parameters())


def test_bf16_runs_the_trunk_in_bf16_and_the_tap_head_and_maps_in_float32(model, images):
    with torch.no_grad():
        heatmaps = {k: h.numpy() for k, h in zip(model.output_stages, model(images))}
    seen: dict[str, list] = {"trunk": [], "head": []}
    real_init = StageHeatmaps.__init__

    def spying_init(self, *a, **k):
        real_init(self, *a, **k)
        self.trunk.conv1.register_forward_hook(lambda m, i, o: seen["trunk"].append(o.dtype))
        self.head.register_forward_hook(lambda m, i, o: seen["head"].append(o.dtype))

    gt = np.zeros((2, J, 3), np.float32)
    mp = pytest.MonkeyPatch()
    mp.setattr(StageHeatmaps, "__init__", spying_init)
    try:
        out = explain_methods(model, images, heatmaps, gt, 4, ["eigencam", "gradcam"], autocast=torch.bfloat16)
    finally:
        mp.undo()
    assert set(seen["trunk"]) == {torch.bfloat16} and set(seen["head"]) == {torch.float32}
    g = out[2]["gradcam"]
    assert g.joints.dtype == np.float32 and np.isfinite(g.joints).all() and 0 <= g.joints.min() <= g.joints.max() <= 1
    assert np.isfinite(g.faith["joint_confidence_change"]).all()
    assert hooks_left(model) == 0 and all(p.grad is None for p in model.parameters())
