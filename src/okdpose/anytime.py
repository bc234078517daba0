"""Anytime (early-exit) inference: a multi-output HRNet run stage by stage, each sample leaving at
the first stage whose heatmaps are confident enough, the others continuing from the same features.

Legend: B batch, J joints, S stage outputs, N samples; stages are 1-based; τ the exit threshold.

    anytime = AnytimeHRNet(model)                  # a multi-output MultiOutHRNet, BN folded copy
    heatmaps, exit_stage = anytime(x, threshold=0.5)   # (B, J, h, w) of each sample's exit stage, (B,)

The confidence of a stage's heatmaps is `CONFIDENCES[kind]` over its joints' maxima (default
`mean_max`, the mean over joints of the heatmap maximum). A sample exits at the first output
stage whose confidence is >= τ, and always at the last one: τ = 0 exits everyone at the first
output, τ = inf nobody before the teacher.

Nothing is computed twice and nothing is computed for an exiting sample that only the later
stages read: in a stage's last module the fusion into branch 0 (what the head reads) runs for
the whole batch, the fusions into the lower-resolution branches and the next transition's new
branches only for the samples that continue. So a sample exiting at stage k costs exactly the
model truncated after stage k with all its heads, `MultiOutHRNet(J, width, k)`
(tests/test_anytime.py counts the FLOPs of both).

`anytime_curve` computes the accuracy/compute trade-off over a sweep of τ from one `predict` of
every stage (the exit decision only needs each stage's joint maxima), evaluated with the same
`evaluate_report` as every stage: τ = inf gives the teacher's AP exactly, τ = 0 the first stage's.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from okdpose.inference import Predictions
from okdpose.model.cost import truncated_cost
from okdpose.model.multi_out import MultiOutHRNet

CONFIDENCES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    # (..., J) joint maxima -> (...) confidence
    "mean_max": lambda m: m.mean(axis=-1),
    "min_max": lambda m: m.min(axis=-1),
    "median_max": lambda m: np.median(m, axis=-1),
}


def confidence(maxvals: np.ndarray, kind: str = "mean_max") -> np.ndarray:
    """(..., J) heatmap maxima -> (...) confidence of `kind` (one of CONFIDENCES)."""
    if kind not in CONFIDENCES:
        raise ValueError(f"unknown exit confidence {kind!r}; choose one of {sorted(CONFIDENCES)}")
    return CONFIDENCES[kind](np.asarray(maxvals, dtype=np.float64))


def exit_positions(conf: np.ndarray, threshold: float) -> np.ndarray:
    """(S, N) confidence per output -> (N,) position (0-based, among the outputs) of each sample's
    exit: the first output with conf >= threshold, else the last."""
    conf = np.asarray(conf)
    ok = (conf >= threshold) | (threshold <= 0)
    ok[-1] = True
    return np.argmax(ok, axis=0)


def _fuse_into(module: nn.Module, xs: list[Tensor], i: int) -> Tensor:
    """Branch i of a HighResolutionModule's fusion, in the order of its forward."""
    fuse = module.fuse_layers[i]
    y = fuse[0](xs[0])
    for j in range(1, len(xs)):
        y = y + fuse[j](xs[j])
    return module.relu(y)


