"""okdpose.distributed + Trainer under DDP (gloo, 2 CPU processes): 2 ranks x batch 2 train like
1 process x batch 4 (same samples per step, averaged gradients), rank 0 alone validates and
writes, ranks stay in sync, and resume works (also where only rank 0 has last.pt). The launch
(the stage relaunching itself through torch.distributed.run), a finished last.pt accepted at any
world size, and per-rank augmentation in the DataLoader workers.

The runs are in float64. In float32 the two runs differ by rounding (another reduction order for
2 x 2 than for 1 x 4 images): gradients far below Adam's eps (1e-8) are then mostly rounding noise,
and Adam's update (~ g / eps there) turns that noise into weight differences that depend on the
CPU's vector width (4e-4 in the loss after 2 epochs on AVX-512, 3e-7 on AVX2). In float64 the
noise is 1e-8 times smaller, so the comparison can be tight on any machine while a real bug
(gradients summed instead of averaged, a wrong shard) still differs by orders of magnitude more."""
import logging
import os
import socket
import sys
import threading
from pathlib import Path

import numpy as np
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
from okdpose.model.checkpoint import save_resume
from okdpose.params import AugmentParams, LossParams, TrainParams
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
                             # fp32 as asked: `auto` is bf16 on CPUs with bf16 units, whose autocast makes
                             # the float64 runs differ by ~3 % (seen on an avx512_bf16 CPU)
                             params=TrainParams(epochs=epochs, batch_size=batch, seed=SEED, precision="fp32",
                                                channels_last=False), ctx=ctx,
                             select_stages=(1, 2), last_path=out / "last.pt", best_path=out / "model.pt",
                             fingerprint="fp", sampler_factory=factory, progress=False, on_step=on_step)
    return box["trainer"], steps


def _worker(rank: int, world: int, port: int, prepared: str, out: str, epochs: int, stop_at, own_dirs: bool) -> None:
    """One rank; `own_dirs`: rank r keeps last.pt / model.pt in out/node{r} (no shared filesystem)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    ctx = distributed.init_from_env("cpu", timeout_s=120)      # a desync fails instead of hanging
    try:
        run_dir = Path(out) / f"node{rank}" if own_dirs else Path(out)
        run_dir.mkdir(exist_ok=True)
        trainer, steps = build(Path(prepared), run_dir, 2, epochs, ctx, stop_at)
        result = trainer.fit()
        torch.save({"history": result.history, "epochs_run": result.epochs_run, "resumed": result.resumed_from,
                    "steps": steps, "weights": {k: v.clone() for k, v in unwrap(trainer.model).state_dict().items()}},
                   Path(out) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def run_ddp(prepared: Path, out: Path, epochs: int, stop_at=None, own_dirs: bool = False) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(2, free_port(), str(prepared), str(out), epochs, stop_at, own_dirs), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over every floating-point tensor of two state dicts."""
    keys = [k for k, v in b.items() if v.is_floating_point()]
    diff = torch.cat([(a[k] - b[k]).flatten() for k in keys])
    return float(diff.norm() / torch.cat([b[k].flatten() for k in keys]).norm())


@pytest.fixture(scope="module")
def two_epochs(tiny_prepared, tmp_path_factory) -> tuple[list[dict], Path]:
    """An uninterrupted 2-epoch run of two ranks (both tests compare with it): (ranks, its folder)."""
    out = tmp_path_factory.mktemp("ddp")
    return run_ddp(tiny_prepared, out, epochs=2), out


def test_two_ranks_train_like_one_process_with_the_global_batch(tiny_prepared, tmp_path, two_epochs):
    ranks, ddp_dir = two_epochs
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
    last = torch.load(ddp_dir / "last.pt", weights_only=True)
    assert last["format"] == "okdpose-last" and last["epoch"] == 2 and not any("module." in k for k in last["model"])
    for k, v in last["model"].items():
        assert torch.equal(v, ranks[0]["weights"][k]), k
    assert (ddp_dir / "model.pt").is_file()


def strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("train_seconds", "val_seconds", "img_per_s")}


