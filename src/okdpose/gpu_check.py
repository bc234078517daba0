"""A smoke check of the paper configuration on one device: presets/paper_hrnet4_okd.yaml with
built-in synthetic data (one short epoch, generated into a temporary folder) through the Trainer
as train-okd runs it: the loss couples, the heads no loss reaches (DDP's
find_unused_parameters, on a one-process group), fused Adam, the AMP choice, one validation,
then a second `fit` that must resume the finished run from last.pt. Prints the resolved
precision, img/s and peak memory; a non-finite loss or score fails it.

    python -m okdpose.gpu_check [--device cuda] [--steps 10] [--set train.precision=bf16 ...]
    scripts/gpu_check.sh            # on CUDA; exits 2 without a GPU

`run_check(device, overrides=...)` is the library form (tests/test_gpu_check.py runs it on the
CPU with a tiny model so that this path keeps working).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
import yaml
from torch import nn

PRESET = Path(__file__).resolve().parents[2] / "presets" / "paper_hrnet4_okd.yaml"


class CheckFailed(RuntimeError):
    """The check ran but something is wrong (non-finite numbers, no resume)."""


def check_params(preset: str | Path, device: str, steps: int, overrides: Mapping[str, Any]) -> Any:
    """The preset's params with synthetic data for `steps` training batches (a subject of one
    batch of frames per step, one subject each for val and test), no pretrained file, one epoch
    on `device`, no tracking; `overrides` (dotted keys) last."""
    from okdpose.params import load_params

    batch = load_params(preset, dict(overrides)).train.batch_size
    base = {"data.source": "synthetic", "data.path": None, "data.synthetic.subjects": [steps, 1, 1],
            "data.synthetic.frames_per_subject": batch, "model.pretrained": None,
            "train.epochs": 1, "train.device": device, "train.workers": 0, "tracking.enabled": False}
    return load_params(preset, {**base, **overrides})


def _one_process_group(device: torch.device) -> bool:
    """A process group of this process alone (DDP needs one); False when one exists already."""
    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    return True


def run_check(device: str = "cuda", *, preset: str | Path = PRESET, steps: int = 10,
              overrides: Optional[Mapping[str, Any]] = None, workdir: Optional[str | Path] = None) -> dict[str, Any]:
    """Train one epoch of the preset (see module doc) on `device` -> {device, precision,
    img_per_s (after the first two steps), peak_memory_gib (CUDA), loss, score, resumed_from}.
    Raises CheckFailed on a non-finite loss or score or a failed resume."""
    from okdpose.data.coco import prepare_dataset
    from okdpose.data.dataset import PoseDataset
    from okdpose.data.fetch import fetch_raw
    from okdpose.device import PRECISION, autocast_dtype, channels_last_for, describe, memory_format, resolve_device
    from okdpose.distributed import DistContext, unused_outputs
    from okdpose.losses import OKDLoss
    from okdpose.model.initial import initial_model
    from okdpose.seeding import seed_everything
    from okdpose.train import Trainer, TrainingDiverged, make_optimizer, make_scheduler, make_validator

    p = check_params(preset, device, steps, overrides or {})
    d, t = p.data, p.train
    dev = resolve_device(t.device)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        fetch_raw(root / "raw", "synthetic", synthetic=d.synthetic, spec=d.joint_spec, progress=False,
                  workers=min(8, os.cpu_count() or 1))          # subjects in parallel: the same data
        prepare_dataset(root / "raw", root / "prepared", d.joint_spec, d.image_size, d.depth_range, progress=False)
        train_set = PoseDataset(root / "prepared", "train", d.joint_spec, d.codec, augment=d.augment, train=True)
        val_set = PoseDataset(root / "prepared", "val", d.joint_spec, d.codec)
        ctx = DistContext(device=str(dev))
        own_group = _one_process_group(dev)
        marks: dict[int, float] = {}
        n_steps = math.ceil(len(train_set) / t.batch_size)

        def clock(epoch: int, step: int) -> None:     # two host syncs: the steady-state speed after warm-up
            if step in (min(2, n_steps), n_steps):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                marks[step] = time.perf_counter()

        def trainer() -> Trainer:
            seed_everything(t.seed)
            model, _ = initial_model(p.model_config(), None)
            loss_fn = OKDLoss(p.loss, p.output_stages())
            model.to(dev, memory_format=memory_format(channels_last_for(dev, t.channels_last)))
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index or 0] if dev.type == "cuda" else None,
                find_unused_parameters=unused_outputs(p.output_stages(), set(loss_fn.trained_stages)))
            optimizer = make_optimizer(model, t.optimizer, t.lr, t.momentum, t.weight_decay)
            return Trainer(net, loss_fn, optimizer, scheduler=make_scheduler(optimizer, t.lr_steps, t.lr_factor),
                           train_set=train_set, params=t, ctx=ctx, select_stages=p.kd_stages(),
                           validate=make_validator(val_set, root / "prepared" / "val_gt.json", d.joint_spec,
                                                   batch_size=t.val_batch_size, device=ctx.device,
                                                   autocast=autocast_dtype(dev, t.precision)),
                           last_path=root / "last.pt", best_path=root / "model.pt", fingerprint="gpu_check",
                           on_step=clock, progress=False)

        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            first = trainer()
            try:
                result = first.fit()
            except TrainingDiverged as e:
                raise CheckFailed(str(e)) from None
            record = result.history[-1]
            timed = n_steps - min(2, n_steps)
            img_per_s = (timed * t.batch_size / (marks[n_steps] - marks[min(2, n_steps)]) if timed
                         else record["img_per_s"])
            peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
            bad = {k: v for k, v in record["train"].items() if not math.isfinite(v)}
            if bad or not math.isfinite(record["score"]):
                raise CheckFailed(f"non-finite training numbers {bad} or score {record['score']}")
            again = trainer().fit()            # the finished run comes back from last.pt, nothing is trained
            if again.resumed_from != 1 or again.history != result.history:
                raise CheckFailed(f"the second fit did not resume the finished run (resumed_from "
                                  f"{again.resumed_from}, {again.fresh_reason})")
            return {"device": describe(dev, first.amp_dtype, first.memory_format),
                    "precision": PRECISION[first.amp_dtype],
                    "steps": n_steps, "batch_size": t.batch_size, "img_per_s": img_per_s, "peak_memory_gib": peak,
                    "loss": record["train"]["total"], "score": record["score"], "resumed_from": again.resumed_from}
        finally:
            if own_group:
                dist.destroy_process_group()


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: write key=value, e.g. train.precision=bf16")
    return key, yaml.safe_load(value)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m okdpose.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--steps", type=int, default=10, help="training batches in the epoch (default 10)")
    ap.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                    metavar="KEY=VALUE", help="a params override, e.g. train.precision=bf16 (repeatable)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU visible to torch {torch.__version__} (cuda build: {torch.version.cuda}); "
              "nothing to check on this machine. Run it where `nvidia-smi` lists a GPU.", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        r = run_check(args.device, steps=args.steps, overrides=dict(args.overrides))
    except CheckFailed as e:
        print(f"gpu_check: FAILED: {e}", file=sys.stderr)
        return 1
    peak = f", peak memory {r['peak_memory_gib']:.2f} GiB allocated" if r["peak_memory_gib"] is not None else ""
    print(f"gpu_check: {r['device']}\n  {r['steps']} steps of batch {r['batch_size']}: {r['img_per_s']:.1f} img/s "
          f"(after 2 warm-up steps){peak}; loss {r['loss']:.4g}, val score {r['score']:.4f}; resumed the finished "
          f"run from last.pt; {time.perf_counter() - start:.0f} s in all. OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
