"""Training loop for the multi-output HRNet with the OKD objective: optimiser and schedule,
per-epoch validation, best-model selection, early stopping, checkpoints and exact resume.

    trainer = Trainer(model, loss_fn, optimizer, scheduler, train_set, validate, settings,
                      select_stages=(3, 4), last_path="models/last.pt", best_path="models/model.pt",
                      fingerprint=fp)
    result = trainer.fit()            # resumes from last_path when its fingerprint matches

Everything is passed in (model, optimiser, scheduler, data set, validation function), nothing
is global, so a distributed launcher can wrap the model, inject a per-epoch sampler
(`sampler_factory`) and let only rank 0 write (`is_main`).

Determinism (CPU): `seed_everything` seeds torch / numpy / random once at a fresh start; each
epoch's shuffle uses a generator seeded from (seed, epoch); `last.pt` stores every RNG state at
the end of each epoch. A run killed at any point and resumed reaches bit-identical weights and
metrics. The KL ramp-up uses the fractional epoch: `(epoch - 1) + step / steps_per_epoch`.

`last.pt` (torch.load(weights_only=True) reads it; tensors, numbers, strings, lists, dicts):
    format "okdpose-last", version, fingerprint (hex), fingerprint_parts (dict), epoch (last
    completed, 1-based), finished (bool), model (state_dict), optimizer, scheduler, scaler
    (state dicts or None), rng {torch, cuda, numpy, python}, best {epoch, score, state_dict},
    epochs_since_best, history (one dict per epoch, see `Trainer.fit`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from okdpose.files import atomic_path, save_deterministic

if TYPE_CHECKING:
    from okdpose.params import TrainParams

log = logging.getLogger(__name__)

LAST_FORMAT, LAST_VERSION = "okdpose-last", 1
Metrics = dict[str, dict[str, float]]          # {"stage{k}": {"AP": .., "AR": .., ...}}
Validate = Callable[[nn.Module], Metrics]


class TrainingDiverged(RuntimeError):
    """A non-finite loss; the message names the epoch, the step and the term."""


# --------------------------------------------------------------------------- set-up helpers

def seed_everything(seed: int) -> None:
    """The one place that seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch `epoch`'s shuffle: independent streams for every (seed, epoch) pair."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error naming the fix."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no GPU; set train.device: auto or cpu")
    return torch.device(device)


