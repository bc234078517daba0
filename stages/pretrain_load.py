"""pretrain-load: build the configured MultiOutHRNet, load `model.pretrained` when set, and write
models/init.pt (okdpose checkpoint) and metrics/pretrain.json (source, sha256, key counts, and
params + forward FLOPs per stage output at data.image_size)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from okdpose.files import sha256_file, write_json
from okdpose.model import (
    CheckpointError, MultiOutHRNet, count_params, forward_flops, load_pretrained, save_checkpoint, stage_costs,
)
from okdpose.params import ParamsError, load_params

PRETRAINED_DIR = Path("pretrained")          # the stage's DVC dependency
INIT, METRICS = Path("models/init.pt"), Path("metrics/pretrain.json")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = load_params()
    cfg, joints, size = p.model, p.joint_spec, p.data.image_size
    torch.manual_seed(p.train.seed)
    model = MultiOutHRNet(joints.num_joints, cfg.width, cfg.n_stage, cfg.multi)
    if cfg.pretrained is None:
        print(f"pretrain-load: model.pretrained is null, so no checkpoint is loaded: the model is initialised "
              f"from scratch (HRNet init, train.seed {p.train.seed})")
        source = {"path": None, "sha256": None, "kind": "scratch"}
        counts = {"loaded": 0, "missing": len(model.state_dict()), "unused": 0, "skipped": 0}
        report = None
    else:
        path = Path(cfg.pretrained)
        if PRETRAINED_DIR.resolve() not in path.resolve().parents:
            logging.warning("model.pretrained %s is outside %s/: DVC will not re-run this stage when it changes; "
                            "move it into %s/", path, PRETRAINED_DIR, PRETRAINED_DIR)
        report = load_pretrained(model, path)          # logs its report of every key
        source = {"path": str(path), "sha256": sha256_file(path), "kind": report.kind}
        counts = report.counts()
    save_checkpoint(INIT, model, source=source, load_report=report.to_dict() if report else None)
    with torch.device("meta"):
        shadow = MultiOutHRNet(joints.num_joints, cfg.width, cfg.n_stage, cfg.multi)
    stages = stage_costs(joints.num_joints, cfg.width, cfg.n_stage, size)
    write_json(METRICS, {
        "source": source,
        "keys": counts,
        "model": model.config(),
        "image_size": list(size),
        "params": count_params(model),
        "gflops": round(forward_flops(shadow, size) / 1e9, 4),   # the whole configured model, every head
        "per_stage_output": {f"stage{c['stage']}": {"params": c["params"], "gflops": round(c["flops"] / 1e9, 4)}
                             for c in stages},       # each output alone (model truncated there)
    })
    print(f"pretrain-load: wrote {INIT} and {METRICS}")


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, CheckpointError, FileNotFoundError) as e:
        sys.exit(f"pretrain-load: {e}")
