"""okdpose.distributed + Trainer under DDP (gloo, 2 CPU processes): 2 ranks x batch 2 train like
1 process x batch 4 (same samples per step), rank 0 alone validates and writes, ranks stay in
sync, and resume works."""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import Subset
from torch.utils.data.distributed import DistributedSampler

from okdpose import distributed
from okdpose.data.dataset import PoseDataset
from okdpose.joints import BABYPOSE12
from okdpose.losses import OKDLoss
from okdpose.model import MultiOutHRNet
from okdpose.train import Settings, Trainer, make_optimizer, make_scheduler

IMAGE, HEATMAP, SEED = (48, 64), (12, 16), 5
ORDER = [0, 1, 2, 0, 1, 2, 0, 1]          # 8 samples of the 3-frame tiny split: 2 steps of global batch 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Interrupt(RuntimeError):
    pass


class FrozenBNHRNet(MultiOutHRNet):
    """Batch norm always in eval mode: with per-rank batch statistics 2 ranks x 2 images cannot
    equal 1 x 4 (SyncBatchNorm is GPU-only), without them DDP must match one process closely."""

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        return self


def make_model() -> MultiOutHRNet:
    torch.manual_seed(1)
    model = FrozenBNHRNet(12, width=4, n_stage=2)
    for m in model.modules():          # O(1) activations through the frozen BNs: every layer learns
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    return model


def build(prepared: Path, out: Path, batch: int, epochs: int, ctx: distributed.DistContext, stop_at=None):
    """The Trainer of one process; validation is a stub that only rank 0 may call (its score
    improves every epoch); `stop_at` (epoch, step) raises there on every rank (a killed job)."""
    model = make_model()
    train = Subset(PoseDataset(prepared, "train", BABYPOSE12, IMAGE, HEATMAP, 1.0, train=True), ORDER)
    opt = make_optimizer(model, "adam", 1e-3)
    box = {}

    def validate(m: torch.nn.Module) -> dict:      # better every epoch: the best model is the last
        assert distributed.rank() == 0, "validation ran on a non-main rank"
        return {"stage1": {"AP": 0.5}, "stage2": {"AP": 0.5 + 0.01 * (box["trainer"].epoch + 1)}}

    def on_step(epoch: int, step: int) -> None:
        if (epoch, step) == stop_at:
            raise Interrupt(f"stopped at epoch {epoch} step {step}")

    if ctx.enabled:
        factory = distributed.sampler_factory(train, ctx, SEED)
    else:             # one process, the same global order as the shards of R ranks
        def factory(epoch: int):
            sampler = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=SEED)
            sampler.set_epoch(epoch)
            return sampler
    net = distributed.wrap(model, ctx)
    box["trainer"] = Trainer(net, OKDLoss((1, 2), ((1, 2),)), opt, make_scheduler(opt, [1], 0.5), train, validate,
                   Settings(epochs=epochs, batch_size=batch, seed=SEED), select_stages=(1, 2),
                   last_path=out / "last.pt", best_path=out / "model.pt", fingerprint="fp",
                   sampler_factory=factory, is_main=ctx.is_main, progress=False, on_step=on_step)
    return box["trainer"]


def _worker(rank: int, world: int, port: int, prepared: str, out: str, epochs: int, stop_at) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    ctx = distributed.init_from_env("cpu")
    try:
        trainer = build(Path(prepared), Path(out), 2, epochs, ctx, stop_at)
        result = trainer.fit()
        torch.save({"history": result.history, "epochs_run": result.epochs_run, "resumed": result.resumed_from,
                    "weights": {k: v.clone() for k, v in distributed_unwrap(trainer.model).state_dict().items()}},
                   Path(out) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def distributed_unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def run_ddp(prepared: Path, out: Path, epochs: int, stop_at=None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(2, free_port(), str(prepared), str(out), epochs, stop_at), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_ranks_train_like_one_process_with_the_global_batch(tiny_prepared, tmp_path):
    ranks = run_ddp(tiny_prepared, tmp_path / "ddp", epochs=2)
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    single = build(tiny_prepared, single_dir, 4, 2, distributed.DistContext())
    ref = single.fit()

    # DDP keeps the replicas identical; every rank saw the same (broadcast) validation and decisions
    for k, v in ranks[0]["weights"].items():
        assert torch.equal(v, ranks[1]["weights"][k]), k
    assert [strip(r) for r in ranks[0]["history"]] == [strip(r) for r in ranks[1]["history"]]
    # same samples per optimiser step, gradients averaged over the ranks: equal up to float rounding
    ddp_loss = [r["train"]["total"] for r in ranks[0]["history"]]
    one_loss = [r["train"]["total"] for r in ref.history]
    assert [r["images"] for r in ranks[0]["history"]] == [r["images"] for r in ref.history] == [8, 8]
    assert ddp_loss == pytest.approx(one_loss, rel=1e-4), (ddp_loss, one_loss)
    ref_w = distributed_unwrap(single.model).state_dict()
    init = make_model().state_dict()
    moved = 0
    for k, v in ranks[0]["weights"].items():
        assert torch.allclose(v, ref_w[k], rtol=1e-4, atol=1e-5), k
        moved += int(not torch.equal(v, init[k]))
    assert moved > len(init) // 3          # the comparison is not between two untouched models
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
