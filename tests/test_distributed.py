"""okdpose.distributed + Trainer under DDP (gloo, 2 CPU processes): 2 ranks x batch 2 train like
1 process x batch 4 (same samples per step, averaged gradients), rank 0 alone validates and
writes, ranks stay in sync, and resume works.

The runs are in float64. In float32 the two runs differ by rounding (another reduction order for
2 x 2 than for 1 x 4 images): gradients far below Adam's eps (1e-8) are then mostly rounding noise,
and Adam's update (~ g / eps there) turns that noise into weight differences that depend on the
CPU's vector width (4e-4 in the loss after 2 epochs on AVX-512, 3e-7 on AVX2). In float64 the
noise is 1e-8 times smaller, so the comparison can be tight on any machine while a real bug
(gradients summed instead of averaged, a wrong shard) still differs by orders of magnitude more."""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from okdpose import distributed
from okdpose.codec import HeatmapCodec
from okdpose.data.dataset import PoseDataset
from okdpose.joints import BABYPOSE12
from okdpose.losses import OKDLoss
from okdpose.model import MultiOutHRNet
from okdpose.params import LossParams, TrainParams
from okdpose.train import Trainer, make_optimizer, make_scheduler

CODEC, SEED = HeatmapCodec((48, 64), (12, 16), 1.0), 5
ORDER = [0, 1, 2, 0, 1, 2, 0, 1]          # 8 samples of the 3-frame tiny split: 2 steps of global batch 4
# DDP vs one process in float64 after 2 epochs, measured on a 2-core AVX2 CPU: losses 2.3e-16 and
# weights 4.9e-17 relative (norm-wise); the same run summing the gradients over the ranks instead of
# averaging them: 4.4e-4 and 4.1e-5 (a wrong shard fails the sample check before)
LOSS_RTOL, WEIGHT_RTOL = 1e-7, 1e-7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Interrupt(RuntimeError):
    pass


class FrozenBNHRNet64(MultiOutHRNet):
    """float64, batch norm always in eval mode: with per-rank batch statistics 2 ranks x 2 images
    cannot equal 1 x 4 (SyncBatchNorm is GPU-only), without them DDP must match one process."""

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x: torch.Tensor):
        return super().forward(x.double())


def make_model() -> MultiOutHRNet:
    torch.manual_seed(1)
    model = FrozenBNHRNet64(12, width=4, n_stage=2)
    for m in model.modules():          # O(1) activations through the frozen BNs: every layer learns
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    return model.double()


class Recording(Dataset):
    """The data set, noting the index of every sample it hands out (workers 0: in this process,
    and the loader fetches one batch per step, so what was noted at a step is its batch)."""

    def __init__(self, base: Dataset):
        self.base, self.seen = base, []

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.seen.append(int(i))
        return self.base[i]


def build(prepared: Path, out: Path, batch: int, epochs: int, ctx: distributed.DistContext, stop_at=None):
    """The Trainer of one process and its list of (epoch, step, sample indices) per optimiser step;
    validation is a stub that only rank 0 may call (its score improves every epoch); `stop_at`
    (epoch, step) raises there on every rank (a killed job)."""
    model = make_model()
    train = Recording(Subset(PoseDataset(prepared, "train", BABYPOSE12, CODEC, train=True), ORDER))
    opt = make_optimizer(model, "adam", 1e-3)
    box, steps = {}, []

    def validate(m: torch.nn.Module) -> dict:      # better every epoch: the best model is the last
        assert not dist.is_initialized() or dist.get_rank() == 0, "validation ran on a non-main rank"
        return {1: {"AP": 0.5}, 2: {"AP": 0.5 + 0.01 * (box["trainer"].epoch + 1)}}

    def on_step(epoch: int, step: int) -> None:
        steps.append((epoch, step, tuple(train.seen)))
        train.seen.clear()
        if (epoch, step) == stop_at:
            raise Interrupt(f"stopped at epoch {epoch} step {step}")

    if ctx.enabled:
        factory = distributed.sampler_factory(train, ctx, SEED)
    else:             # one process, the same global order as the shards of R ranks
        def factory(epoch: int):
            sampler = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=SEED)
            sampler.set_epoch(epoch)
            return sampler
    loss = OKDLoss(LossParams(kld_couples=((1, 2),), rampup_epochs=0.0), (1, 2))
    box["trainer"] = Trainer(distributed.wrap(model, ctx), loss, opt, scheduler=make_scheduler(opt, [1], 0.5),
                             train_set=train, validate=validate,
                             params=TrainParams(epochs=epochs, batch_size=batch, seed=SEED), ctx=ctx,
                             select_stages=(1, 2), last_path=out / "last.pt", best_path=out / "model.pt",
                             fingerprint="fp", sampler_factory=factory, progress=False, on_step=on_step)
    return box["trainer"], steps


