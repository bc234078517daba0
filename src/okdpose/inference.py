"""Batched prediction over a data set: every stage output of a model decoded to keypoints, with
the crops' boxes and ids, for `okdpose.evaluation` (the evaluate stage and the training loop's
per-epoch validation) and the pictures.

Legend: S stage outputs, N samples (one per box), J joints; points are (x, y), in frame pixels
unless named `hm_*` (heatmap pixels); sizes are (w, h); stages are 1-based (`model.output_stages`).

    preds = predict(model, dataset)            # a PoseDataset (or a Subset of one)
    preds.keypoints(4)                         # (N, J, 3) [x, y, maxval] of stage 4
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from okdpose.codec import HeatmapCodec, flip_back, get_max_preds
from okdpose.device import input_memory_format
from okdpose.geometry import scale_area


@dataclass(kw_only=True)
class Predictions:
    """Decoded keypoints of every stage output for N boxes (rows follow the dataset order)."""

    image_ids: np.ndarray      # (N,) int64
    ann_ids: np.ndarray        # (N,) int64 annotation id of a ground-truth box; -1 for detections
    indices: np.ndarray        # (N,) dataset index of each row
    scores: np.ndarray         # (N,) box scores (1 for ground-truth boxes)
    areas: np.ndarray          # (N,) `geometry.scale_area` of the crops, the original's OKS-NMS area
    centers: np.ndarray        # (N, 2) crop centre, frame px
    scales: np.ndarray         # (N, 2) crop size / 200
    stages: tuple[int, ...]    # (S,) 1-based stage of each output
    coords: np.ndarray         # (S, N, J, 2) frame px (argmax, quarter-pixel refinement, inverse affine)
    maxvals: np.ndarray        # (S, N, J) heatmap peak values
    hm_coords: np.ndarray      # (S, N, J, 2) integer argmax of the (flip-averaged) heatmaps, heatmap px
    hm_target: np.ndarray      # (N, J, 2) integer argmax of the target heatmaps (0, 0 when none)
    codec: HeatmapCodec        # the data set's: crop and heatmap sizes, target sigma
    flip_test: bool

    def __len__(self) -> int:
        return len(self.image_ids)

    def stage_index(self, stage: int) -> int:
        """Position of 1-based `stage` among the outputs."""
        if stage not in self.stages:
            raise KeyError(f"stage {stage} is not an output of this model (outputs: {list(self.stages)})")
        return self.stages.index(stage)

    def keypoints(self, stage: int) -> np.ndarray:
        """(N, J, 3) [x, y, maxval] of one stage."""
        s = self.stage_index(stage)
        return np.concatenate([self.coords[s], self.maxvals[s][..., None]], axis=-1)


def base_dataset(dataset: Dataset) -> Any:
    """The PoseDataset under any `Subset`s (its samples' meta `index` refers to it)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _outputs(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _fast_copy(model: nn.Module, fold_bn: bool) -> nn.Module:
    """The folded inference copy of an HRNet (eval mode), else the model itself. Kept with the model
    and re-folded in place when its weights changed (`cached_inference_copy`): validation after
    every epoch copies the model once."""
    from okdpose.model.fuse import cached_inference_copy
    from okdpose.model.hrnet import HRNetTrunk

    return cached_inference_copy(model) if fold_bn and isinstance(model, HRNetTrunk) else model


def predict(model: nn.Module, dataset: Dataset, *, batch_size: int = 32, device: str | torch.device | None = None,
            flip_test: bool = False, flip_perm: Sequence[int] | np.ndarray | None = None, workers: int = 0,
            progress: bool = False, fold_bn: bool = True, autocast: Optional[torch.dtype] = None) -> Predictions:
    """Run `model` on every sample of `dataset` (a PoseDataset or a Subset of one) and decode every
    stage output with the dataset's codec.

    Eval mode and no_grad (the model's train/eval mode is restored afterwards). An HRNet runs as
    `okdpose.model.fuse.inference_copy` (kept with the model: `cached_inference_copy`; BN folded
    into the convs, channels-last on CPU: faster, same outputs up to float rounding as
    tests/test_fuse.py checks; `fold_bn=False` runs the model itself); CPU inputs go
    channels-last. `device`: where the model is (default: where its parameters are; inputs are
    moved there). Flip test averages each output with `flip_back` of
    the mirrored input's output (flip pairs swapped, one-column shift); `flip_perm` defaults to the
    dataset's (`JointSpec.flip_permutation()`). `autocast`: run the network under autocast to
    this dtype (bf16 / fp16; None: fp32); the heatmaps are decoded in fp32.
    """
    base = base_dataset(dataset)
    codec: HeatmapCodec = base.codec
    dev = _model_device(model) if device is None else torch.device(device)
    if device is not None and dev.type != _model_device(model).type:
        raise ValueError(f"predict: device={device!r} but the model is on {_model_device(model)}; move the model "
                         "first (model.to(device)) or leave device unset")
    if flip_test:
        flip_perm = flip_perm if flip_perm is not None else base.flip_perm
        if flip_perm is None:
            raise ValueError("predict: flip_test needs flip_perm (JointSpec.flip_permutation())")
    if batch_size < 1:
        raise ValueError(f"predict: batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("predict: the dataset is empty")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=dev.type == "cuda")
    stages = tuple(getattr(model, "output_stages", ()))
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("image_id", "index", "score", "center", "scale", "tgt")}
    coords: list[list[np.ndarray]] = []
    maxvals: list[list[np.ndarray]] = []
    hm_coords: list[list[np.ndarray]] = []
    was_training = model.training
    model.eval()
    net = _fast_copy(model, fold_bn)
    try:
        with torch.no_grad():
            batches: Iterable = loader
            if progress:
                from tqdm import tqdm
                batches = tqdm(loader, desc="predict", unit="batch")
            for images, target, _, meta in batches:
                x = images.to(dev, non_blocking=True).contiguous(memory_format=input_memory_format(dev))
                with torch.autocast(dev.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    outs = [o.float() for o in _outputs(net(x))]
                    flipped = [o.float() for o in _outputs(net(torch.flip(x, dims=[3])))] if flip_test else None
                if flipped is not None:
                    outs = [(o + flip_back(f, flip_perm)) * 0.5 for o, f in zip(outs, flipped)]
                if not stages:
                    stages = tuple(range(1, len(outs) + 1))
                if len(outs) != len(stages):
                    raise ValueError(f"predict: the model returned {len(outs)} outputs, its output_stages are {stages}")
                hm_size = (int(outs[0].shape[-1]), int(outs[0].shape[-2]))
                if hm_size != codec.heatmap_size:
                    raise ValueError(f"predict: the model outputs {list(hm_size)} heatmaps, the dataset's codec "
                                     f"expects {list(codec.heatmap_size)} (data.heatmap_size)")
                if not coords:
                    coords, maxvals, hm_coords = ([[] for _ in stages] for _ in range(3))
                center, scale = meta["center"].numpy(), meta["scale"].numpy()
                for s, out in enumerate(outs):
                    hm = out.detach().float().cpu().numpy()
                    xy, mv = codec.decode(hm, center, scale)
                    coords[s].append(xy)
                    maxvals[s].append(mv)
                    hm_coords[s].append(get_max_preds(hm)[0])
                cols["tgt"].append(get_max_preds(target.numpy())[0])
                cols["image_id"].append(meta["image_id"].numpy())
                cols["index"].append(meta["index"].numpy())
                cols["score"].append(meta["score"].numpy())
                cols["center"].append(center)
                cols["scale"].append(scale)
    finally:
        model.train(was_training)
    c = {k: np.concatenate(v) for k, v in cols.items()}
    scales = c["scale"].astype(np.float64)
    return Predictions(
        image_ids=c["image_id"].astype(np.int64), ann_ids=np.asarray(base.records.ann_id)[c["index"]].astype(np.int64),
        indices=c["index"].astype(np.int64), scores=c["score"].astype(np.float64), areas=scale_area(scales),
        centers=c["center"].astype(np.float64), scales=scales, stages=stages,
        coords=np.stack([np.concatenate(a) for a in coords]), maxvals=np.stack([np.concatenate(a) for a in maxvals]),
        hm_coords=np.stack([np.concatenate(a) for a in hm_coords]), hm_target=c["tgt"], codec=codec,
        flip_test=flip_test,
    )
