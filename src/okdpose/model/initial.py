"""The model training starts from: the configured MultiOutHRNet with `model.pretrained` loaded (or
its HRNet init), or the trained `model.checkpoint` taken as is; and what reports/pretrain.json
reports about it (source, key counts, cost).

    seed_everything(p.train.seed)                       # the HRNet init draws from torch's RNG
    model, source = initial_model(p.model_config(), p.model.pretrained, p.model.checkpoint)
    model_costs(p.model_config(), p.data.image_size)    # params and GFLOPs, whole and per stage
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from okdpose.files import sha256_file
from okdpose.model.checkpoint import load_pretrained
from okdpose.model.released import load_released
from okdpose.model.cost import stage_costs, truncated_cost
from okdpose.model.multi_out import MultiOutHRNet


def initial_model(config: Mapping[str, Any], pretrained: Optional[str | Path],
                  checkpoint: Optional[str | Path] = None) -> tuple[MultiOutHRNet, dict[str, Any]]:
    """MultiOutHRNet(**config) with `pretrained` loaded when set (None: the HRNet init), or the
    trained `checkpoint` loaded exactly (every key the model runs, `load_released`; its inferred
    architecture must be `config`) -> (model, {"source": {path, sha256, kind[, architecture]},
    "keys": key counts, "load_report": dict or None})."""
    if checkpoint is not None:
        path = Path(checkpoint)
        model, arch, report = load_released(path, expect=config)
        return model.train(), {"source": {"path": str(path), "sha256": sha256_file(path), "kind": "checkpoint",
                                          "model": arch.describe(), "architecture": arch.to_dict()},
                               "keys": report.counts(), "load_report": report.to_dict()}
    model = MultiOutHRNet(**config)
    if pretrained is None:
        return model, {"source": {"path": None, "sha256": None, "kind": "scratch"},
                       "keys": {"loaded": 0, "missing": len(model.state_dict()), "unused": 0, "skipped": 0},
                       "load_report": None}
    path = Path(pretrained)
    report = load_pretrained(model, path)                # logs its report of every key
    return model, {"source": {"path": str(path), "sha256": sha256_file(path), "kind": report.kind},
                   "keys": report.counts(), "load_report": report.to_dict()}


def model_costs(config: Mapping[str, Any], image_size: Sequence[int]) -> dict[str, Any]:
    """image_size (w, h), params and forward GFLOPs of the whole configured model (every head),
    and of each stage output alone (the model truncated there) as per_stage_output {"stage{k}": ..}."""
    size = tuple(image_size)
    params, flops = truncated_cost(config["num_joints"], config["width"], config["n_stage"], config["multi"], size)
    stages = stage_costs(config["num_joints"], config["width"], config["n_stage"], size)
    return {"image_size": list(size), "params": params, "gflops": round(flops / 1e9, 4),
            "per_stage_output": {f"stage{c['stage']}": {"params": c["params"], "gflops": round(c["flops"] / 1e9, 4)}
                                 for c in stages}}
