"""okdpose.train: optimiser/schedule, the loop, best/last checkpoints, resume rules, divergence."""
import logging
import math

import pytest
import torch

from okdpose.codec import HeatmapCodec
from okdpose.data.dataset import PoseDataset
from okdpose.joints import BABYPOSE12
from okdpose.losses import OKDLoss, joints_mse
from okdpose.model import MultiOutHRNet, load_model
from okdpose.params import LossParams, TrainParams
from okdpose.reports import curve_tables, summarize
from okdpose.train import Trainer, TrainingDiverged, make_optimizer, make_scheduler, make_validator, selection_score

IMAGE, HEATMAP = (48, 64), (12, 16)


def okd() -> OKDLoss:
    """Teacher stage 2, student stage 1, KL from the first step."""
    return OKDLoss(LossParams(kld_couples=((1, 2),), rampup_epochs=0.0), (1, 2))


@pytest.fixture(scope="module")
def sets(tiny_prepared):
    codec = HeatmapCodec(IMAGE, HEATMAP, 1.0)
    train = PoseDataset(tiny_prepared, "train", BABYPOSE12, codec, train=True)
    val = PoseDataset(tiny_prepared, "val", BABYPOSE12, codec)
    return train, val, make_validator(val, tiny_prepared / "val_gt.json", BABYPOSE12, batch_size=4)


class HRNet64(MultiOutHRNet):
    """float64 weights and activations: two code paths (e.g. memory formats) then agree to float64
    rounding, where float32 runs differ by a rounding that depends on the CPU's kernels."""

    def forward(self, x):
        return super().forward(x.double())


def trainer(sets, tmp_path, *, epochs=2, fingerprint="fp", loss=None, validate=None, patience=0, seed=0,
            channels_last=False, float64=False, precision="fp32", **kw):
    train, _, val_fn = sets
    torch.manual_seed(1)
    model = HRNet64(12, width=4, n_stage=2).double() if float64 else MultiOutHRNet(12, width=4, n_stage=2)
    opt = make_optimizer(model, "adam", 1e-3)
    return Trainer(model, loss or okd(), opt, scheduler=make_scheduler(opt, [1], 0.5), train_set=train,
                   validate=validate or val_fn,
                   params=TrainParams(epochs=epochs, batch_size=2, seed=seed, patience=patience,
                                      channels_last=channels_last, precision=precision),
                   select_stages=(1, 2), last_path=tmp_path / "last.pt", best_path=tmp_path / "model.pt",
                   fingerprint=fingerprint, fingerprint_parts={"params": {"train.lr": 0.001}}, **kw)


def test_loss_decreases_when_overfitting_one_batch(sets):
    train, _, _ = sets
    torch.manual_seed(0)
    model = MultiOutHRNet(12, width=4, n_stage=2)
    image, target, weight, _ = next(iter(torch.utils.data.DataLoader(train, batch_size=3)))
    loss_fn, opt = okd(), make_optimizer(model, "adam", 1e-2)
    blank = float(joints_mse(torch.zeros_like(target), target))    # the loss of predicting no peak at all
    losses = []
    for _ in range(20):
        total, terms = loss_fn(model(image), target, weight)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(terms["mse_teacher"]))
    assert losses[-1] < 0.8 * blank < 0.8 * losses[0], (blank, losses)


