"""okdpose.train: optimiser/schedule, the loop, best/last checkpoints, resume rules, divergence."""
import math
import random

import numpy as np
import pytest
import torch

from okdpose.data.dataset import PoseDataset
from okdpose.joints import BABYPOSE12
from okdpose.losses import OKDLoss, joints_mse
from okdpose.model import MultiOutHRNet, load_model
from okdpose.train import (Settings, Trainer, TrainingDiverged, curve_tables, describe_changes, epoch_seed,
                           make_optimizer, make_scheduler, make_validator, resolve_device, rng_state,
                           selection_score, set_rng_state, summarize)

IMAGE, HEATMAP = (48, 64), (12, 16)


@pytest.fixture(scope="module")
def sets(tiny_prepared):
    train = PoseDataset(tiny_prepared, "train", BABYPOSE12, IMAGE, HEATMAP, 1.0, train=True)
    val = PoseDataset(tiny_prepared, "val", BABYPOSE12, IMAGE, HEATMAP, 1.0)
    return train, val, make_validator(val, tiny_prepared / "val_gt.json", BABYPOSE12, batch_size=4)


def trainer(sets, tmp_path, *, epochs=2, fingerprint="fp", loss=None, validate=None, patience=0, seed=0,
            channels_last=False, **kw):
    train, _, val_fn = sets
    torch.manual_seed(1)
    model = MultiOutHRNet(12, width=4, n_stage=2)
    opt = make_optimizer(model, "adam", 1e-3)
    return Trainer(model, loss or OKDLoss((1, 2), ((1, 2),)), opt, make_scheduler(opt, [1], 0.5), train,
                   validate or val_fn, Settings(epochs=epochs, batch_size=2, seed=seed, patience=patience,
                                                channels_last=channels_last),
                   select_stages=(1, 2), last_path=tmp_path / "last.pt", best_path=tmp_path / "model.pt",
                   fingerprint=fingerprint, fingerprint_parts={"params": {"train.lr": 0.001}}, **kw)


def test_loss_decreases_when_overfitting_one_batch(sets):
    train, _, _ = sets
    torch.manual_seed(0)
    model = MultiOutHRNet(12, width=4, n_stage=2)
    image, target, weight, _ = next(iter(torch.utils.data.DataLoader(train, batch_size=3)))
    loss_fn, opt = OKDLoss((1, 2), ((1, 2),)), make_optimizer(model, "adam", 1e-2)
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


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="train.device: auto or cpu"):
            resolve_device("cuda")


def test_rng_state_round_trip_and_epoch_seeds():
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    seeds = {epoch_seed(s, e) for s in range(3) for e in range(1, 4)}
    assert len(seeds) == 9          # (seed, epoch) streams do not collide as seed + epoch would