class AnytimeHRNet(nn.Module):
    """A multi-output HRNet run stage by stage with per-sample early exit (see the module docstring).

    `fold_bn`: run the BN-folded eval copy (`okdpose.model.fuse.inference_copy`), as `predict` does.
    """

    def __init__(self, model: MultiOutHRNet, *, fold_bn: bool = True, kind: str = "mean_max") -> None:
        super().__init__()
        if not isinstance(model, MultiOutHRNet) or len(model.output_stages) < 2:
            raise ValueError("anytime inference needs a multi-output HRNet (model.multi: true, n_stage >= 2); "
                             f"this model's outputs are stages {list(getattr(model, 'output_stages', []))}")
        confidence(np.zeros((1, 1)), kind)       # validates `kind`
        from okdpose.model.fuse import inference_copy

        self.net = inference_copy(model) if fold_bn else model.eval()
        self.kind = kind
        self.output_stages = model.output_stages

    @torch.no_grad()
    def forward(self, x: Tensor, threshold: float = math.inf, force_exit: int | None = None
                ) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) -> heatmaps (B, J, H/4, W/4) of each sample's exit stage, exit stage (B,) int64.

        `force_exit`: every sample exits at that stage (for cost counting; ignores `threshold`).
        """
        net = self.net
        if force_exit is not None and force_exit not in self.output_stages:
            raise ValueError(f"force_exit={force_exit} is not an output stage {list(self.output_stages)}")
        m = net.input_multiple
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % m or x.shape[3] % m:
            raise ValueError(f"HRNet input must be (B, 3, H, W) with H and W divisible by {m}, got {tuple(x.shape)}")
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        y = net.relu(net.bn1(net.conv1(x)))
        ys = [net.layer1(net.relu(net.bn2(net.conv2(y))))]
        active = torch.arange(x.shape[0], device=x.device)         # sample index of each row still running
        out: Tensor | None = None
        exit_stage = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
        last = self.output_stages[-1]
        for k, ((stage_name, transition_name), tap) in enumerate(zip(net._steps, net.feature_taps), start=1):
            module = None
            if stage_name is not None:
                modules = list(getattr(net, stage_name))
                for mod in modules[:-1]:
                    ys = mod(ys)
                module = modules[-1]
                xs = [branch(t) for branch, t in zip(module.branches, ys)]
                y0 = _fuse_into(module, xs, 0)
            else:
                xs, y0 = ys, ys[0]
            transition = getattr(net, transition_name) if transition_name is not None else None
            f0 = transition[0](y0) if transition is not None else y0
            if k not in self.output_stages:
                leave = torch.zeros(len(active), dtype=torch.bool, device=x.device)
            else:
                hm = net.get_submodule(net.head_layer_names()[self.output_stages.index(k)])(tap(f0))
                if out is None:
                    out = hm.new_zeros((x.shape[0],) + tuple(hm.shape[1:]))
                if k == last or force_exit == k:
                    leave = torch.ones(len(active), dtype=torch.bool, device=x.device)
                elif force_exit is not None:
                    leave = torch.zeros(len(active), dtype=torch.bool, device=x.device)
                else:
                    peaks = hm.detach().flatten(2).amax(dim=2).float().cpu().numpy()      # (b, J)
                    leave = torch.from_numpy((confidence(peaks, self.kind) >= threshold) | (threshold <= 0)
                                             ).to(x.device)
                if leave.any():
                    out[active[leave]] = hm[leave] if not leave.all() else hm
                    exit_stage[active[leave]] = k
            if leave.all():
                break
            if leave.any():                # continue with the others only, in the input's memory format
                keep = torch.nonzero(~leave).squeeze(1)
                active = active[keep]
                xs = [t.index_select(0, keep).contiguous(memory_format=fmt) for t in xs]
                y0 = y0.index_select(0, keep).contiguous(memory_format=fmt)
                f0 = f0.index_select(0, keep).contiguous(memory_format=fmt)
            if module is not None:
                ys = [y0] + [_fuse_into(module, xs, i) for i in range(1, len(module.fuse_layers))]
            else:
                ys = xs
            if transition is not None:
                ys = [f0] + [t(ys[i] if i < len(ys) else ys[-1]) for i, t in enumerate(transition) if i > 0]
        assert out is not None
        return out, exit_stage


def exit_costs(num_joints: int, width: int, n_stage: int, image_size: tuple[int, int]) -> dict[int, dict[str, int]]:
    """{k: {"flops", "params"}} of a sample exiting at stage k: the model truncated after k with
    all its heads (what `AnytimeHRNet` computes for it), FLOPs per image at image_size (w, h)."""
    out = {}
    for k in range(1, n_stage + 1):
        params, flops = truncated_cost(num_joints, width, k, True, tuple(image_size))
        out[k] = {"flops": flops, "params": params}
    return out


def select_exits(preds: Predictions, positions: np.ndarray) -> Predictions:
    """One-output Predictions whose row i is output `positions[i]`'s (labelled stage 0)."""
    rows = np.arange(len(preds))
    return replace(preds, stages=(0,), coords=preds.coords[positions, rows][None],
                   maxvals=preds.maxvals[positions, rows][None], hm_coords=preds.hm_coords[positions, rows][None])


def format_threshold(t: float) -> str | float:
    """JSON has no infinity: τ = inf is written "inf"."""
    return "inf" if math.isinf(t) else float(t)


def anytime_curve(preds: Predictions, thresholds: Sequence[float], costs: Mapping[int, Mapping[str, int]],
                  evaluate: Callable[[Predictions], Mapping[int, Mapping[str, float]]], *,
                  kind: str = "mean_max") -> list[dict[str, Any]]:
    """Accuracy and compute of anytime inference over τ in `thresholds` (0 and inf always added).

    preds: every stage output of the split (`predict`); costs: `exit_costs`; evaluate: metrics of
    a Predictions (e.g. `evaluate_report(...).metrics`, keyed by stage label). -> one row per τ:
    threshold, AP, AR, PCK20 when evaluated, mean GFLOPs per image, the share exiting at each
    stage (`exit_stage{k}`), and `gflops_saved` relative to always running the teacher.
    """
    conf = confidence(preds.maxvals, kind)                     # (S, N)
    taus = sorted({0.0, math.inf, *map(float, thresholds)})
    teacher = costs[preds.stages[-1]]["flops"]
    rows = []
    for tau in taus:
        pos = exit_positions(conf, tau)
        metrics = evaluate(select_exits(preds, pos))[0]
        flops = np.array([costs[preds.stages[p]]["flops"] for p in pos], dtype=np.float64)
        row: dict[str, Any] = {"threshold": format_threshold(tau)}
        row.update({k: metrics[k] for k in ("AP", "AR", "PCK20", "err_median_px") if k in metrics})
        row["gflops"] = round(float(flops.mean()) / 1e9, 5)
        row["gflops_saved"] = round(1.0 - float(flops.mean()) / teacher, 4)
        for s, stage in enumerate(preds.stages):
            row[f"exit_stage{stage}"] = round(float(np.mean(pos == s)), 4)
        rows.append(row)
    return rows
