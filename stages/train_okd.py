"""train-okd: train the model of models/init.pt with the OKD objective on data/prepared; write
models/model.pt (best by mean val AP of the KD stages), models/last.pt (resume state, every
epoch), reports/train.json (the full summary), its headline subset metrics/train.json (what `dvc
exp show` compares: `okdpose.reports.train_headline`) and plots/train/*.csv; log params, per-epoch
metrics and artifacts to MLflow (run id in both JSON files). Re-running after a kill resumes from
models/last.pt when it was written for the same params, init weights, data and code; otherwise starts fresh.

Data-parallel: train.nproc_per_node N > 1 runs the stage as N processes through torch's launcher
(`dvc exp run -S train.nproc_per_node=4`; several nodes: start `torchrun` on each yourself); gloo
on CPU, nccl on CUDA; train.batch_size is per process (global batch N x batch_size); rank 0
validates and writes."""
from __future__ import annotations

import sys
from pathlib import Path

# this tree's okdpose before an installed (editable) copy: a queued `dvc exp run` runs the stage in a
# copy of the repository whose src/ is the code it was queued with (README "grid"; test_this_tree.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import logging
from dataclasses import replace

import torch

from okdpose import distributed, energy
from okdpose.data.coco import DataError
from okdpose.data.dataset import PoseDataset
from okdpose.device import autocast_dtype, channels_last_for, memory_format, precision_record, resolve_device
from okdpose.files import write_csv, write_json
from okdpose.fingerprint import fingerprint, fingerprint_parts
from okdpose.given_model import given_summary, validate_given
from okdpose.losses import OKDLoss
from okdpose.model import CheckpointError, load_model, save_checkpoint
from okdpose.params import ParamsError, load_params
from okdpose.reports import curve_tables, epoch_metrics, final_metrics, named_stages, summarize, train_headline
from okdpose.tracking import Tracker, run_tags
from okdpose.train import Trainer, TrainingDiverged, make_optimizer, make_scheduler, make_validator

PREPARED, INIT = Path("data/prepared"), Path("models/init.pt")
BEST, LAST = Path("models/model.pt"), Path("models/last.pt")
REPORT, METRICS, PLOTS = Path("reports/train.json"), Path("metrics/train.json"), Path("plots/train")
UPSTREAM = (Path("reports/data.json"), Path("reports/pretrain.json"))
# the params this stage reads (dvc.yaml lists the same); all but fingerprint.NOT_FINGERPRINTED fingerprint last.pt
PARAMS = ("data.joints", "data.image_size", "data.heatmap_size", "data.sigma", "data.augment",
          "model.width", "model.n_stage", "model.multi", "model.checkpoint", "loss.", "train.")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = load_params()
    t = p.train
    code = distributed.relaunch_if_needed(t.nproc_per_node, __file__)
    if code is not None:                 # the N processes ran the stage
        sys.exit(code)
    model, init = load_model(INIT, expect=p.model_config(), fix="run `dvc repro pretrain-load` (or `dvc repro`)")
    val_set = PoseDataset(PREPARED, "val", p.joint_spec, p.data.codec)
    if p.model.checkpoint is not None:   # a trained checkpoint, evaluated as is: no training
        return take_given_model(p, model, init.get("source", {}), val_set)
    train_set = PoseDataset(PREPARED, "train", p.joint_spec, p.data.codec, augment=p.data.augment, train=True)
    ctx = distributed.init_from_env(str(resolve_device(t.device)), timeout_s=t.dist_timeout_s)   # else a no-op
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    parts = fingerprint_parts(p.flat(), PARAMS, INIT, PREPARED)
    optimizer = make_optimizer(model, t.optimizer, t.lr, t.momentum, t.weight_decay)
    loss_fn = OKDLoss(p.loss, p.output_stages())
    # in place, before the DDP wrap: DDP lays out its gradient buckets by the parameters' strides
    model.to(ctx.device, memory_format=memory_format(channels_last_for(ctx.device, t.channels_last)))
    net = distributed.wrap(model, ctx, distributed.unused_outputs(p.output_stages(), set(loss_fn.trained_stages)))
    history: list[dict] = []
    tracker = Tracker.from_params(p.tracking) if ctx.is_main else Tracker(enabled=False)
    with tracker.run(tags=run_tags(p.tracking, t.seed)) as run:
        run.log_params(p.flat())

        def on_epoch(record: dict) -> None:      # curves every epoch, so a killed run keeps them
            history.append(record)
            run.log_metrics(epoch_metrics(record), step=record["epoch"])
            for name, rows in curve_tables(history).items():
                write_csv(PLOTS / f"{name}.csv", rows)

        trainer = Trainer(net, loss_fn, optimizer, scheduler=make_scheduler(optimizer, t.lr_steps, t.lr_factor),
                          train_set=train_set, validate=make_validator(val_set, PREPARED / "val_gt.json", p.joint_spec,
                                                                       batch_size=t.val_batch_size, device=ctx.device,
                                                                       workers=t.workers,
                                                                       autocast=autocast_dtype(ctx.device, t.precision)),
                          params=t, ctx=ctx, select_stages=p.kd_stages(), last_path=LAST, best_path=BEST,
                          fingerprint=fingerprint(parts), fingerprint_parts=parts, best_extras={"params": p.to_dict()},
                          on_epoch=on_epoch if ctx.is_main else None,
                          sampler_factory=distributed.sampler_factory(train_set, ctx, t.seed))
        with energy.measure_energy(p.energy if ctx.is_main else replace(p.energy, enabled=False), "train") as meter:
            result = trainer.fit()
        if not ctx.is_main:
            return
        summary = {**summarize(result, p.kd_stages(), p.loss.kld_couples), "world_size": result.world_size,
                   "threads": torch.get_num_threads(), **precision_record(ctx.device, trainer.amp_dtype, t.precision),
                   "memory_format": "channels_last" if trainer.memory_format == torch.channels_last else "contiguous",
                   "energy": meter.record, "mlflow_run_id": run.id}
        write_reports(summary)
        run.log_metrics({**final_metrics(summary), **energy.metric_values(meter.record, "energy.train")})
        run.set_tags({**energy.tags(meter.record, "energy.train"), "precision": summary["precision"],
                      "memory_format": summary["memory_format"],
                      **({"bf16_probe": summary["bf16_probe"]} if "bf16_probe" in summary else {})})
        run.log_artifact(METRICS, "metrics")
        for path in (REPORT, *UPSTREAM):
            if path.is_file():
                run.log_artifact(path, "reports")
        run.log_artifact(PLOTS, "plots/train")
        run.log_artifact(BEST, "models")
    print(f"train-okd: {result.epochs_run} epochs, best mean val AP {summary['best']['score']:.4f} (stages "
          f"{list(p.kd_stages())}) at epoch {summary['best']['epoch']}; wrote {BEST}, {LAST}, {REPORT}, {METRICS}, "
          f"{PLOTS}/")


