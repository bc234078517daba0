"""Data: the BabyPose layout, the built-in generator, download, preprocessing, transforms, Dataset.

`PoseDataset` is imported lazily so that the download/preprocess stages do not import torch.
"""
from __future__ import annotations

from typing import Any

__all__ = ["PoseDataset"]


def __getattr__(name: str) -> Any:
    if name == "PoseDataset":
        from okdpose.data.dataset import PoseDataset

        return PoseDataset
    raise AttributeError(f"module 'okdpose.data' has no attribute {name!r}")
