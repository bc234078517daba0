"""Data-parallel training under torchrun: launch, process group, DDP wrapper, per-epoch sampler,
collectives.

    code = relaunch_if_needed(p.train.nproc_per_node, __file__)   # N > 1, no launcher yet: run N copies
    if code is not None:                       # under `python -m torch.distributed.run --standalone`
        sys.exit(code)
    ctx = init_from_env("cpu")                 # reads RANK / WORLD_SIZE / LOCAL_RANK; single process: no-op
    model = wrap(model.to(ctx.device, memory_format=fmt), ctx)   # DDP when world_size > 1
    Trainer(..., ctx=ctx, sampler_factory=sampler_factory(train_set, ctx, seed))

Each rank trains on its `DistributedSampler` shard (shuffled from (seed, epoch), padded to equal
length); DDP averages the gradients, so R ranks x batch b step like one process with batch R*b
(batch-norm statistics stay per rank). The Trainer all-reduces the epoch's loss sums, validates
on rank 0 only and broadcasts the metrics, so every rank takes the same best-model and
early-stopping decisions; only rank 0 writes files. Without torchrun everything is a no-op.
Several nodes: start `torchrun --nnodes ...` on each yourself (the relaunch is for one machine).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

log = logging.getLogger(__name__)
# what torch.distributed.run sets in each process it starts
LAUNCHER_ENV = ("WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its variables)."""
    return any(k in os.environ for k in LAUNCHER_ENV)


def launch_command(nproc: int, script: str | Path, args: Sequence[str] = ()) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N script args`: N local
    processes, a rendezvous on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(script), *args]


def relaunch_if_needed(nproc: int, script: str | Path, args: Sequence[str] = ()) -> Optional[int]:
    """`nproc` > 1 and not under a launcher: run `script` as `nproc` processes through torch's
    launcher and return its exit code (the caller exits with it); else None (go on here)."""
    if nproc <= 1 or launched():
        return None
    cmd = launch_command(nproc, script, args)
    log.info("starting %d processes: %s", nproc, " ".join(cmd))
    launcher = subprocess.Popen(cmd)
    try:
        return launcher.wait()
    except KeyboardInterrupt:        # the launcher got the Ctrl-C too: let it stop its processes first
        launcher.wait()
        raise


def init_from_env(device: str, backend: Optional[str] = None, timeout_s: float = 1800) -> DistContext:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); `device` is the resolved train device ("cpu" or
    "cuda"): nccl and one GPU per local rank on CUDA, gloo on CPU. `timeout_s`: how long a
    collective waits for the other ranks (e.g. while rank 0 validates alone). WORLD_SIZE unset or
    1: a single-process context, nothing initialised."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local} but torch sees {torch.cuda.device_count()} GPU(s); set "
                               "train.nproc_per_node (or torchrun's --nproc_per_node) <= the GPU count, or "
                               "train.device: cpu")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        log.info("rank %d of %d (%s, %s, collective timeout %g s)", rank, world, dist.get_backend(), device,
                 timeout_s)
    return DistContext(rank, world, local, device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """`DistributedDataParallel(model)` when distributed (the model must already be on ctx.device
    and in its training memory format: DDP lays out its gradient buckets by the parameters'
    strides), else the model itself. `find_unused_parameters`: some head gets no loss (a stage in no couple)."""
    if not ctx.enabled:
        return model
    ids = [torch.device(ctx.device).index] if torch.device(ctx.device).type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def sampler_factory(dataset: Dataset, ctx: DistContext, seed: int) -> Optional[Callable[[int], Sampler]]:
    """epoch -> this rank's `DistributedSampler` shard, shuffled from (seed, epoch); None when not
    distributed (the Trainer then shuffles with its own generator)."""
    if not ctx.enabled:
        return None

    def make(epoch: int) -> Sampler:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=seed, drop_last=False)
        sampler.set_epoch(epoch)
        return sampler

    return make


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (picklable objects); identity when not distributed."""
    if not active():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """Sum each value over the ranks (float64, same keys on every rank); identity when not distributed."""
    if not active():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return dict(zip(keys, t.cpu().tolist()))


def unused_outputs(output_stages: tuple[int, ...], trained_stages: set[int]) -> bool:
    """Whether some output head gets no loss (DDP then needs find_unused_parameters)."""
    return not set(output_stages) <= trained_stages