@pytest.mark.slow
def test_a_stopped_ddp_run_resumes_to_the_uninterrupted_result(tiny_prepared, tmp_path, two_epochs):
    out = tmp_path / "run"
    with pytest.raises(Exception, match="stopped at epoch 2 step 1"):
        run_ddp(tiny_prepared, out, epochs=2, stop_at=(2, 1))
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and last["world_size"] == 2
    # resumed on "two machines" without a shared filesystem: only rank 0's folder holds last.pt,
    # rank 0 reads it and broadcasts the state
    resumed = tmp_path / "resumed"
    (resumed / "node0").mkdir(parents=True)
    (out / "last.pt").rename(resumed / "node0" / "last.pt")
    ranks = run_ddp(tiny_prepared, resumed, epochs=2, own_dirs=True)
    assert [r["resumed"] for r in ranks] == [1, 1] and [r["epochs_run"] for r in ranks] == [2, 2]
    assert not (resumed / "node1" / "last.pt").exists()           # only the main rank writes
    full, _ = two_epochs                                          # uninterrupted
    for k, v in full[0]["weights"].items():
        assert torch.equal(v, ranks[0]["weights"][k]), k
    assert [strip(r) for r in full[0]["history"]] == [strip(r) for r in ranks[0]["history"]]


def _probe_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank r measures a bf16 probe of [2.0, 1.0][r] (fake): near the threshold ranks may differ."""
    from okdpose import device

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    measured = {"fp32_ms": 8.0, "bf16_ms": 8.0 / (2.0, 1.0)[rank], "speedup": (2.0, 1.0)[rank], "threads": 1}
    device._cpu_bf16_probe = lambda threads: dict(measured)
    device._agreed_probe.cache_clear()
    distributed.init_from_env("cpu", timeout_s=60)      # a desync fails instead of hanging
    try:
        bf16_cpu = {"avx2", "fma", "avx512f", "avx512_bf16"}
        dtype = device.autocast_dtype(torch.device("cpu"), "auto", flags=bf16_cpu)
        if rank == 0:                                    # main-only calls (precision_record): no collective
            device.precision_record(torch.device("cpu"), dtype, "auto")
        dist.barrier()
        torch.save({"dtype": str(dtype), "probe": device.cpu_bf16_probe()}, Path(out) / f"probe{rank}.pt")
    finally:
        distributed.shutdown()


def test_every_rank_takes_rank_0s_bf16_decision(tmp_path):
    mp.spawn(_probe_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"probe{r}.pt", weights_only=False) for r in range(2)]
    assert [g["dtype"] for g in got] == ["torch.bfloat16"] * 2          # rank 1 alone (1.0x) would take fp32
    assert [g["probe"]["speedup"] for g in got] == [2.0, 2.0]
    assert [g["probe"]["decided_by"] for g in got] == ["rank 0 of 2"] * 2


# --------------------------------------------------------------------------- launch

def test_the_stage_relaunches_itself_only_when_asked_and_not_yet_launched(monkeypatch, fake_launcher):
    calls = fake_launcher(3)
    assert distributed.relaunch_if_needed(1, "stages/train_okd.py") is None and not calls
    assert distributed.relaunch_if_needed(2, "stages/train_okd.py") == 3       # the launcher's exit code
    assert calls == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      "stages/train_okd.py"]]
    monkeypatch.setenv("LOCAL_RANK", "0")                 # a process torchrun started: train here
    assert distributed.relaunch_if_needed(2, "stages/train_okd.py") is None and len(calls) == 1
    assert distributed.launch_command(4, "s.py", ["-x"])[-3:] == ["--nproc_per_node=4", "s.py", "-x"]


def test_more_processes_than_gpus_names_the_param(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match=r"local rank 1 but torch sees 1 GPU\(s\); set train.nproc_per_node"):
        distributed.init_from_env("cuda")


# --------------------------------------------------------------------------- world size on resume

def with_world_size(path: Path, world_size: int, finished: bool) -> None:
    """Rewrite last.pt as if `world_size` processes had written it."""
    state = torch.load(path, weights_only=True)
    for key in ("format", "version"):
        del state[key]
    save_resume(path, {**state, "world_size": world_size, "finished": finished})


def test_a_finished_run_is_accepted_at_any_world_size_an_unfinished_one_is_not(tiny_prepared, tmp_path, caplog):
    first, _ = build(tiny_prepared, tmp_path, 4, 1, distributed.DistContext())
    first.fit()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["world_size"] == 1
    with_world_size(tmp_path / "last.pt", 2, finished=True)
    (tmp_path / "model.pt").unlink()                       # as DVC does before re-running the stage
    again, steps = build(tiny_prepared, tmp_path, 4, 1, distributed.DistContext())
    with caplog.at_level(logging.INFO, logger="okdpose.train"):
        result = again.fit()
    assert result.resumed_from == 1 and not steps and result.world_size == 2     # replayed, nothing trained
    assert "a finished run of world_size 2, used as is by this run of world_size 1" in caplog.text
    assert (tmp_path / "model.pt").is_file()
    for k, v in unwrap(again.model).state_dict().items():
        assert torch.equal(v, unwrap(first.model).state_dict()[k]), k

    with_world_size(tmp_path / "last.pt", 2, finished=False)        # epoch 1 of 2 done by 2 processes
    fresh, steps = build(tiny_prepared, tmp_path, 4, 2, distributed.DistContext())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="okdpose.train"):
        result = fresh.fit()
    assert result.resumed_from is None and result.world_size == 1 and [e for e, _, _ in steps] == [1, 1, 2, 2]
    assert "unfinished run of world_size 2 (processes), this run has world_size 1" in result.fresh_reason
    assert "train.nproc_per_node: 2" in caplog.text and "starting fresh" in caplog.text


# --------------------------------------------------------------------------- DataLoader workers

class ThreadsSeen(Dataset):
    """Each item: OpenCV's thread count where the item is made."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        import cv2

        return torch.zeros(3, 1, 1), torch.zeros(1), torch.zeros(1), {"cv2_threads": cv2.getNumThreads()}


