"""The OKD training loop (`Trainer`: epochs, per-epoch validation, best-model selection, early
stopping, checkpoints and exact resume) with the optimiser, schedule and validation it runs.

    trainer = Trainer(model, loss_fn, optimizer, scheduler=scheduler, train_set=train_set,
                      validate=validate, params=p.train, ctx=ctx, select_stages=(3, 4),
                      last_path="models/last.pt", best_path="models/model.pt", fingerprint=fp)
    result = trainer.fit()            # resumes from last_path when its fingerprint matches
                                      # (and its world size, unless it finished)

Everything is passed in (model, optimiser, scheduler, data set, validation function, the
`DistContext` with the device and this process's rank), nothing is global, so a distributed
launcher can wrap the model, inject a per-epoch sampler (`sampler_factory`) and let only the
main rank write. Stages are 1-based ints throughout (validate(model) -> {stage: {metric: value}}).

Determinism (CPU): `okdpose.seeding.seed_everything` seeds torch / numpy / random once at a fresh
start; each epoch's shuffle uses a generator seeded from (seed, epoch, rank); `last.pt`
(`okdpose.model.checkpoint.save_resume`) stores every RNG state at the end of each epoch. A run
killed at any point and resumed reaches bit-identical weights and metrics. The KL ramp-up uses
the fractional epoch: `(epoch - 1) + step / steps_per_epoch`.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from okdpose import distributed
from okdpose.data.dataset import prepare_workers
from okdpose.device import autocast_dtype, channels_last_for, configure_backends, describe, memory_format
from okdpose.distributed import DistContext
from okdpose.fingerprint import describe_changes
from okdpose.model.checkpoint import read_resume, save_checkpoint, save_resume
from okdpose.reports import named_stages
from okdpose.seeding import epoch_seed, rng_state, seed_everything, set_rng_state

if TYPE_CHECKING:
    from okdpose.params import TrainParams

log = logging.getLogger(__name__)

Metrics = dict[int, dict[str, float]]          # {stage (1-based): {"AP": .., "AR": .., ...}}
Validate = Callable[[nn.Module], Metrics]


class TrainingDiverged(RuntimeError):
    """A non-finite loss; the message names the epoch, the step and the term."""


# --------------------------------------------------------------------------- set-up helpers

def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam (the original) or SGD with momentum; weight decay on every parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":       # fused: one kernel for all parameters (okdpose.bench times the step)
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer is {name!r}; choose adam or sgd")


def make_scheduler(optimizer: torch.optim.Optimizer, lr_steps: Sequence[int],
                   lr_factor: float) -> torch.optim.lr_scheduler.MultiStepLR:
    """lr x `lr_factor` after each epoch listed in `lr_steps` (1-based epochs: step 9 means
    epochs 10.. use the lower lr), stepped once per epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(lr_steps), gamma=lr_factor)


def make_validator(dataset: Dataset, gt_json: str | Path, spec: Any, *, batch_size: int = 32,
                   device: str | torch.device = "cpu", workers: int = 0,
                   autocast: Optional[torch.dtype] = None) -> Validate:
    """validate(model) -> {stage: val metrics} through `okdpose.evaluation.evaluate_model` (the
    evaluate stage's code path): ground-truth boxes, no flip test, on `device` (where the model
    is), under `autocast` (a dtype as the Trainer's `amp_dtype`; None: fp32)."""
    from okdpose.evaluation import evaluate_model

    path = Path(gt_json)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: validation ground truth not found; run the preprocess stage "
                                "(dvc repro preprocess)")
    ground_truth = json.loads(path.read_text())      # read once, not every epoch

    def validate(model: nn.Module) -> Metrics:
        with torch.autocast(torch.device(device).type, dtype=autocast or torch.float32,
                            enabled=autocast is not None):
            metrics, _ = evaluate_model(model, dataset, ground_truth, spec, batch_size=batch_size, device=device,
                                        flip_test=False, workers=workers, progress=False, use_gt_bbox=True)
        return metrics

    return validate


def selection_score(metrics: Metrics, stages: Sequence[int], key: str = "AP") -> float:
    """Mean `key` over `stages` (1-based); NaN / pycocotools' -1 count as 0."""
    values = []
    for s in stages:
        v = float(metrics[s][key])
        values.append(v if math.isfinite(v) and v >= 0 else 0.0)
    return float(np.mean(values))


@dataclass
class TrainResult:
    history: list[dict[str, Any]]        # one record per completed epoch (see Trainer.fit)
    best_epoch: int
    best_score: float
    epochs_run: int                      # epochs completed in total (also before a resume)
    stopped_early: bool
    resumed_from: Optional[int]          # last completed epoch found in last.pt, None if fresh
    fresh_reason: Optional[str] = None   # why an existing last.pt was not used
    world_size: int = 1                  # the processes that trained it (last.pt's for a finished run replayed)


