"""train-okd for a given trained checkpoint (`model.checkpoint`): no training; the model is
validated once and written where training writes its best model, with reports of the same shape,
so evaluate, explain and export run on it unchanged.

    record = validate_given(model, validate, select_stages)      # the "epoch 0" record
    summary = given_summary(record, select_stages, source)       # metrics/train.json
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from torch import nn

from okdpose.reports import named_stages
from okdpose.train import selection_score

KEYS = ("AP", "AR", "hmPCK50")


def validate_given(model: nn.Module, validate: Callable[[nn.Module], Mapping[int, Mapping[str, float]]],
                   select_stages: Sequence[int]) -> dict[str, Any]:
    """One history record (epoch 0, no training loss) with the val metrics of `model`."""
    val = validate(model)
    nan = float("nan")
    return {"epoch": 0, "lr": nan, "train": {"total": nan, "mse_teacher": nan}, "val": dict(val),
            "score": selection_score(val, select_stages), "img_per_s": nan}


def given_summary(record: Mapping[str, Any], select_stages: Sequence[int], source: Mapping[str, Any]) -> dict[str, Any]:
    """metrics/train.json for a given model: `trained: false`, the checkpoint (path, sha256, what
    was inferred) and its val metrics as both best and final (epoch 0)."""
    stages = named_stages({s: {k: v[k] for k in KEYS if k in v} for s, v in record["val"].items()})
    best = {"epoch": 0, "score": record["score"], **stages}
    return {"trained": False, "checkpoint": dict(source), "best": best, "final": dict(best),
            "selection": {"metric": "mean val AP", "stages": list(select_stages)}, "epochs_run": 0}