def _worker(rank: int, world: int, port: int, prepared: str, out: str, epochs: int, stop_at) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    ctx = distributed.init_from_env("cpu")
    try:
        trainer, steps = build(Path(prepared), Path(out), 2, epochs, ctx, stop_at)
        result = trainer.fit()
        torch.save({"history": result.history, "epochs_run": result.epochs_run, "resumed": result.resumed_from,
                    "steps": steps, "weights": {k: v.clone() for k, v in unwrap(trainer.model).state_dict().items()}},
                   Path(out) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def run_ddp(prepared: Path, out: Path, epochs: int, stop_at=None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(2, free_port(), str(prepared), str(out), epochs, stop_at), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over every floating-point tensor of two state dicts."""
    keys = [k for k, v in b.items() if v.is_floating_point()]
    diff = torch.cat([(a[k] - b[k]).flatten() for k in keys])
    return float(diff.norm() / torch.cat([b[k].flatten() for k in keys]).norm())


def test_two_ranks_train_like_one_process_with_the_global_batch(tiny_prepared, tmp_path):
    ranks = run_ddp(tiny_prepared, tmp_path / "ddp", epochs=2)
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    single, single_steps = build(tiny_prepared, single_dir, 4, 2, distributed.DistContext())
    ref = single.fit()

    # DDP keeps the replicas identical; every rank saw the same (broadcast) validation and decisions
    for k, v in ranks[0]["weights"].items():
        assert torch.equal(v, ranks[1]["weights"][k]), k
    assert [strip(r) for r in ranks[0]["history"]] == [strip(r) for r in ranks[1]["history"]]
    # the same samples per optimiser step: the two shards' batches make the single process's batch
    assert [(e, s) for e, s, _ in single_steps] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for (e0, s0, a), (e1, s1, b), (e, s, batch) in zip(*(r["steps"] for r in ranks), single_steps, strict=True):
        assert (e0, s0) == (e1, s1) == (e, s) and len(a) == len(b) == 2 and len(batch) == 4
        assert sorted(a + b) == sorted(batch), (e, s, a, b, batch)
    for epoch in (1, 2):
        assert sorted(i for e, _, batch in single_steps if e == epoch for i in batch) == list(range(len(ORDER)))
    # gradients averaged over the ranks: the same training up to float64 rounding
    assert [r["images"] for r in ranks[0]["history"]] == [r["images"] for r in ref.history] == [8, 8]
    ddp_loss = [r["train"]["total"] for r in ranks[0]["history"]]
    one_loss = [r["train"]["total"] for r in ref.history]
    assert ddp_loss == pytest.approx(one_loss, rel=LOSS_RTOL), (ddp_loss, one_loss)
    ref_w = unwrap(single.model).state_dict()
    assert all(v.dtype == torch.float64 for v in ref_w.values() if v.is_floating_point())
    assert relative_difference(ranks[0]["weights"], ref_w) < WEIGHT_RTOL
    init = make_model().state_dict()
    moved = sum(int(not torch.equal(v, init[k])) for k, v in ranks[0]["weights"].items())
    assert moved > len(init) // 3          # the comparison is not between two untouched models
    assert relative_difference(ref_w, init) > 1e3 * WEIGHT_RTOL
    # rank 0 wrote the usual files in the usual format
    last = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert last["format"] == "okdpose-last" and last["epoch"] == 2 and not any("module." in k for k in last["model"])
    for k, v in last["model"].items():
        assert torch.equal(v, ranks[0]["weights"][k]), k
    assert (tmp_path / "ddp" / "model.pt").is_file()


def strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("train_seconds", "val_seconds", "img_per_s")}


@pytest.mark.slow
def test_a_stopped_ddp_run_resumes_to_the_uninterrupted_result(tiny_prepared, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Exception, match="stopped at epoch 2 step 1"):
        run_ddp(tiny_prepared, out, epochs=2, stop_at=(2, 1))
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    ranks = run_ddp(tiny_prepared, out, epochs=2)                # resumes epoch 1 from last.pt
    assert [r["resumed"] for r in ranks] == [1, 1] and [r["epochs_run"] for r in ranks] == [2, 2]
    full = run_ddp(tiny_prepared, tmp_path / "full", epochs=2)   # uninterrupted
    for k, v in full[0]["weights"].items():
        assert torch.equal(v, ranks[0]["weights"][k]), k
    assert [strip(r) for r in full[0]["history"]] == [strip(r) for r in ranks[0]["history"]]