# --------------------------------------------------------------------------- the loop

def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)     # DistributedDataParallel / DataParallel


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in _unwrap(model).state_dict().items()}


def _to_device(batch: Any, device: torch.device) -> Any:
    return batch.to(device, non_blocking=True) if isinstance(batch, Tensor) else batch


@dataclass
class Trainer:
    """Runs epochs of OKD training with validation, checkpoints and resume (see module doc).

    loss_fn(outputs, target, weight, consistency=c) -> (total, terms) as `okdpose.losses.OKDLoss`,
    with a `consistency(epoch: float)` method; it gets the model outputs as they are (it upcasts
    half precision itself). validate(model) -> {stage: {"AP": ..}}. `params` is the `train`
    section (epochs, batch_size, seed, workers, amp, grad_clip, patience, channels_last,
    deterministic); the device is `ctx.device` (train.device as the launcher resolved it).
    `on_epoch(record)` is called after every epoch (also for the epochs found in last.pt on
    resume, with record["replayed"] True) and `on_step(epoch, step)` after every optimiser step
    (hooks for logging, tests, or a launcher). `best_extras` go into model.pt with the epoch, val metrics,
    score, selection stages and fingerprint.
    """

    model: nn.Module
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    _: KW_ONLY
    scheduler: Any
    train_set: Dataset
    validate: Validate
    params: "TrainParams"
    select_stages: Sequence[int]
    ctx: DistContext = DistContext()                             # device and rank; only the main rank writes
    last_path: Optional[Path] = None
    best_path: Optional[Path] = None
    fingerprint: str = ""
    fingerprint_parts: Mapping[str, Any] = field(default_factory=dict)
    best_extras: Mapping[str, Any] = field(default_factory=dict)
    on_epoch: Optional[Callable[[dict[str, Any]], None]] = None
    on_step: Optional[Callable[[int, int], None]] = None
    sampler_factory: Optional[Callable[[int], Sampler]] = None   # epoch -> sampler (e.g. distributed)
    progress: Optional[bool] = None                              # tqdm bar; None: when stderr is a TTY

    def __post_init__(self) -> None:
        self.device = torch.device(self.ctx.device)
        self.last_path = Path(self.last_path) if self.last_path else None
        self.best_path = Path(self.best_path) if self.best_path else None
        self.amp_dtype = autocast_dtype(self.device, self.params.precision)   # auto: bf16 where native
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.memory_format = memory_format(channels_last_for(self.device, self.params.channels_last))
        self.history: list[dict[str, Any]] = []
        self.best_epoch, self.best_score, self.best_state = 0, -math.inf, None
        self.epochs_since_best, self.epoch, self.finished = 0, 0, False
        self.world_size = self.ctx.world_size      # last.pt's when a finished run is replayed

    # ------------------------------------------------------------------ public
    def fit(self) -> TrainResult:
        """Train up to `params.epochs` (resuming from last_path when it matches).

        History record per epoch: epoch, lr (used in that epoch), train {term: mean over
        images}, val {stage: metrics}, score, images, train_seconds, val_seconds, img_per_s.
        """
        # in place: the optimizer keeps the same Parameter objects; checkpoints are written contiguous
        self.model.to(self.device, memory_format=self.memory_format)
        configure_backends(self.device, self.params.deterministic)
        log.info("train: %s", describe(self.device, self.amp_dtype, self.memory_format))
        resumed, why = self._resume()
        if resumed is None:
            seed_everything(self.params.seed)
        while not self.finished and self.epoch < self.params.epochs:
            self._run_epoch(self.epoch + 1)
        if not self.history:
            raise RuntimeError("no epoch was trained")
        if self.best_state is not None:
            _unwrap(self.model).load_state_dict(self.best_state)
        return TrainResult(self.history, self.best_epoch, self.best_score, self.epoch,
                           self.finished and self.epoch < self.params.epochs, resumed, why, self.world_size)

    # ------------------------------------------------------------------ epochs
    def loader(self, epoch: int) -> DataLoader:
        """Epoch `epoch`'s loader: shuffled by a generator seeded from (seed, epoch, rank), or by
        the injected sampler. The generator also seeds the workers' augmentation streams, hence
        the rank (rank 0's seed is the single process's: epoch_seed(seed, epoch, 0) ==
        epoch_seed(seed, epoch))."""
        s = self.params
        g = torch.Generator().manual_seed(epoch_seed(s.seed, epoch, self.ctx.rank))
        sampler = self.sampler_factory(epoch) if self.sampler_factory else None
        prepare_workers(s.workers)
        return DataLoader(self.train_set, batch_size=s.batch_size, shuffle=sampler is None, sampler=sampler,
                          generator=g, num_workers=s.workers, pin_memory=self.device.type == "cuda",
                          drop_last=False)

    def _run_epoch(self, epoch: int) -> None:
        lr = float(self.optimizer.param_groups[0]["lr"])
        sums, images, train_seconds = self._train_pass(epoch)
        self.scheduler.step()
        self._end_epoch(epoch, lr, sums, images, train_seconds)

    def _train_pass(self, epoch: int) -> tuple[dict[str, float], int, float]:
        """One pass over this rank's training samples -> (sum of each loss term x batch size,
        images, seconds). One host sync per step (the finiteness check): the sums stay on the
        device in float64 (the same IEEE operations as summing python floats) until the end."""
        from tqdm import tqdm

        s, model = self.params, self.model
        if self.ctx.enabled:     # per-rank augmentation streams, a function of (seed, epoch, rank): exact resume
            seed_everything(epoch_seed(s.seed, epoch, self.ctx.rank))
        loader = self.loader(epoch)
        steps = len(loader)
        sums: dict[str, Tensor] = {}
        images = 0
        show = (sys.stderr.isatty() if self.progress is None else self.progress) and self.ctx.is_main
        model.train()
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch}/{s.epochs}", total=steps, disable=not show, leave=False,
                   unit="batch", dynamic_ncols=True)
        for step, (image, target, weight, _meta) in enumerate(bar, start=1):
            image, target, weight = (_to_device(x, self.device) for x in (image, target, weight))
            image = image.contiguous(memory_format=self.memory_format)
            consistency = self.loss_fn.consistency((epoch - 1) + (step - 1) / steps)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                outputs = model(image)
            total, terms = self.loss_fn(outputs, target, weight, consistency=consistency)
            self._check_finite(total, terms, epoch, step, steps)
            self._optimizer_step(total)
            n = int(image.shape[0])
            images += n
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().double() * n
            if show and (step % 10 == 0 or step == steps):      # reading the loss is a host sync
                bar.set_postfix(loss=f"{float(sums['total']) / images:.3g}", refresh=False)
            if self.on_step is not None:
                self.on_step(epoch, step)
        bar.close()
        totals = {k: float(v) for k, v in sums.items()}     # once per epoch (terms may be on the CPU or the GPU)
        return totals, images, time.perf_counter() - start

    def _optimizer_step(self, total: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.params.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.params.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _end_epoch(self, epoch: int, lr: float, sums: dict[str, float], images: int, train_seconds: float) -> None:
        """Reduce the loss sums over the ranks, validate, record, update best / early stop, checkpoint."""
        s = self.params
        if self.ctx.enabled:     # the epoch's means over every rank's images
            totals = distributed.all_reduce_sums({**sums, "_images": images})
            images = int(totals.pop("_images"))
            sums = totals
        start = time.perf_counter()
        # distributed: the main rank validates, every rank gets its metrics (same best / early-stop decisions)
        metrics = self.validate(_unwrap(self.model)) if self.ctx.is_main else None
        if self.ctx.enabled:
            metrics = distributed.broadcast_object(metrics)
        val_seconds = time.perf_counter() - start
        score = selection_score(metrics, self.select_stages)
        record = {"epoch": epoch, "lr": lr, "train": {k: v / max(images, 1) for k, v in sums.items()},
                  "val": {k: {m: float(x) for m, x in v.items()} for k, v in metrics.items()},
                  "score": score, "images": images, "train_seconds": train_seconds,
                  "val_seconds": val_seconds, "img_per_s": images / train_seconds if train_seconds > 0 else 0.0}
        self.history.append(record)
        self.epoch = epoch
        if score > self.best_score:
            self.best_epoch, self.best_score, self.epochs_since_best = epoch, score, 0
            self.best_state = _cpu_state(self.model)
            self._write_best(record)
        else:
            self.epochs_since_best += 1
        if s.patience and self.epochs_since_best >= s.patience:
            self.finished = True
            log.info("early stop after epoch %d: no better mean val AP of stages %s for %d epochs (best %.4f at "
                     "epoch %d)", epoch, list(self.select_stages), s.patience, self.best_score, self.best_epoch)
        if epoch >= s.epochs:
            self.finished = True
        self._write_last()
        if self.on_epoch is not None:
            self.on_epoch({**record, "replayed": False})
        val = " ".join(f"stage{k}={v['AP']:.3f}" for k, v in record["val"].items())
        log.info("epoch %d/%d: loss %.5g, val AP %s, score %.4f%s (%.0f s, %.1f img/s)", epoch, s.epochs,
                 record["train"].get("total", float("nan")), val, score,
                 " *best*" if self.best_epoch == epoch else "", train_seconds + val_seconds, record["img_per_s"])

    def _check_finite(self, total: Tensor, terms: Mapping[str, Tensor], epoch: int, step: int, steps: int) -> None:
        if bool(torch.isfinite(total)):
            return
        bad = [f"{k}={float(v)}" for k, v in terms.items() if k != "total" and not bool(torch.isfinite(v))]
        kept = (f"the last good checkpoint {self.last_path} (epoch {self.epoch}) is kept"
                if self.last_path is not None and self.epoch > 0 else "no epoch had completed, nothing was saved")
        raise TrainingDiverged(
            f"non-finite loss at epoch {epoch} step {step}/{steps}: {', '.join(bad) or 'total'} "
            f"(total={float(total.detach())}); training stopped and {kept}. Lower train.lr or loss.kld_weight, "
            "or set train.grad_clip")

    # ------------------------------------------------------------------ checkpoints
    def _write_best(self, record: Mapping[str, Any]) -> None:
        if self.best_path is None or not self.ctx.is_main:
            return
        save_checkpoint(self.best_path, _unwrap(self.model), epoch=record["epoch"], val=named_stages(record["val"]),
                        score=record["score"], select_stages=list(self.select_stages),
                        fingerprint=self.fingerprint, **dict(self.best_extras))

    def _write_last(self) -> None:
        if self.last_path is None or not self.ctx.is_main:
            return
        save_resume(self.last_path, {
            "fingerprint": self.fingerprint, "fingerprint_parts": dict(self.fingerprint_parts),
            "epoch": self.epoch, "finished": self.finished, "world_size": self.ctx.world_size,
            "model": _cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng_state(),
            "best": {"epoch": self.best_epoch, "score": self.best_score, "state_dict": self.best_state},
            "epochs_since_best": self.epochs_since_best,
            "history": self.history,
        })

    def _read_last(self) -> tuple[Optional[dict[str, Any]], Optional[str]]:
        """last_path's state when this run may resume it -> (state, None); else (None, why not).
        A finished run is accepted at any world size (its result is done), an unfinished one only
        at its own (N ranks x batch_size is its global batch)."""
        path = self.last_path
        state, why = read_resume(path) if path is not None else (None, None)
        if state is None:
            return None, why
        if state.get("fingerprint") != self.fingerprint:
            changes = describe_changes(state.get("fingerprint_parts") or {}, self.fingerprint_parts)
            return None, f"{path} was written for other training inputs ({changes})"
        saved, world = int(state.get("world_size", 1)), self.ctx.world_size
        if saved != world:
            if not state["finished"]:
                return None, (f"{path} holds an unfinished run of world_size {saved} (processes), this run has "
                              f"world_size {world}; a run resumes only at its own world size (another global "
                              f"batch). Set train.nproc_per_node: {saved} to resume it")
            log.info("%s: a finished run of world_size %d, used as is by this run of world_size %d", path, saved,
                     world)
        return state, None

    def _resume(self) -> tuple[Optional[int], Optional[str]]:
        """Load last_path when it matches -> (its epoch, None); else (None, why it was not used).
        The main rank reads and decides; under DDP it broadcasts the state, so every rank resumes
        alike, also where the others have no (or another) last.pt (no shared filesystem)."""
        path = self.last_path
        state, why = self._read_last() if self.ctx.is_main else (None, None)
        if self.ctx.enabled:
            state, why = distributed.broadcast_object((state, why))
        if state is None:
            if why is not None and self.ctx.is_main:
                log.warning("%s; starting fresh", why)
            return None, why
        self.world_size = int(state.get("world_size", 1))
        _unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.finished = int(state["epoch"]), bool(state["finished"])
        best = state["best"]
        self.best_epoch, self.best_score, self.best_state = int(best["epoch"]), float(best["score"]), best["state_dict"]
        self.epochs_since_best = int(state["epochs_since_best"])
        self.history = list(state["history"])
        set_rng_state(state["rng"])
        log.info("resuming from %s: epoch %d/%d done%s, best mean val AP %.4f at epoch %d", path, self.epoch,
                 self.params.epochs, " (finished)" if self.finished else "", self.best_score, self.best_epoch)
        if self.best_path is not None and self.ctx.is_main and self.best_state is not None:
            # DVC removes models/model.pt before re-running the stage: put the best back
            model_state = _cpu_state(self.model)
            _unwrap(self.model).load_state_dict(self.best_state)
            self._write_best(next(r for r in self.history if r["epoch"] == self.best_epoch))
            _unwrap(self.model).load_state_dict(model_state)
        if self.on_epoch is not None:
            for record in self.history:
                self.on_epoch({**record, "replayed": True})
        return self.epoch, None