def rank_trainer(train_set: Dataset, rank: int, world: int, workers: int = 1) -> Trainer:
    """A Trainer of rank `rank` out of `world` for its loader only (no process group needed)."""
    ctx = distributed.DistContext(rank=rank, world_size=world)
    model = MultiOutHRNet(12, width=4, n_stage=2)
    opt = make_optimizer(model, "adam", 1e-3)
    return Trainer(model, None, opt, scheduler=None, train_set=train_set, validate=None,
                   params=TrainParams(batch_size=2, seed=SEED, workers=workers), ctx=ctx, select_stages=(1, 2),
                   sampler_factory=distributed.sampler_factory(train_set, ctx, SEED))


def draws(trainer: Trainer, epoch: int) -> list[tuple]:
    """(rotation, flipped, crop centre) of every sample of the epoch's loader, in order."""
    out = []
    for _, _, _, meta in trainer.loader(epoch):
        out += [(float(r), bool(f), tuple(c.tolist())) for r, f, c in zip(meta["rotation"], meta["flipped"],
                                                                         meta["center"])]
    return out


def test_workers_augment_differently_per_rank_and_reproducibly(tiny_prepared):
    augment = AugmentParams(flip=True, rotation=30.0, scale=0.25)
    one = Subset(PoseDataset(tiny_prepared, "train", BABYPOSE12, CODEC, augment=augment, train=True), [0] * 8)
    rank0, rank1 = (draws(rank_trainer(one, r, 2), epoch=1) for r in (0, 1))
    assert len(rank0) == len(rank1) == 4                  # the same frame on both ranks
    assert rank0 != rank1                                 # ... augmented by streams of their own
    assert draws(rank_trainer(one, 1, 2), epoch=1) == rank1                     # a re-run draws the same
    assert draws(rank_trainer(one, 1, 2), epoch=2) != rank1                     # and each epoch anew
    # rank 0 keeps the single process's seeds: its worker draws as a 1-process run's would
    assert draws(rank_trainer(one, 0, 1), epoch=1)[:4] == rank0


def test_workers_run_opencv_on_one_thread_without_hanging():
    import cv2

    threads = cv2.getNumThreads()
    frame = np.zeros((1024, 1024), np.float32)
    cv2.warpAffine(frame, np.eye(2, 3), (1024, 1024))     # this process's OpenCV pool has run (the hazard)
    seen: list[int] = []

    def load() -> None:
        seen.extend(int(n) for *_, meta in rank_trainer(ThreadsSeen(), 0, 1).loader(1) for n in meta["cv2_threads"])

    try:
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "the DataLoader's workers hang"
        assert seen == [1, 1]
    finally:
        cv2.setNumThreads(threads)
