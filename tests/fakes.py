"""Test doubles shared by several test modules: a recording MLflow tracker and a tiny HRNet whose
BatchNorms are far from the identity (so folding changes every conv) with peaked heatmaps."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from okdpose.model import MultiOutHRNet


class FakeRun:
    """What a stage logged: metrics and (path, artifact folder) pairs."""

    def __init__(self, run_id):
        self.id, self.metrics, self.artifacts = run_id, {}, []

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((str(path), artifact_path))


class FakeTracker:
    """Stands in for `okdpose.tracking.Tracker` (monkeypatch it there, reset `runs` per test)."""

    runs: list = []
    enabled = True

    @classmethod
    def from_params(cls, params, root=None):
        return cls()

    @contextlib.contextmanager
    def run(self, run_name=None, run_id=None, tags=None):
        self.runs.append(FakeRun(run_id))
        yield self.runs[-1]


def trained_like(n_stage: int, width: int = 4, seed: int = 0, *, multi: bool = True, num_joints: int = 12,
                 input_hw: tuple[int, int] = (64, 64)) -> MultiOutHRNet:
    """A tiny model whose BNs have non-trivial weights, biases and running statistics (one
    training-mode pass on random (4, 3, *input_hw) inputs), in eval mode."""
    torch.manual_seed(seed)
    m = MultiOutHRNet(num_joints, width, n_stage, multi)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight)
        if isinstance(mod, nn.BatchNorm2d):
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.uniform_(mod.bias, -0.2, 0.2)
            mod.momentum = None
    with torch.no_grad():
        m.train()(torch.randn(4, 3, *input_hw))
    return m.eval()