def test_optimizers_and_multistep_schedule():
    model = torch.nn.Linear(2, 2)
    sgd = make_optimizer(model, "sgd", 0.1, momentum=0.8, weight_decay=1e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8
    assert sgd.defaults["weight_decay"] == 1e-4
    sched = make_scheduler(sgd, [2, 3], 0.1)
    lrs = []
    for _ in range(4):
        lrs.append(sgd.param_groups[0]["lr"])
        sgd.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert isinstance(make_optimizer(model, "adam", 1e-3), torch.optim.Adam)
    with pytest.raises(ValueError, match="train.optimizer"):
        make_optimizer(model, "rmsprop", 1e-3)


def test_fit_writes_best_and_last_with_history(sets, tmp_path, caplog):
    records = []
    t = trainer(sets, tmp_path, on_epoch=records.append, best_extras={"note": "x"})
    with caplog.at_level(logging.INFO, logger="okdpose.train"):
        result = t.fit()
    assert "train: device cpu (" in caplog.text and "precision fp32, memory format contiguous" in caplog.text
    assert t.amp_dtype is None and not t.scaler.is_enabled()          # CPU: fp32, no autocast, no scaler
    assert result.epochs_run == 2 and result.resumed_from is None and not result.stopped_early
    assert [r["epoch"] for r in records] == [1, 2] and not any(r["replayed"] for r in records)
    rec = result.history[0]
    assert set(rec["train"]) == {"mse_teacher", "mse_stage1", "kl_1_2", "kl_weight", "total"}
    assert set(rec["val"]) == {1, 2} and "AP" in rec["val"][2]
    assert [r["lr"] for r in result.history] == pytest.approx([1e-3, 5e-4])
    assert rec["images"] == 3 and rec["score"] == selection_score(rec["val"], (1, 2))
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["finished"] and last["fingerprint"] == "fp"
    assert set(last["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert last["optimizer"]["state"] and last["scheduler"]["last_epoch"] == 2
    assert last["best"]["epoch"] == result.best_epoch and last["history"] == result.history
    model, ckpt = load_model(tmp_path / "model.pt")
    assert ckpt["epoch"] == result.best_epoch and ckpt["fingerprint"] == "fp" and ckpt["note"] == "x"
    assert ckpt["select_stages"] == [1, 2] and set(ckpt["val"]) == {"stage1", "stage2"}   # model.pt names them
    for k, v in model.state_dict().items():       # the trainer's model ends holding the best weights
        assert torch.equal(v, t.model.state_dict()[k]), k
    summary = summarize(result, (1, 2))
    assert summary["best"]["epoch"] == result.best_epoch and set(summary["best"]["stage2"]) == {"AP", "AR", "hmPCK50"}
    assert summary["epochs_run"] == 2 and summary["train_img_per_s"] > 0
    tables = curve_tables(result.history)
    assert list(tables["val_ap"][0]) == ["epoch", "stage1", "stage2", "score"]
    assert {"total", "mse_teacher", "mse_students", "kl", "kl_weight", "kl_1_2"} <= set(tables["losses"][0])
    assert len(tables["val"]) == 4 and tables["lr"][1]["lr"] == pytest.approx(5e-4)


def test_channels_last_trains_the_same_and_writes_contiguous_checkpoints(sets, tmp_path):
    plain = trainer(sets, tmp_path / "plain", float64=True).fit()
    t = trainer(sets, tmp_path / "cl", channels_last=True, float64=True)
    steps = []
    t.on_step = lambda epoch, step: steps.append(t.model.conv2.weight.grad.is_contiguous(memory_format=torch.channels_last))
    cl = t.fit()
    assert steps and all(steps)                   # the step ran channels-last (gradients too)
    assert t.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    # the same training up to float64 rounding. Measured on a 2-core AVX2 CPU: float64 9e-15 and 3e-15
    # relative in the two epochs' losses; float32 3e-7 and 2e-4 (Adam's first steps amplify the
    # CPU-dependent rounding of tiny gradients), too close to any tolerance that would catch a bug
    for a, b in zip(plain.history, cl.history):
        assert b["train"]["total"] == pytest.approx(a["train"]["total"], rel=1e-9)
    last = torch.load(tmp_path / "cl" / "last.pt", weights_only=True)
    assert all(v.is_contiguous() for v in last["model"].values())
    model, _ = load_model(tmp_path / "cl" / "model.pt")
    assert model.conv1.weight.is_contiguous()


def test_finished_run_resumes_without_training_and_replays(sets, tmp_path):
    first = trainer(sets, tmp_path).fit()
    (tmp_path / "model.pt").unlink()              # as DVC does before re-running the stage
    replayed = []
    again = trainer(sets, tmp_path, on_epoch=replayed.append,
                    on_step=lambda e, s: pytest.fail("a finished run must not train again")).fit()
    assert again.resumed_from == 2 and again.history == first.history
    assert [r["replayed"] for r in replayed] == [True, True]
    assert load_model(tmp_path / "model.pt")[1]["epoch"] == first.best_epoch


def test_other_fingerprint_starts_fresh_and_says_why(sets, tmp_path, caplog):
    trainer(sets, tmp_path, epochs=1).fit()
    t = trainer(sets, tmp_path, epochs=1, fingerprint="other")
    t.fingerprint_parts = {"params": {"train.lr": 0.01}}
    with caplog.at_level(logging.INFO, logger="okdpose.train"):
        result = t.fit()
    assert result.resumed_from is None and "train.lr: 0.001 -> 0.01" in result.fresh_reason
    assert "train.lr: 0.001 -> 0.01" in caplog.text and "starting fresh" in caplog.text
    assert torch.load(tmp_path / "last.pt", weights_only=True)["fingerprint"] == "other"


def test_last_checkpoint_of_the_old_version_starts_fresh_and_says_so(sets, tmp_path):
    trainer(sets, tmp_path, epochs=1).fit()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    torch.save({**state, "version": 1}, tmp_path / "last.pt")       # history keyed "stage{k}"
    result = trainer(sets, tmp_path, epochs=1).fit()
    assert result.resumed_from is None and "version 1, this code reads version 2" in result.fresh_reason


def test_unreadable_last_checkpoint_starts_fresh(sets, tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    result = trainer(sets, tmp_path, epochs=1).fit()
    assert result.resumed_from is None and "cannot be read" in result.fresh_reason


class NaNAt:
    """An OKD loss whose KL term turns NaN at its n-th call (3 images, batch 2: 2 steps per epoch)."""

    def __init__(self, call):
        self.inner, self.call, self.calls = okd(), call, 0

    def consistency(self, epoch):
        return 1.0

    def __call__(self, outputs, target, weight, consistency=1.0):
        total, terms = self.inner(outputs, target, weight, consistency=consistency)
        self.calls += 1
        if self.calls == self.call:
            terms["kl_1_2"] = torch.tensor(float("nan"))
            total = total + terms["kl_1_2"]
        return total, terms


def test_nan_loss_stops_with_epoch_step_term_and_keeps_last_good(sets, tmp_path):
    with pytest.raises(TrainingDiverged) as err:
        trainer(sets, tmp_path, epochs=3, loss=NaNAt(4)).fit()
    msg = str(err.value)
    assert "epoch 2 step 2/2" in msg and "kl_1_2=nan" in msg, msg
    assert "last.pt (epoch 1) is kept" in msg and "kld_weight" in msg
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and len(last["history"]) == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_early_stopping_on_the_selection_stages(sets, tmp_path):
    scores = iter([0.5, 0.4, 0.45, 0.9])

    def validate(model):
        ap = next(scores)
        return {1: {"AP": 0.0}, 2: {"AP": ap}}
    t = trainer(sets, tmp_path, epochs=4, validate=validate, patience=2)
    t.select_stages = (2,)
    result = t.fit()
    assert result.epochs_run == 3 and result.stopped_early and result.best_epoch == 1
    assert math.isclose(result.best_score, 0.5)
    assert selection_score({1: {"AP": -1.0}, 2: {"AP": float("nan")}, 3: {"AP": 0.6}}, (1, 2, 3)) == pytest.approx(0.2)


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_on_cuda_bf16_only_with_tensor_cores_else_fp16_with_scaler(sets, tmp_path, monkeypatch, native, dtype):
    from okdpose.distributed import DistContext

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    t = trainer(sets, tmp_path, ctx=DistContext(device="cuda"), precision="auto")   # constructed only: nothing runs
    assert t.amp_dtype is dtype and t.scaler.is_enabled() == (dtype is torch.float16)


def test_a_bf16_step_runs_on_any_cpu_with_finite_fp32_losses(sets, tmp_path):
    # slow without bf16 units (emulated), fast with them: either way it must run and stay finite
    t = trainer(sets, tmp_path, epochs=1, precision="bf16")
    assert t.amp_dtype is torch.bfloat16 and not t.scaler.is_enabled()
    result = t.fit()
    losses = result.history[0]["train"]
    assert all(math.isfinite(v) for v in losses.values()) and losses["total"] > 0, losses
    assert math.isfinite(result.history[0]["score"])


def test_auto_precision_on_this_cpu_is_the_measured_rule(sets, tmp_path):
    from okdpose.device import autocast_dtype, fast_bf16

    t = trainer(sets, tmp_path, precision="auto")
    assert t.amp_dtype is (torch.bfloat16 if fast_bf16(torch.device("cpu")) else None)
    assert t.amp_dtype is autocast_dtype(torch.device("cpu"), "auto")


def test_validation_runs_under_the_given_autocast(tiny_prepared, monkeypatch):
    import okdpose.evaluation

    seen = []

    def fake_evaluate(model, *a, device, **k):
        seen.append((device, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return {1: {"AP": 0.0}}, None

    monkeypatch.setattr(okdpose.evaluation, "evaluate_model", fake_evaluate)
    val = PoseDataset(tiny_prepared, "val", BABYPOSE12, HeatmapCodec(IMAGE, HEATMAP, 1.0))
    for autocast in (None, torch.bfloat16):
        make_validator(val, tiny_prepared / "val_gt.json", BABYPOSE12, autocast=autocast)(torch.nn.Identity())
    assert [(d, on) for d, on, _ in seen] == [("cpu", False), ("cpu", True)] and seen[1][2] == torch.bfloat16