def test_fit_writes_best_and_last_with_history(sets, tmp_path):
    records = []
    t = trainer(sets, tmp_path, on_epoch=records.append, best_extras={"note": "x"})
    result = t.fit()
    assert result.epochs_run == 2 and result.resumed_from is None and not result.stopped_early
    assert [r["epoch"] for r in records] == [1, 2] and not any(r["replayed"] for r in records)
    rec = result.history[0]
    assert set(rec["train"]) == {"mse_teacher", "mse_stage1", "kl_1_2", "kl_weight", "total"}
    assert set(rec["val"]) == {"stage1", "stage2"} and "AP" in rec["val"]["stage2"]
    assert [r["lr"] for r in result.history] == pytest.approx([1e-3, 5e-4])
    assert rec["images"] == 3 and rec["score"] == selection_score(rec["val"], (1, 2))
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["finished"] and last["fingerprint"] == "fp"
    assert set(last["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert last["optimizer"]["state"] and last["scheduler"]["last_epoch"] == 2
    assert last["best"]["epoch"] == result.best_epoch and len(last["history"]) == 2
    model, ckpt = load_model(tmp_path / "model.pt")
    assert ckpt["epoch"] == result.best_epoch and ckpt["fingerprint"] == "fp" and ckpt["note"] == "x"
    assert ckpt["select_stages"] == [1, 2] and set(ckpt["val"]) == {"stage1", "stage2"}
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
    plain = trainer(sets, tmp_path / "plain").fit()
    t = trainer(sets, tmp_path / "cl", channels_last=True)
    steps = []
    t.on_step = lambda epoch, step: steps.append(t.model.conv2.weight.grad.is_contiguous(memory_format=torch.channels_last))
    cl = t.fit()
    assert steps and all(steps)                   # the step ran channels-last (gradients too)
    assert t.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain.history, cl.history):   # the same training up to float rounding
        assert b["train"]["total"] == pytest.approx(a["train"]["total"], rel=1e-3)
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


def test_other_fingerprint_starts_fresh_and_says_why(sets, tmp_path, capsys):
    trainer(sets, tmp_path, epochs=1).fit()
    t = trainer(sets, tmp_path, epochs=1, fingerprint="other")
    t.fingerprint_parts = {"params": {"train.lr": 0.01}}
    result = t.fit()
    assert result.resumed_from is None and "train.lr: 0.001 -> 0.01" in result.fresh_reason
    assert "starting fresh" in capsys.readouterr().err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["fingerprint"] == "other"
    assert describe_changes({"a": 1, "init_sha256": "x"}, {"a": 2, "init_sha256": "y"}) == "a: 1 -> 2, init_sha256 changed"


def test_unreadable_last_checkpoint_starts_fresh(sets, tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    result = trainer(sets, tmp_path, epochs=1).fit()
    assert result.resumed_from is None and "cannot be read" in result.fresh_reason


class NaNAt:
    """An OKD loss whose KL term turns NaN at its n-th call (3 images, batch 2: 2 steps per epoch)."""

    def __init__(self, call):
        self.inner, self.call, self.calls = OKDLoss((1, 2), ((1, 2),)), call, 0

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
        return {"stage1": {"AP": 0.0}, "stage2": {"AP": ap}}
    t = trainer(sets, tmp_path, epochs=4, validate=validate, patience=2)
    t.select_stages = (2,)
    result = t.fit()
    assert result.epochs_run == 3 and result.stopped_early and result.best_epoch == 1
    assert math.isclose(result.best_score, 0.5)
    assert selection_score({"stage1": {"AP": -1.0}, "stage2": {"AP": float("nan")}, "stage3": {"AP": 0.6}},
                           (1, 2, 3)) == pytest.approx(0.2)


def _record(epoch, teacher_ap, total, kl, kl_weight):
    train = {"total": total, "mse_teacher": total / 2, "kl_weight": kl_weight}
    if kl is not None:
        train["kl_3_4"] = kl
    return {"epoch": epoch, "train": train, "val": {"stage3": {"AP": 0.1}, "stage4": {"AP": teacher_ap}}}


def test_kd_diagnostics_report_kl_and_the_teacher_lead():
    from okdpose.train import kd_diagnostics

    assert kd_diagnostics([_record(1, 0.5, 1.0, None, 0.0)]) is None       # no KL term: nothing to say
    kd = kd_diagnostics([_record(1, 0.3, 1.0, 0.1, 1.0), _record(2, 0.5, 1.0, 0.1, 2.0)])
    assert kd == pytest.approx({"kl_share": 0.2, "kl": 0.1, "teacher_AP_peak": 0.5, "teacher_AP_final": 0.5,
                                "teacher_lead": 0.4})                     # student stage3 at 0.1
    kd = kd_diagnostics([_record(1, 0.4, 1.0, 0.1, 8.0), _record(2, 0.2, 1.0, 0.001, 8.0)])
    assert kd["teacher_AP_peak"] == 0.4 and kd["teacher_AP_final"] == 0.2
    assert kd["teacher_lead"] == pytest.approx(0.1) and kd["kl"] == 0.001
