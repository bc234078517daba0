"""train-okd: train the model of models/init.pt with the OKD objective on data/prepared; write
models/model.pt (best by mean val AP of the KD stages), models/last.pt (resume state, every
epoch), metrics/train.json and plots/train/*.csv; log params, per-epoch metrics and artifacts
to MLflow (run id in metrics/train.json). Re-running after a kill resumes from models/last.pt
when it was written for the same params, init weights, data and code; otherwise starts fresh.

Data-parallel: `torchrun --nproc_per_node N stages/train_okd.py` (gloo on CPU, nccl on CUDA);
train.batch_size is per process (global batch N x batch_size); rank 0 validates and writes."""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import sys
from pathlib import Path

from okdpose import distributed
from okdpose.data.coco import DataError
from okdpose.data.dataset import PoseDataset
from okdpose.files import sha256_file, write_json, write_text
from okdpose.losses import OKDLoss
from okdpose.model import CheckpointError, load_model
from okdpose.params import ParamsError, load_params
from okdpose.tracking import Tracker
from okdpose.train import (Settings, Trainer, TrainingDiverged, code_digest, curve_tables, epoch_metrics,
                           files_digest, fingerprint, make_optimizer, make_scheduler, make_validator, summarize,
                           training_params)

PREPARED, INIT = Path("data/prepared"), Path("models/init.pt")
BEST, LAST = Path("models/model.pt"), Path("models/last.pt")
METRICS, PLOTS = Path("metrics/train.json"), Path("plots/train")
UPSTREAM = (Path("metrics/data.json"), Path("metrics/pretrain.json"))
# the params this stage reads (dvc.yaml lists the same); all but train.device/workers fingerprint last.pt
PARAMS = ("data.joints", "data.image_size", "data.heatmap_size", "data.sigma", "data.augment",
          "model.width", "model.n_stage", "model.multi", "loss.", "train.")


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    csv.DictWriter(buf, fields, lineterminator="\n").writerows([dict(zip(fields, fields)), *rows])
    write_text(path, buf.getvalue())


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = load_params()
    d, spec = p.data, p.joint_spec
    model, _ = load_model(INIT)
    want = {"num_joints": spec.num_joints, "width": p.model.width, "n_stage": p.model.n_stage, "multi": p.model.multi}
    if model.config() != want:
        raise ParamsError(f"{INIT} holds a model {model.config()} but params.yaml asks for {want}; "
                          "run `dvc repro pretrain-load` (or `dvc repro`)")
    train_set = PoseDataset(PREPARED, "train", spec, d.image_size, d.heatmap_size, d.sigma, augment=d.augment, train=True)
    val_set = PoseDataset(PREPARED, "val", spec, d.image_size, d.heatmap_size, d.sigma)
    settings = Settings.from_params(p.train)
    ctx = distributed.init_from_env(settings.device)        # torchrun: join the group; else a no-op
    settings = dataclasses.replace(settings, device=ctx.device)
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    parts = {"params": training_params(p.flat(), PARAMS), "init_sha256": sha256_file(INIT),
             "data_sha256": files_digest([PREPARED / n for n in ("meta.json", "train_gt.npz", "val_gt.npz", "val_gt.json")]),
             "code_sha256": code_digest()}
    if ctx.enabled:      # N ranks x batch_size is another global batch: no resume across world sizes
        parts["world_size"] = ctx.world_size
    optimizer = make_optimizer(model, p.train.optimizer, p.train.lr, p.train.momentum, p.train.weight_decay)
    history: list[dict] = []
    loss_fn = OKDLoss.from_params(p.loss, p.output_stages())
    trained = {p.output_stages()[-1], *loss_fn.student_stages,
               *(s for c in loss_fn.couples for s in c if loss_fn.use_kld)}
    net = distributed.wrap(model.to(ctx.device), ctx, distributed.unused_outputs(p.output_stages(), trained))
    tracker = Tracker.from_params(p.tracking) if ctx.is_main else Tracker(enabled=False)
    with tracker.run() as run:
        run.log_params(p.flat())

        def on_epoch(record: dict) -> None:      # curves every epoch, so a killed run keeps them
            history.append(record)
            run.log_metrics(epoch_metrics(record), step=record["epoch"])
            for name, rows in curve_tables(history).items():
                write_csv(PLOTS / f"{name}.csv", rows)

        trainer = Trainer(net, loss_fn, optimizer,
                          make_scheduler(optimizer, p.train.lr_steps, p.train.lr_factor), train_set,
                          make_validator(val_set, PREPARED / "val_gt.json", spec, batch_size=p.train.batch_size,
                                         device=settings.device),
                          settings, p.kd_stages(), LAST, BEST, fingerprint(parts), parts,
                          best_extras={"params": p.to_dict()}, on_epoch=on_epoch if ctx.is_main else None,
                          sampler_factory=distributed.sampler_factory(train_set, ctx, p.train.seed),
                          is_main=ctx.is_main)
        result = trainer.fit()
        if not ctx.is_main:
            return
        summary = {**summarize(result, p.kd_stages()), "mlflow_run_id": run.id}
        write_json(METRICS, summary)
        run.log_metrics({f"best/{s}/AP": m["AP"] for s, m in summary["best"].items() if isinstance(m, dict)}
                        | {"best/epoch": result.best_epoch, "best/score": result.best_score})
        for path in (METRICS, *UPSTREAM):
            if path.is_file():
                run.log_artifact(path, "metrics")
        run.log_artifact(PLOTS, "plots/train")
        run.log_artifact(BEST, "models")
    best = summary["best"]
    print(f"train-okd: {result.epochs_run} epochs, best mean val AP {best['score']:.4f} (stages "
          f"{list(p.kd_stages())}) at epoch {best['epoch']}; wrote {BEST}, {LAST}, {METRICS}, {PLOTS}/")


if __name__ == "__main__":
    try:
        main()
        distributed.shutdown()
    except (ParamsError, DataError, CheckpointError, FileNotFoundError, TrainingDiverged) as e:
        sys.exit(f"train-okd: {e}")
