"""Released checkpoints define the model alone: `infer_architecture` / `load_released`.

The reference is tests/original_hrnet.py, the original OKD-HRNet model rebuilt from its code
(independent of okdpose.model), with random weights and random BN running statistics, saved in
each format its tools (and the official HRNet's) write. Our per-stage outputs must equal the
original forward's. Measured on a 2-core AVX2 CPU, float32: max abs difference 0.0 for every
stage and format (same convolutions in the same order; also W32 at 256x192); the bound asserted,
1e-6 of the output scale, leaves room for other CPUs' kernels.
"""
from __future__ import annotations

import functools

import pytest
import torch

from okdpose.model import MultiOutHRNet, save_checkpoint
from okdpose.model.checkpoint import CheckpointError
from okdpose.model.released import infer_architecture, load_released
from original_hrnet import MultiOutPoseHrnet, PoseHighResolutionNet, randomize

J, WIDTH = 5, 4
X = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(1))   # divisible by 32 for stage 4


def original(n_stage: int, seed: int = 0) -> MultiOutPoseHrnet:
    """Random weights and BN statistics, except the head the forward never runs: it keeps the
    original's init_weights values (N(0, 0.001), bias 0), as in every file its training writes."""
    model = randomize(MultiOutPoseHrnet(J, WIDTH, n_stage), seed=seed).eval()
    return at_init(model, [3] if n_stage == 4 else [], final=n_stage < 4)


def at_init(model: MultiOutPoseHrnet, heads: list[int], final: bool = False) -> MultiOutPoseHrnet:
    """Heads as the original's init_weights leaves them: never in its loss, never trained."""
    with torch.no_grad():
        for head in [model.intermediate_layers[k] for k in heads] + [model.final_layer] * final:
            head.weight.normal_(0, 0.001)
            head.bias.zero_()
    return model


def assert_same_outputs(ours: list[torch.Tensor], ref: list[torch.Tensor], case: str) -> None:
    assert len(ours) == len(ref), case
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, ref))
    scale = max(float(b.abs().max()) for b in ref)
    assert scale > 0.05 and diff <= 1e-6 * scale, (case, diff, scale)