def write_reports(summary: dict) -> None:
    """The full summary (reports/train.json), then its headline (metrics/train.json) last: an
    interrupted stage never leaves a headline without its report."""
    write_json(REPORT, summary)
    write_json(METRICS, train_headline(summary))


def take_given_model(p, model, source, val_set) -> None:
    """model.checkpoint: validate once, write models/model.pt, reports/train.json, metrics/train.json
    and plots/train/ in the shapes training writes them (models/last.pt is left as it is)."""
    device = resolve_device(p.train.device)
    validate = make_validator(val_set, PREPARED / "val_gt.json", p.joint_spec, batch_size=p.train.val_batch_size,
                              device=device)
    record = validate_given(model.to(device), validate, p.kd_stages())
    tracker = Tracker.from_params(p.tracking)
    with tracker.run(tags=run_tags(p.tracking, p.train.seed)) as run:
        run.log_params(p.flat())
        run.set_tags({"checkpoint": p.model.checkpoint, "trained": "false"})
        summary = {**given_summary(record, p.kd_stages(), source), "mlflow_run_id": run.id}
        save_checkpoint(BEST, model.cpu(), epoch=0, val=named_stages(record["val"]), score=record["score"],
                        select_stages=list(p.kd_stages()), params=p.to_dict())
        for name, rows in curve_tables([record]).items():
            write_csv(PLOTS / f"{name}.csv", rows)
        write_reports(summary)
        run.log_metrics(final_metrics(summary))
        run.log_artifact(METRICS, "metrics")
        run.log_artifact(REPORT, "reports")
    print(f"train-okd: model.checkpoint {p.model.checkpoint} taken as trained (no training): mean val AP "
          f"{record['score']:.4f} (stages {list(p.kd_stages())}); wrote {BEST}, {REPORT}, {METRICS}, {PLOTS}/")


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, DataError, CheckpointError, FileNotFoundError, TrainingDiverged) as e:
        sys.exit(f"train-okd: {e}")
    finally:
        distributed.shutdown()
