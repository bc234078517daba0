import cv2
import numpy as np
import pytest
import torch
from pytorch_grad_cam import EigenCAM
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

from okdpose.explain import LayerError, cam_targets, economy_2d_projection, eigencam, eigencam_with_outputs, oriented_sign
from okdpose.model import MultiOutHRNet
from okdpose.viz import cam_overlay, tile_table, write_png_palette

H, W = 64, 32      # input (h, w)
LOW_RES = "stage2.0.branches.1"     # the lowest-resolution branch of the 2-stage test model


@pytest.fixture(scope="module")
def model() -> MultiOutHRNet:
    """A tiny 2-stage model (few modules: fast forwards) with weights and BN statistics that give
    non-trivial maps."""
    torch.manual_seed(0)
    m = MultiOutHRNet(num_joints=12, width=4, n_stage=2)
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight)
    for bn in bns:                                 # BN statistics of random inputs: well-scaled features
        bn.momentum = None
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
    with torch.no_grad():
        m.train()(torch.randn(8, 3, H, W, generator=torch.Generator().manual_seed(2)))
    for bn in bns:
        bn.momentum = 0.1
    return m.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, H, W, generator=torch.Generator().manual_seed(1))


def hooks_left(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def snapshot(model: torch.nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])


def assert_unchanged(model: torch.nn.Module, snap) -> None:
    state, modes = snap
    assert hooks_left(model) == 0
    assert [m.training for m in model.modules()] == modes
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


# --------------------------------------------------------------------------- maps