@functools.lru_cache(maxsize=None)
def optimizer_state() -> dict:
    """An Adam state after one step (tensors, numbers, tuples), as the original's checkpoint.pth holds it."""
    model = MultiOutPoseHrnet(J, WIDTH, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sum(o.sum() for o in model(X[:1])).backward()
    opt.step()
    return opt.state_dict()


def write(fmt: str, model: MultiOutPoseHrnet, path) -> None:
    """Save `model` as the original tools (or DataParallel users) did."""
    sd = model.state_dict()
    module = {f"module.{k}": v for k, v in sd.items()}
    if fmt == "bare":                       # final_state.pth, model_best_epoch{N}.pth
        torch.save(sd, path)
    elif fmt == "module":                   # torch.save(DataParallel(model).state_dict())
        torch.save(module, path)
    elif fmt == "checkpoint":               # tools/train.py's checkpoint.pth
        torch.save({"epoch": 12, "model": "multi_out_pose_hrnet", "state_dict": module, "best_state_dict": sd,
                    "perf": 0.71, "optimizer": optimizer_state()}, path)
    elif fmt == "no_extra_head":            # without the head the forward never runs
        extra = "intermediate_layers.3." if model.n_stage == 4 else "final_layer."
        torch.save({k: v for k, v in sd.items() if not k.startswith(extra)}, path)
    else:
        raise ValueError(fmt)



def test_the_reference_has_the_original_key_names():
    # built independently of okdpose.model: the same names, plus the head the original never runs
    ref = set(MultiOutPoseHrnet(J, WIDTH, 4).state_dict())
    assert ref - set(MultiOutHRNet(J, WIDTH, 4).state_dict()) == {"intermediate_layers.3.weight",
                                                                  "intermediate_layers.3.bias"}
    official = set(PoseHighResolutionNet(J, WIDTH).state_dict())
    assert official == set(MultiOutHRNet(J, WIDTH, 4, multi=False).state_dict())
    assert {"layer1.0.downsample.1.running_var", "transition1.1.0.0.weight", "transition3.3.0.1.num_batches_tracked",
            "stage4.2.fuse_layers.0.3.1.weight", "stage3.3.fuse_layers.2.0.1.0.weight"} <= ref


@pytest.mark.parametrize("fmt", ["bare", "module", "checkpoint", "no_extra_head"])
@pytest.mark.parametrize("n_stage", [2, 3, 4])
def test_released_okd_hrnet_files_give_the_original_outputs(tmp_path, n_stage, fmt):
    ref = original(n_stage, seed=n_stage)
    path = tmp_path / f"{n_stage}_stage.pth"
    write(fmt, ref, path)
    model, arch, report = load_released(path)
    assert arch.config() == {"num_joints": J, "width": WIDTH, "n_stage": n_stage, "multi": True}
    # without intermediate_layers.3 an original 4-stage file has the keys of a 4-stage MultiOutHRNet
    assert arch.layout == ("multi-out" if (n_stage, fmt) == (4, "no_extra_head") else "okd-hrnet")
    assert not arch.untrained_heads
    assert any(n.startswith(f"width {WIDTH} from conv transition1.0.0.weight (4, 256, 3, 3)") for n in arch.notes)
    if arch.layout == "okd-hrnet":
        assert any(n.startswith(f"n_stage {n_stage}: {n_stage} heads intermediate_layers.0..{n_stage - 1}")
                   for n in arch.notes)
    assert ("`module.` prefix (DataParallel) removed from every key" in arch.notes) == (fmt in ("module", "checkpoint"))
    if fmt == "checkpoint":
        assert any("best_state_dict (the original's best epoch) is not loaded" in n for n in arch.notes)
    extra = "intermediate_layers.3" if n_stage == 4 else "final_layer"
    assert (extra in arch.unused) == (fmt != "no_extra_head")
    assert (f"unused {extra} skipped" in arch.notes) == (fmt != "no_extra_head")
    if n_stage < 4:     # the original builds the whole trunk: the stages after n_stage are skipped
        assert f"stage{n_stage + 1}.*" in arch.unused and "stage4.*" in arch.unused
    assert not report.missing and not report.unused
    assert not model.training and model.head_layer_names()[-1] == ("final_layer" if n_stage == 4 else
                                                                    f"intermediate_layers.{n_stage - 1}")
    with torch.no_grad():
        assert_same_outputs(model(X), ref(X), f"okd-hrnet n_stage {n_stage} {fmt}")


def test_official_single_output_file(tmp_path):
    ref = randomize(PoseHighResolutionNet(17, WIDTH), seed=7).eval()      # pose_hrnet_w32_256x192.pth's layout
    torch.save(ref.state_dict(), tmp_path / "pose_hrnet_w4.pth")
    model, arch, report = load_released(tmp_path / "pose_hrnet_w4.pth")
    assert arch.config() == {"num_joints": 17, "width": WIDTH, "n_stage": 4, "multi": False}
    assert arch.layout == "official" and arch.unused == [] and report.counts()["skipped"] == 0
    assert "n_stage 4, multi False: final_layer is the only head (official pose_hrnet)" in arch.notes
    with torch.no_grad():
        assert_same_outputs(model(X), [ref(X)], "official")


def test_heads_at_init_mean_multi_false(tmp_path):
    ref = at_init(original(3), [0, 1])          # MODEL.MULTI false: only the last head was trained
    torch.save(ref.state_dict(), tmp_path / "m.pth")
    model, arch, _ = load_released(tmp_path / "m.pth")
    assert (arch.n_stage, arch.multi, arch.untrained_heads) == (3, False, [])
    assert any("multi False: heads intermediate_layers.0, intermediate_layers.1 are at init" in n for n in arch.notes)
    assert {"intermediate_layers.0", "intermediate_layers.1", "final_layer"} <= set(arch.unused)
    with torch.no_grad():
        assert_same_outputs(model(X), ref(X)[-1:], "multi False")
    model, arch, _ = load_released(tmp_path / "m.pth", expect={"multi": True})     # params may still ask for all
    assert arch.multi and arch.untrained_heads == ["intermediate_layers.0", "intermediate_layers.1"]
    assert any("never trained" in n for n in arch.notes)


def test_students_outside_the_kl_couples_are_flagged_untrained(tmp_path):
    ref = at_init(original(4), [0, 1])          # KLD_COUPLES [[3, 4]] without MSE: heads 1, 2 get no loss
    torch.save(ref.state_dict(), tmp_path / "dist34.pth")
    model, arch, _ = load_released(tmp_path / "dist34.pth")
    assert arch.multi and arch.untrained_heads == ["intermediate_layers.0", "intermediate_layers.1"]
    with torch.no_grad():
        assert_same_outputs(model(X), ref(X), "dist34")


def test_an_untrained_final_layer_or_stage_4_settles_the_stage_count(tmp_path):
    # the keys of an original 3-stage file (heads .0-.2, final_layer, whole trunk) also fit a 4-stage model
    ref = original(3)                            # final_layer at init: COCO-initialised training
    torch.save(ref.state_dict(), tmp_path / "3_stage.pth")
    _, arch, _ = load_released(tmp_path / "3_stage.pth")
    assert (arch.n_stage, arch.multi, arch.layout) == (3, True, "okd-hrnet")
    assert "not n_stage 4: its last head final_layer holds init values (bias exactly 0)" in arch.notes
    assert "the keys also fit n_stage 3 multi False: expect (params' model.n_stage / model.multi) picks among them" \
        in arch.notes
    with pytest.raises(CheckpointError, match=r"n_stage 3 in the file, 4 in params \(model.n_stage\)"):
        load_released(tmp_path / "3_stage.pth", expect={"n_stage": 4})
    scratch = randomize(MultiOutPoseHrnet(J, WIDTH, 3)).eval()  # INIT_WEIGHTS false: final_layer at torch's init
    with torch.no_grad():
        for name, buf in scratch.named_buffers():
            if name.startswith("stage4.") and name.endswith("num_batches_tracked"):
                buf.zero_()                      # stage 4 never ran in training
    torch.save(scratch.state_dict(), tmp_path / "scratch.pth")
    _, arch, _ = load_released(tmp_path / "scratch.pth")
    assert arch.n_stage == 3
    assert "not n_stage 4: stage4 never ran in training (its BatchNorm num_batches_tracked are all 0)" in arch.notes


def test_a_trained_final_layer_after_a_run_stage_4_means_4_stages(tmp_path):
    ours = randomize(MultiOutHRNet(J, WIDTH, 4, multi=True)).eval()
    torch.save(ours.state_dict(), tmp_path / "ours.pth")
    model, arch, _ = load_released(tmp_path / "ours.pth")
    assert (arch.n_stage, arch.multi, arch.layout, arch.unused) == (4, True, "multi-out", [])
    assert any(n.startswith("the keys also fit n_stage 4 multi False, n_stage 3 multi True") for n in arch.notes)
    with torch.no_grad():
        assert_same_outputs(model(X), ours(X), "ours 4-stage bare")
    model, arch, _ = load_released(tmp_path / "ours.pth", expect={"n_stage": 3, "num_joints": J})
    assert (arch.n_stage, arch.layout) == (3, "okd-hrnet")
    assert arch.unused == ["stage3 outputs for branches >= 1 (only branch 0 is read)", "transition3.*", "stage4.*",
                           "final_layer"]
    with torch.no_grad():
        assert_same_outputs(model(X), ours(X)[:3], "ours 4-stage bare read as 3")


@pytest.mark.parametrize("n_stage,multi", [(1, True), (2, True), (3, False), (4, False)])
def test_our_own_state_dicts_and_okdpose_files(tmp_path, n_stage, multi):
    ours = randomize(MultiOutHRNet(J, WIDTH, n_stage, multi), seed=n_stage).eval()
    torch.save(ours.state_dict(), tmp_path / "bare.pt")
    save_checkpoint(tmp_path / "model.pt", ours, epoch=3)
    for name, layout in (("bare.pt", "official" if n_stage == 4 else "multi-out"), ("model.pt", "okdpose")):
        model, arch, report = load_released(tmp_path / name)
        assert arch.config() == ours.config() and arch.layout == layout, name
        assert report.counts()["skipped"] == 0 and not arch.unused
        with torch.no_grad():
            assert_same_outputs(model(X), ours(X), f"ours n_stage {n_stage} {name}")


def test_infer_architecture_takes_a_state_dict_with_module_prefix():
    sd = {f"module.{k}": v for k, v in randomize(MultiOutHRNet(3, 2, 2)).state_dict().items()}
    arch = infer_architecture(sd)
    assert arch.config() == {"num_joints": 3, "width": 2, "n_stage": 2, "multi": True}
    assert arch.notes[0] == "`module.` prefix (DataParallel) removed from every key"
    assert arch.to_dict()["layout"] == "multi-out"
    fresh = infer_architecture(MultiOutHRNet(3, 2, 2).state_dict())       # init_weights: every bias 0
    assert "looks untrained: its last head intermediate_layers.1 holds init values (bias exactly 0) (an " \
           "initialisation, not a trained model?)" in fresh.notes


# --- refusals: the message names the file, the keys and the fix ---------------------------------

def original_sd(n_stage: int = 3) -> dict[str, torch.Tensor]:
    """A fresh original model's keys (a copy: cases replace or drop entries)."""
    return dict(_original_sd(n_stage))


@functools.lru_cache(maxsize=None)
def _original_sd(n_stage: int) -> dict[str, torch.Tensor]:
    return MultiOutPoseHrnet(J, WIDTH, n_stage).state_dict()


def drop(sd, prefix):
    return {k: v for k, v in sd.items() if not k.startswith(prefix)}


def ours_sd(n_stage: int, **extra) -> dict[str, torch.Tensor]:
    return {**MultiOutHRNet(J, WIDTH, n_stage).state_dict(), **extra}


REFUSALS = {  # id: (state_dict or callable, expect, words in the message)
    "partial_stage": (lambda: drop(original_sd(), "stage3.2."), None,
                      ["the trunk is incomplete", "tensors of stage3 are missing", "stage3.2.branches.0.0.conv1.weight",
                       "download or export it again"]),
    "stage_cut_short": (lambda: drop(original_sd(), "stage4.2.fuse_layers"), None,
                        ["tensors of stage4 are missing", "stage4.2.fuse_layers.0.1.0.weight"]),
    "unknown_key": (lambda: {**original_sd(), "extra_head.weight": torch.zeros(3, 4)}, None,
                    ["1 keys are neither HRNet-W4 trunk nor heatmap heads", "extra_head.weight",
                     "delete those keys"]),
    "odd_head_key": (lambda: {**original_sd(), "intermediate_layers.0.scale": torch.zeros(1)}, None,
                     ["intermediate_layers.0.scale"]),
    "wrong_joints_vs_params": (original_sd, {"num_joints": 12, "width": WIDTH, "n_stage": 3, "multi": True},
                               ["holds HRNet-W4, 3 stages, an output per stage, 5 joints",
                                "num_joints 5 in the file, 12 in params (data.joints)",
                                "set data.joints to a joint set of 5 joints (okdpose.joints has none; add one)"]),
    "wrong_width_and_stages_vs_params": (original_sd, {"width": 32, "n_stage": 2, "multi": False},
                                         ["width 4 in the file, 32 in params (model.width)",
                                          "n_stage 3 in the file, 2 in params (model.n_stage)",
                                          "set model.width: 4, model.n_stage: 3, model.multi: true"]),
    "mixed_joints": (lambda: {**original_sd(), "intermediate_layers.1.weight": torch.zeros(7, WIDTH, 1, 1),
                              "intermediate_layers.1.bias": torch.zeros(7)}, None,
                     ["heads of different joint counts", "intermediate_layers.1: 7", "final_layer: 5",
                      "delete the other heads"]),
    "shape_fits_no_hrnet": (lambda: {**original_sd(), "stage2.0.branches.1.0.conv1.weight": torch.zeros(8, 8, 1, 1)},
                            None, ["1 trunk tensors do not have the shapes of an HRNet-W4",
                                   "stage2.0.branches.1.0.conv1.weight: (8, 8, 1, 1) in the file, (8, 8, 3, 3)"]),
    "head_kernel_3x3": (lambda: {**original_sd(), "final_layer.weight": torch.zeros(J, WIDTH, 3, 3)}, None,
                        ["head final_layer has weight (5, 4, 3, 3)", "1x1 convs"]),
    "backbone_without_heads": (lambda: drop(drop(original_sd(), "final_layer"), "intermediate_layers"), None,
                               ["no heatmap head", "use it as model.pretrained"]),
    "heads_beyond_the_trunk": (lambda: ours_sd(2, **{"intermediate_layers.2.weight": torch.zeros(J, WIDTH, 1, 1),
                                                     "intermediate_layers.2.bias": torch.zeros(J)}), None,
                               ["heads intermediate_layers.0..2 run 3 stages but the trunk ends at stage 2"]),
    "heads_with_a_gap": (lambda: drop(original_sd(), "intermediate_layers.1."), None,
                         ["fit no known layout", "final_layer, intermediate_layers.0, intermediate_layers.2"]),
    "not_hrnet": (lambda: torch.nn.Linear(3, 2).state_dict(), None,
                  ["width is read from conv transition1.0.0.weight", "not an HRNet pose checkpoint"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_file_the_keys_and_the_fix(tmp_path, case):
    make, expect, words = REFUSALS[case]
    path = tmp_path / f"{case}.pth"
    torch.save(make(), path)
    with pytest.raises(CheckpointError) as err:
        load_released(path, expect=expect)
    message = str(err.value)
    for word in [str(path), *words]:
        assert word in message, (word, message)


def test_okdpose_file_of_another_model_than_params(tmp_path):
    save_checkpoint(tmp_path / "model.pt", MultiOutHRNet(17, WIDTH, 2))
    with pytest.raises(CheckpointError, match="17 in the file, 12 in params .data.joints.; set data.joints: coco17 "):
        load_released(tmp_path / "model.pt", expect={"num_joints": 12})
    save_checkpoint(tmp_path / "model.pt", MultiOutHRNet(J, WIDTH, 2))
    with pytest.raises(CheckpointError, match=r"n_stage 2 in the file, 3 in params \(model.n_stage\)"):
        load_released(tmp_path / "model.pt", expect={"n_stage": 3})
    with pytest.raises(ValueError, match="unknown keys"):
        load_released(tmp_path / "model.pt", expect={"stages": 3})