def make_optimizer(model: nn.Module, name: str, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam (the original) or SGD with momentum; weight decay on every parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":       # fused: one kernel for all parameters; optimiser step 3-4x faster on CPU (okdpose.bench)
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer is {name!r}; choose adam or sgd")


def make_scheduler(optimizer: torch.optim.Optimizer, lr_steps: Sequence[int],
                   lr_factor: float) -> torch.optim.lr_scheduler.MultiStepLR:
    """lr x `lr_factor` after each epoch listed in `lr_steps` (1-based epochs: step 9 means
    epochs 10.. use the lower lr), stepped once per epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(lr_steps), gamma=lr_factor)


@dataclass(frozen=True)
class Settings:
    """How to run the loop; built from the `train` params by `Settings.from_params`."""

    epochs: int = 1
    batch_size: int = 32
    seed: int = 0
    workers: int = 0
    device: str = "cpu"
    amp: bool = True                 # CUDA only: bf16 autocast (fp16 + GradScaler without bf16)
    grad_clip: Optional[float] = None
    patience: int = 0                # 0: no early stopping
    channels_last: bool = False      # model and batches channels-last (same values up to float rounding)

    @classmethod
    def from_params(cls, train: "TrainParams") -> "Settings":
        return cls(epochs=train.epochs, batch_size=train.batch_size, seed=train.seed, workers=train.workers,
                   device=str(resolve_device(train.device)), amp=train.amp, grad_clip=train.grad_clip,
                   patience=train.patience, channels_last=train.channels_last)


# --------------------------------------------------------------------------- fingerprint

def fingerprint(parts: Mapping[str, Any]) -> str:
    """sha256 of the JSON of `parts` (training params, init weights, data and code digests)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# params that change how a run executes, not what it computes: a run resumes across them
NOT_FINGERPRINTED = ("train.device", "train.workers")


def training_params(flat: Mapping[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
    """The flat params whose key starts with one of `prefixes`, minus `NOT_FINGERPRINTED`."""
    return {k: v for k, v in flat.items()
            if k.startswith(tuple(prefixes)) and k not in NOT_FINGERPRINTED}


def files_digest(paths: Sequence[str | Path]) -> str:
    """One sha256 over the named files (names and bytes); folders are walked in sorted order."""
    h = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*.py")) if root.is_dir() else [root]
        for f in files:
            h.update(str(f.relative_to(root.parent) if root.is_dir() else f.name).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def code_digest() -> str:
    """Digest of the okdpose sources that decide a training result (as the train-okd deps)."""
    pkg = Path(__file__).resolve().parent
    names = ["train.py", "distributed.py", "losses.py", "codec.py", "inference.py", "metrics.py", "joints.py", "data", "model"]
    return files_digest([pkg / n for n in names if (pkg / n).exists()])


# --------------------------------------------------------------------------- RNG state

def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors / plain lists (weights_only loading accepts them)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# --------------------------------------------------------------------------- results

def selection_score(metrics: Metrics, stages: Sequence[int], key: str = "AP") -> float:
    """Mean `key` over `stages` (1-based); NaN / pycocotools' -1 count as 0."""
    values = []
    for s in stages:
        v = float(metrics[f"stage{s}"][key])
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


def summarize(result: TrainResult, select_stages: Sequence[int],
              keys: Sequence[str] = ("AP", "AR", "hmPCK50")) -> dict[str, Any]:
    """metrics/train.json content: best and final val metrics per stage, and run facts."""
    by_epoch = {r["epoch"]: r for r in result.history}
    best, final = by_epoch[result.best_epoch], result.history[-1]
    images = sum(r["images"] for r in result.history)
    seconds = sum(r["train_seconds"] for r in result.history)

    def stages(rec: Mapping[str, Any]) -> dict[str, Any]:
        return {s: {k: v[k] for k in keys if k in v} for s, v in rec["val"].items()}

    out = {
        "best": {"epoch": result.best_epoch, "score": result.best_score, **stages(best)},
        "final": {"epoch": final["epoch"], "score": final["score"], **stages(final),
                  "loss": dict(final["train"])},
        "selection": {"metric": "mean val AP", "stages": list(select_stages)},
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from,
        "train_img_per_s": round(images / seconds, 3) if seconds > 0 else None,
        "train_seconds": round(seconds, 1),
    }
    kd = kd_diagnostics(result.history)
    if kd is not None:
        out["kd"] = kd
    return out


def kd_diagnostics(history: Sequence[Mapping[str, Any]]) -> Optional[dict[str, float]]:
    """What the distillation did, as numbers `dvc exp show` can compare (None without KL).

    kl_share: kl_weight x sum of KL over couples / total loss in the final epoch; kl: the
    unweighted sum of KL over couples in the final epoch (student-teacher disagreement);
    teacher_AP_peak / teacher_AP_final: the last stage's val AP at its best epoch and at the end;
    teacher_lead: final teacher val AP minus the mean val AP of the students in couples.

    Measured on the built-in data (README): a too strong KD weight does not show as a large
    kl_share (the students and the teacher agree, so the KL stays small) but as a tiny `kl`, a
    teacher barely ahead of a much smaller student (small teacher_lead) and a teacher AP below
    the `-S loss.use_kld=false` baseline's; compare against that baseline before trusting KD."""
    final = history[-1]["train"]
    kl_terms = {k: v for k, v in final.items() if k.startswith("kl_") and k != "kl_weight"}
    if not kl_terms:
        return None
    total = float(final.get("total", 0.0))
    kl = float(sum(kl_terms.values()))
    share = float(final.get("kl_weight", 0.0)) * kl / total if total > 0 else 0.0

    def ap(stage: str, record: Mapping[str, Any]) -> float:
        v = float(record["val"][stage]["AP"])
        return v if math.isfinite(v) and v >= 0 else 0.0

    stages = sorted(history[-1]["val"], key=lambda k: int(k.removeprefix("stage")))
    teacher = stages[-1]
    students = sorted({f"stage{k.split('_')[1]}" for k in kl_terms} & set(stages))
    curve = [ap(teacher, r) for r in history]
    lead = curve[-1] - float(np.mean([ap(s, history[-1]) for s in students])) if students else 0.0
    return {"kl_share": round(share, 4), "kl": kl, "teacher_AP_peak": max(curve),
            "teacher_AP_final": curve[-1], "teacher_lead": lead}


def epoch_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """One history record as flat tracking metrics: train/<term>, lr, val/stage{k}/<metric>, val/score."""
    out = {f"train/{k}": v for k, v in record["train"].items()}
    out["lr"] = record["lr"]
    out["train/img_per_s"] = record["img_per_s"]
    for stage, metrics in record["val"].items():
        out.update({f"val/{stage}/{k}": v for k, v in metrics.items()})
    out["val/score"] = record["score"]
    return out


def curve_tables(history: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per-epoch tables for plots/train/*.csv (fixed column names whatever the couples):

    losses: epoch, total, mse_teacher, mse_students (sum), kl (sum over couples, unweighted),
            kl_weight (consistency x kld_weight), then every term (mse_stage{k}, kl_{s}_{t})
    val_ap: epoch, stage{k} (val AP per output stage), score (selection: mean AP of the KD stages)
    val:    epoch, stage, and every val metric (long form, one row per epoch and stage)
    lr:     epoch, lr
    """
    losses, val_ap, val, lr = [], [], [], []
    for r in history:
        t = r["train"]
        students = sum(v for k, v in t.items() if k.startswith("mse_stage"))
        kl = sum(v for k, v in t.items() if k.startswith("kl_") and k != "kl_weight")
        losses.append({"epoch": r["epoch"], "total": t["total"], "mse_teacher": t["mse_teacher"],
                       "mse_students": students, "kl": kl, "kl_weight": t.get("kl_weight", 0.0),
                       **{k: v for k, v in t.items() if k not in ("total", "mse_teacher", "kl_weight")}})
        val_ap.append({"epoch": r["epoch"], **{s: m["AP"] for s, m in r["val"].items()}, "score": r["score"]})
        val += [{"epoch": r["epoch"], "stage": s, **m} for s, m in r["val"].items()]
        lr.append({"epoch": r["epoch"], "lr": r["lr"]})
    return {"losses": losses, "val_ap": val_ap, "val": val, "lr": lr}


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
    with a `consistency(epoch: float)` method. validate(model) -> {"stage{k}": {"AP": ..}}.
    `on_epoch(record)` is called after every epoch (also for the epochs found in last.pt on
    resume, with record["replayed"] True) and `on_step(epoch, step)` after every optimiser step
    (hooks for logging, tests, or a launcher). `best_extras` go into model.pt with the epoch,
    val metrics, score, selection stages and fingerprint.
    """

    model: nn.Module
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_set: Dataset
    validate: Validate
    settings: Settings
    select_stages: Sequence[int]
    last_path: Optional[Path] = None
    best_path: Optional[Path] = None
    fingerprint: str = ""
    fingerprint_parts: Mapping[str, Any] = field(default_factory=dict)
    best_extras: Mapping[str, Any] = field(default_factory=dict)
    on_epoch: Optional[Callable[[dict[str, Any]], None]] = None
    on_step: Optional[Callable[[int, int], None]] = None
    sampler_factory: Optional[Callable[[int], Sampler]] = None   # epoch -> sampler (e.g. distributed)
    is_main: bool = True                                         # only the main process writes files
    progress: Optional[bool] = None                              # tqdm bar; None: when stderr is a TTY

    def __post_init__(self) -> None:
        self.device = torch.device(self.settings.device)
        self.last_path = Path(self.last_path) if self.last_path else None
        self.best_path = Path(self.best_path) if self.best_path else None
        cuda = self.device.type == "cuda"
        self.amp_dtype: Optional[torch.dtype] = None
        if self.settings.amp and cuda:      # never on CPU: bf16 autocast there is 30-60x slower
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.memory_format = torch.channels_last if self.settings.channels_last else torch.contiguous_format
        self.history: list[dict[str, Any]] = []
        self.best_epoch, self.best_score, self.best_state = 0, -math.inf, None
        self.epochs_since_best, self.epoch, self.finished = 0, 0, False

    # ------------------------------------------------------------------ public
    def fit(self) -> TrainResult:
        """Train up to `settings.epochs` (resuming from last_path when it matches).

        History record per epoch: epoch, lr (used in that epoch), train {term: mean over
        images}, val {"stage{k}": metrics}, score, images, train_seconds, val_seconds, img_per_s.
        """
        # in place: the optimizer keeps the same Parameter objects; checkpoints are written contiguous
        self.model.to(self.device, memory_format=self.memory_format)
        resumed, why = self._resume()
        if resumed is None:
            seed_everything(self.settings.seed)
        while not self.finished and self.epoch < self.settings.epochs:
            self._run_epoch(self.epoch + 1)
        if not self.history:
            raise RuntimeError("no epoch was trained")
        if self.best_state is not None:
            _unwrap(self.model).load_state_dict(self.best_state)
        return TrainResult(self.history, self.best_epoch, self.best_score, self.epoch,
                           self.finished and self.epoch < self.settings.epochs, resumed, why)

    # ------------------------------------------------------------------ epochs
    def loader(self, epoch: int) -> DataLoader:
        """Epoch `epoch`'s loader: shuffled by a generator seeded from (seed, epoch), or by the
        injected sampler."""
        s = self.settings
        g = torch.Generator().manual_seed(epoch_seed(s.seed, epoch))
        sampler = self.sampler_factory(epoch) if self.sampler_factory else None
        return DataLoader(self.train_set, batch_size=s.batch_size, shuffle=sampler is None, sampler=sampler,
                          generator=g, num_workers=s.workers, pin_memory=self.device.type == "cuda",
                          drop_last=False)

    def _run_epoch(self, epoch: int) -> None:
        from tqdm import tqdm

        from okdpose import distributed

        s, model = self.settings, self.model
        lr = float(self.optimizer.param_groups[0]["lr"])
        if distributed.active():     # per-rank augmentation streams, a function of (seed, epoch, rank): exact resume
            seed_everything(int(np.random.SeedSequence([s.seed, epoch, distributed.rank()])
                                .generate_state(1, dtype=np.uint64)[0] >> 1))
        loader = self.loader(epoch)
        steps = len(loader)
        sums: dict[str, float] = {}
        images = 0
        show = (sys.stderr.isatty() if self.progress is None else self.progress) and self.is_main
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
            total, terms = self.loss_fn([o.float() for o in outputs], target, weight, consistency=consistency)
            self._check_finite(total, terms, epoch, step, steps)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            if s.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            n = int(image.shape[0])
            images += n
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            bar.set_postfix(loss=f"{sums['total'] / images:.3g}", refresh=False)
            if self.on_step is not None:
                self.on_step(epoch, step)
        bar.close()
        train_seconds = time.perf_counter() - start
        self.scheduler.step()
        if distributed.active():     # the epoch's means over every rank's images
            totals = distributed.all_reduce_sums({**sums, "_images": images})
            images = int(totals.pop("_images"))
            sums = totals

        start = time.perf_counter()
        # distributed: rank 0 validates, every rank gets its metrics (same best / early-stop decisions)
        metrics = self.validate(_unwrap(model)) if self.is_main or not distributed.active() else None
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
            self.best_state = _cpu_state(model)
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
        val = " ".join(f"{k}={v['AP']:.3f}" for k, v in record["val"].items())
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
        if self.best_path is None or not self.is_main:
            return
        from okdpose.model.checkpoint import save_checkpoint

        save_checkpoint(self.best_path, _unwrap(self.model), epoch=record["epoch"], val=record["val"],
                        score=record["score"], select_stages=list(self.select_stages),
                        fingerprint=self.fingerprint, **dict(self.best_extras))

    def _write_last(self) -> None:
        if self.last_path is None or not self.is_main:
            return
        state = {
            "format": LAST_FORMAT, "version": LAST_VERSION,
            "fingerprint": self.fingerprint, "fingerprint_parts": dict(self.fingerprint_parts),
            "epoch": self.epoch, "finished": self.finished,
            "model": _cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng_state(),
            "best": {"epoch": self.best_epoch, "score": self.best_score, "state_dict": self.best_state},
            "epochs_since_best": self.epochs_since_best,
            "history": self.history,
        }
        with atomic_path(self.last_path) as tmp:
            save_deterministic(state, tmp)

    def _resume(self) -> tuple[Optional[int], Optional[str]]:
        """Load last_path when it matches -> (its epoch, None); else (None, why it was not used)."""
        path = self.last_path
        if path is None or not path.is_file():
            return None, None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: train from scratch
            why = f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            log.warning("%s; starting fresh", why)
            return None, why
        if not isinstance(state, dict) or state.get("format") != LAST_FORMAT or state.get("version") != LAST_VERSION:
            why = f"{path} is not an okdpose resume checkpoint (version {LAST_VERSION})"
            log.warning("%s; starting fresh", why)
            return None, why
        if state.get("fingerprint") != self.fingerprint:
            why = f"{path} was written for other training inputs ({describe_changes(state.get('fingerprint_parts') or {}, self.fingerprint_parts)})"
            print(f"train: {why}; starting fresh", file=sys.stderr)     # one line, not also a log warning
            return None, why
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
        msg = (f"train: resuming from {path}: epoch {self.epoch}/{self.settings.epochs} done"
               f"{' (finished)' if self.finished else ''}, best mean val AP {self.best_score:.4f} at epoch {self.best_epoch}")
        print(msg, file=sys.stderr)
        if self.best_path is not None and self.is_main and self.best_state is not None:
            # DVC removes models/model.pt before re-running the stage: put the best back
            model_state = _cpu_state(self.model)
            _unwrap(self.model).load_state_dict(self.best_state)
            self._write_best(next(r for r in self.history if r["epoch"] == self.best_epoch))
            _unwrap(self.model).load_state_dict(model_state)
        if self.on_epoch is not None:
            for record in self.history:
                self.on_epoch({**record, "replayed": True})
        return self.epoch, None


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    """'loss.kld_weight: 1.0 -> 0.5, init_sha256 changed' for two fingerprint_parts dicts."""
    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, Mapping):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    changes = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if k.endswith(("sha256", "digest")):
                changes.append(f"{k} changed")
            else:
                changes.append(f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}")
    if not changes:
        return "fingerprint differs"
    return ", ".join(changes[:limit]) + (f", ... ({len(changes)} in all)" if len(changes) > limit else "")


# --------------------------------------------------------------------------- validation

def make_validator(dataset: Dataset, gt_json: str | Path, spec: Any, *, batch_size: int = 32,
                   device: str = "cpu", workers: int = 0) -> Validate:
    """validate(model) -> per-stage val metrics through `okdpose.inference.evaluate_model`
    (the evaluate stage's code path): ground-truth boxes, no flip test."""
    from okdpose.inference import evaluate_model

    path = Path(gt_json)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: validation ground truth not found; run the preprocess stage "
                                "(dvc repro preprocess)")
    ground_truth = json.loads(path.read_text())      # read once, not every epoch

    def validate(model: nn.Module) -> Metrics:
        metrics, _ = evaluate_model(model, dataset, ground_truth, spec, batch_size=batch_size, device=device,
                                    flip_test=False, workers=workers, progress=False, use_gt_bbox=True)
        return metrics

    return validate