def test_a_map_per_layer_in_range_from_one_forward_per_batch(model, images):
    layers = model.feature_layer_names() + model.head_layer_names() + [LOW_RES]
    calls = []
    handle = model.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    try:
        maps, outputs = eigencam_with_outputs(model, images, layers, batch_size=2)
    finally:
        handle.remove()
    assert calls == [2, 1]                          # one forward per batch for all 5 layers
    assert list(maps) == layers
    for name, m in maps.items():
        assert m.shape == (3, H, W) and m.dtype == np.float32, name
        assert m.min() >= 0 and m.max() <= 1 and m.max() > 0.9, name
    assert [o.shape for o in outputs] == [(3, 12, H // 4, W // 4)] * 2
    with torch.no_grad():
        expected = model(images)[-1].numpy()
    # batches of 2 + 1 vs 3: convolution rounding may differ slightly
    np.testing.assert_allclose(outputs[-1], expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_maps_equal_stock_eigencam_for_features_heads_and_a_branch(model, images):
    # listed out of execution order on purpose: stock matches activations to layers by hook order
    layers = ["intermediate_layers.1", "feature_taps.1", "feature_taps.0", LOW_RES]
    ours = eigencam(model, images, layers, sign="stock")
    for layer in layers[:2] + layers[3:]:
        with EigenCAM(model, [model.get_submodule(layer)]) as cam:
            stock = cam(images, targets=[])        # targets=[]: grad-cam 1.5.7 needs them with a list output
        np.testing.assert_allclose(ours[layer], stock, rtol=0, atol=1e-6, err_msg=layer)


@pytest.mark.parametrize("shape", [(2, 8, 32, 24), (2, 12, 16, 12), (1, 64, 2, 3), (2, 40, 5, 8)])
def test_economy_projection_equals_stock_sign_included(shape):
    rng = np.random.default_rng(sum(shape))
    a = np.maximum(rng.standard_normal(shape), 0).astype(np.float32) * rng.random((1, shape[1], 1, 1), np.float32)
    a[0, 0, 0, 0] = np.nan                         # stock zeroes NaNs
    stock, ours = get_2d_projection(a), economy_2d_projection(a)
    assert ours.shape == stock.shape == (shape[0], *shape[2:]) and ours.dtype == np.float32
    scale = np.abs(stock).max()
    np.testing.assert_allclose(ours, stock, rtol=0, atol=1e-5 * scale)


# --------------------------------------------------------------------------- the sign

def blob_layer(channels: int = 6, shape=(16, 12), seed: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """(1, C, h, w) ReLU-like activations: every channel fires (positive gain) on one blob, plus
    noise, so the first component is the blob; returns them and the blob's (row, col)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    centre = (int(rng.integers(3, shape[0] - 3)), int(rng.integers(3, shape[1] - 3)))
    blob = np.exp(-((ys - centre[0]) ** 2 + (xs - centre[1]) ** 2) / 8.0)
    gains = rng.uniform(0.5, 2.0, channels)
    a = gains[:, None, None] * blob + 0.05 * rng.random((channels, *shape))
    return a[None].astype(np.float32), centre


def flipped_svd(monkeypatch):
    """Make numpy's SVD return the other, equally valid, signs (-U, S, -V^T): the component
    comes out inverted."""
    real = np.linalg.svd
    monkeypatch.setattr(np.linalg, "svd", lambda a, **kw: tuple(x * f for x, f in zip(real(a, **kw), (-1, 1, -1))))


@pytest.mark.parametrize("seed", range(3))
def test_an_inverted_component_gives_the_oriented_map(monkeypatch, seed):
    a, centre = blob_layer(seed=seed)
    right = economy_2d_projection(a, orient=True)
    assert np.unravel_index(right[0].argmax(), right[0].shape) == centre     # high where the layer fires
    flipped_svd(monkeypatch)
    stock = get_2d_projection(a)                    # grad-cam's own function, now inverted
    assert np.unravel_index(stock[0].argmin(), stock[0].shape) == centre     # the infant would be dark
    np.testing.assert_array_equal(economy_2d_projection(a, orient=True), right)
    np.testing.assert_array_equal(economy_2d_projection(a, orient=False), -right)
    # negated activations fire everywhere but the blob: the oriented map follows them
    np.testing.assert_array_equal(economy_2d_projection(-a, orient=True), -right)


def test_orientation_never_changes_a_map_stock_got_right():
    rng = np.random.default_rng(5)
    a = np.maximum(rng.standard_normal((24, 8, 10, 6)), 0).astype(np.float32)
    stock, ours = economy_2d_projection(a), economy_2d_projection(a, orient=True)
    right = []
    for s, x in zip(stock, a):
        centred = x.reshape(8, -1).T - x.reshape(8, -1).T.mean(axis=0)
        right.append(oriented_sign(s.ravel().astype(np.float64), centred) > 0)
    right = np.array(right)
    assert right.any() and not right.all()          # both cases occur in this set
    np.testing.assert_array_equal(ours[right], stock[right])          # bit for bit
    np.testing.assert_array_equal(ours[~right], -stock[~right])


def test_oriented_and_stock_maps_of_a_model_differ_only_by_the_flip(model, images):
    layers = model.feature_layer_names() + model.head_layer_names()
    stock = eigencam(model, images, layers, sign="stock")
    ours = eigencam(model, images, layers)
    with pytest.raises(ValueError, match="sign must be one of"):
        eigencam(model, images, layers, sign="up")
    for name in layers:
        for s, o in zip(stock[name], ours[name]):
            if not np.array_equal(s, o):            # flipped: then its map is the other half of the projection
                assert np.corrcoef(s.ravel(), o.ravel())[0, 1] < 0.5, name


# --------------------------------------------------------------------------- the model is left alone

def test_hooks_released_weights_and_modes_restored(model, images):
    model.train()
    model.stage2.eval()                            # a mixed state must come back as it was
    snap = snapshot(model)
    try:
        eigencam(model, images[:1], ["feature_taps.1", "intermediate_layers.0"])
        assert_unchanged(model, snap)
    finally:
        model.eval()


def test_model_restored_and_errors_propagate_when_raising_mid_forward(model, images, monkeypatch):
    model.train()
    snap = snapshot(model)
    try:
        with pytest.raises(LayerError) as err:     # stage2.0 outputs a list: raised inside the forward
            eigencam(model, images[:1], ["feature_taps.0", "stage2.0"])
        assert "'stage2.0'" in str(err.value) and "feature_taps.0" in str(err.value)
        assert_unchanged(model, snap)
        with pytest.raises(ValueError, match="divisible"):
            eigencam(model, images[:1, :, :, :30], ["intermediate_layers.1"])
        assert_unchanged(model, snap)

        def broken(x):
            raise IndexError("boom")               # stock BaseCAM.__exit__ would swallow this one
        monkeypatch.setattr(model.get_submodule("intermediate_layers.1"), "forward", broken)
        with pytest.raises(IndexError, match="boom"):
            eigencam(model, images[:1], ["feature_taps.1"])
        monkeypatch.undo()
        assert_unchanged(model, snap)
    finally:
        model.eval()


@pytest.mark.parametrize("name, words", [
    ("stage9.0", ["'stage9.0'", "not a module", "feature_taps.0", "intermediate_layers.1", LOW_RES]),
    ("", ["not a module"]),
    ("conv1.weight", ["not a module"]),
    ("stage2.0.fuse_layers", ["did not run"]),     # a ModuleList: never called
    ("stage2.0", ["outputs a list", "4-D"]),
])
def test_bad_layer_names_are_clear_errors(model, images, name, words):
    with pytest.raises(LayerError) as err:
        eigencam(model, images[:1], [name])
    for w in words:
        assert w in str(err.value)
    assert hooks_left(model) == 0


def test_cam_targets_per_stage_heads_and_extra():
    model = MultiOutHRNet(12, 2, 4)
    assert "stage4.2.branches.3" in str(pytest.raises(LayerError, cam_targets, model, extra=["x"]).value)
    keys = [t.key for t in cam_targets(model)]
    assert keys == [f"stage{s}/{k}" for s in range(1, 5) for k in ("feature", "head")]
    ts = cam_targets(model, stages=[4], heads=False, extra=["stage4.2.branches.3", "stage4.2.branches.3"])
    assert [(t.key, t.layer, t.stage) for t in ts] == [
        ("stage4/feature", "feature_taps.3", 4), ("extra/stage4.2.branches.3", "stage4.2.branches.3", None)]
    assert [t.layer for t in cam_targets(model, stages=[2])] == ["feature_taps.1", "intermediate_layers.1"]
    with pytest.raises(LayerError, match=r"explain.stages \[5\]"):
        cam_targets(model, stages=[5])
    with pytest.raises(LayerError, match="stage4.2.branchez"):
        cam_targets(model, extra=["stage4.2.branchez.3"])
    single = MultiOutHRNet(12, 4, 3, multi=False)
    assert [t.layer for t in cam_targets(single)] == ["feature_taps.2", "intermediate_layers.2"]
    with pytest.raises(LayerError, match=r"outputs are stages \[3\]"):
        cam_targets(single, stages=[1])


# --------------------------------------------------------------------------- pictures

def test_overlay_grid_and_palette_png(tmp_path):
    img = np.full((64, 48, 3), 128, np.uint8)
    cam = np.zeros((16, 12), np.float32)
    cam[:, 6:] = 1.0
    over = cam_overlay(img, cam, label="S1 feature")
    assert over.shape == (64, 48, 3) and over.dtype == np.uint8
    assert over[40, 45, 2] > over[40, 45, 0] and over[40, 2, 0] > over[40, 2, 2]   # red high, blue low (BGR)
    grid = tile_table([[img, None, img], [None, over]], pad=2)
    assert grid.shape == (2 * 64 + 3 * 2, 3 * 48 + 4 * 2, 3)
    write_png_palette(tmp_path / "x.png", grid)
    back = cv2.imread(str(tmp_path / "x.png"))
    assert back.shape == grid.shape and np.abs(back.astype(int) - grid).mean() < 3


def test_projection_runs_blas_on_one_thread_and_scans_libraries_once(monkeypatch):
    from threadpoolctl import threadpool_info

    import okdpose.explain as explain

    seen = []
    real_svd = np.linalg.svd

    def svd(a, *args, **kwargs):
        seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
        return real_svd(a, *args, **kwargs)

    monkeypatch.setattr(np.linalg, "svd", svd)
    before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    acts = np.random.default_rng(0).standard_normal((2, 4, 6, 5)).astype(np.float32)
    economy_2d_projection(acts)
    controller = explain._BLAS
    economy_2d_projection(acts)
    assert controller is not None and explain._BLAS is controller     # one scan per process
    assert seen and all(n == 1 for threads in seen for n in threads)
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == before


# --------------------------------------------------------------------------- cost and precision

def test_an_eval_model_is_not_walked_again_and_a_training_one_is(model, images, monkeypatch):
    from okdpose.explain import LayerEigenCAM, resolve_layers

    walked, real_train = [], torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: walked.append(self) or real_train(self, mode))
    layers = resolve_layers(model, ["feature_taps.1"])
    model.eval()
    walked.clear()
    with LayerEigenCAM(model, layers) as cam:          # already eval: model.eval() is a no-op, not a walk
        assert walked == [] and cam(images[:1])["feature_taps.1"].shape == (1, H, W)
    assert "eval" not in vars(model) and not model.training
    model.train()
    walked.clear()
    try:
        with LayerEigenCAM(model, layers):             # training: grad-cam's model.eval() walks every module
            assert len(walked) == len(list(model.modules())) and not model.training
        assert model.training and "eval" not in vars(model)
    finally:
        model.eval()


def test_bf16_autocast_runs_the_forward_in_bf16_and_the_maps_in_float32(model, images):
    from okdpose.explain import CamTarget, ExplainSamples, precision_shift

    seen = []
    handle = model.get_submodule("conv1").register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        layers = ["feature_taps.1", model.head_layer_names()[-1]]
        maps, outs = eigencam_with_outputs(model, images, layers, autocast=torch.bfloat16)
        ref, ref_outs = eigencam_with_outputs(model, images, layers)
    finally:
        handle.remove()
    assert seen == [torch.bfloat16, torch.float32]
    for name in layers:
        assert maps[name].dtype == np.float32 and np.isfinite(maps[name]).all()
        assert 0 <= maps[name].min() and maps[name].max() <= 1 and maps[name].shape == ref[name].shape
    for o, r in zip(outs, ref_outs):   # bf16 keeps 8 significant bits: heatmaps move, by a few % of their scale
        assert o.dtype == np.float32 and 0 < np.abs(o - r).max() < 0.1 * np.abs(r).max()
    assert hooks_left(model) == 0

    class Codec:                       # decode_crop as HeatmapCodec's: argmax in heatmap px x stride 4
        def decode_crop(self, hm):
            b, j, h, w = hm.shape
            flat = hm.reshape(b, j, -1).argmax(-1)
            return np.stack([flat % w, flat // w], -1).astype(np.float32) * 4, hm.reshape(b, j, -1).max(-1)

    targets = [CamTarget("stage2/feature", "feature_taps.1", 2, "feature"), CamTarget("stage2/head", layers[1], 2, "head")]
    preds = {}
    for stage, hm in zip(model.output_stages, outs):
        xy, v = Codec().decode_crop(hm)
        preds[stage] = np.concatenate([xy, v[..., None]], -1)
    s = ExplainSamples(names=[], crops=np.zeros(0), boxes=np.zeros(0), joints=np.zeros(0), radius=np.zeros(0),
                       preds=preds, cams={"stage2/feature": maps["feature_taps.1"], "stage2/head": maps[layers[1]]},
                       inputs=images)
    shift = precision_shift(model, s, targets, Codec())
    assert set(shift["maps"]) == {"stage2/feature", "stage2/head"} and set(shift["keypoints_px"]) == {"stage1", "stage2"}
    for key, d in shift["maps"].items():
        layer = {"stage2/feature": "feature_taps.1", "stage2/head": layers[1]}[key]
        assert d["max_abs"] == pytest.approx(float(np.abs(s.cams[key] - ref[layer]).max()), abs=1e-6)
        assert 0 <= d["mean_abs"] <= d["max_abs"] <= 1
    assert all(0 <= v["mean"] <= v["max"] for v in shift["keypoints_px"].values())
