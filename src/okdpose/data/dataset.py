"""`PoseDataset`: prepared records -> (image, target heatmaps, target weights, meta) samples.

Legend: J joints, (h, w) = image_size[::-1], (hh, hw) = heatmap_size[::-1].

    image          float32 (3, h, w), ImageNet mean/std normalised (RGB; depth replicated)
    target         float32 (J, hh, hw) Gaussian heatmaps (`HeatmapCodec.encode`)
    target_weight  float32 (J,) 1 for labelled joints whose Gaussian lands on the map
    meta           image_id int, index int, center (2,) and scale (2,) float32 of the crop
                   actually taken (what decode_heatmaps needs), score, area, rotation float,
                   flipped bool, joints (J, 3) float32 ground truth in frame px (zeros for
                   detection boxes)

Without augmentation the crop comes from the pre-warped cache written by preprocess (no PNG
decoding: a memory-mapped read); with augmentation (`train=True` and any of
`data.augment` on) the full frame is read from the raw data and warped once with flip,
rotation and scale folded into a single affine.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, TypeVar

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from okdpose.codec import HeatmapCodec
from okdpose.data.coco import DataError, Records, crops_path, load_meta, load_records, read_frame
from okdpose.data.transforms import flip_joints, sample_augmentation
from okdpose.geometry import affine_points, crop_image, get_affine_transform, warp_image
from okdpose.joints import JointSpec

if TYPE_CHECKING:
    from okdpose.params import AugmentParams

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
REPREPARE = "re-run preprocess (dvc repro preprocess)"
T = TypeVar("T")


def _read_prepared(path: Path, read: Callable[[], T]) -> T:
    """`read()` of a preprocess output `path`; a damaged file (truncated, not what preprocess wrote)
    is a DataError naming it and the fix instead of the reader's own error."""
    try:
        return read()
    except DataError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot be read, damaged or not what preprocess wrote ({type(e).__name__}: {e}); "
                        f"{REPREPARE}") from None


def load_prepared_meta(prepared: str | Path) -> dict:
    """`coco.load_meta` with the keys read here checked: a meta.json of the right version that lacks
    one stops naming it, not with a KeyError later."""
    meta = load_meta(prepared)
    missing = [k for k in ("joints", "splits", "image_size", "raw_root", "depth_range") if k not in meta]
    splits = meta.get("splits")
    missing += [f"splits.{s}.channels" for s, v in (splits.items() if isinstance(splits, dict) else ())
                if not isinstance(v, dict) or "channels" not in v]
    if missing or not isinstance(splits, dict):
        what = ", ".join(missing) or "a splits mapping"
        raise DataError(f"{Path(prepared) / 'meta.json'}: lacks {what}; {REPREPARE}")
    return meta


class PoseDataset(Dataset):
    """One split of a prepared data set, ground-truth boxes (`use_gt_bbox`) or detection boxes.

    What prediction needs besides the samples: `spec` (joints, flip pairs), `codec` (sizes,
    sigma), `records` (one row per box: `ann_id` is -1 for detection boxes) and `gt_boxes`.
    """

    def __init__(self, prepared_dir: str | Path, split: str, spec: JointSpec, codec: HeatmapCodec, *,
                 augment: Optional["AugmentParams"] = None, use_gt_bbox: bool = True, train: bool = False,
                 raw_root: str | Path | None = None, use_cache: bool = True):
        self.prepared = Path(prepared_dir)
        self.meta = load_prepared_meta(self.prepared)
        if self.meta["joints"] != spec.name:
            raise DataError(f"{self.prepared}/meta.json: prepared for joints {self.meta['joints']!r}, "
                            f"asked for {spec.name!r}; re-run preprocess with the same data.joints")
        if split not in self.meta["splits"]:
            raise DataError(f"{self.prepared}: no split {split!r} (have {sorted(self.meta['splits'])})")
        self.split, self.spec = split, spec
        self.kind = "gt" if use_gt_bbox else "det"
        self.records: Records = _read_prepared(self.prepared / f"{split}_{self.kind}.npz",
                                               lambda: load_records(self.prepared, split, self.kind))
        self.codec = codec
        self.image_size = codec.image_size
        self.augment = augment if (train and augment is not None and augment.enabled) else None
        self.train = train
        self.raw_root = Path(raw_root) if raw_root is not None else (self.prepared / self.meta["raw_root"])
        self.channels = int(self.meta["splits"][split]["channels"])
        self.flip_perm = spec.flip_permutation()
        cache = crops_path(self.prepared, split, self.kind)
        self.use_cache = (use_cache and self.augment is None and cache.is_file()
                          and tuple(self.meta["image_size"]) == self.image_size)
        self._cache_path = cache
        self._cache: np.ndarray | None = None
        if self.use_cache:               # a damaged cache stops here, naming it, not in the middle of a run
            self._check_cache()
        self._aspect = self.image_size[0] / self.image_size[1]
        self._norm_mul = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
        self._norm_add = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def gt_boxes(self) -> bool:
        """Whether the samples are ground-truth boxes (else detection boxes)."""
        return self.kind == "gt"

    def _check_cache(self) -> None:
        cache = _read_prepared(self._cache_path, lambda: np.load(self._cache_path, mmap_mode="r"))
        want = (len(self.records), self.image_size[1], self.image_size[0])
        if cache.ndim != 4 or cache.shape[:3] != want:
            raise DataError(f"{self._cache_path}: holds crops of shape {cache.shape}, expected {want} + (channels,) "
                            f"for {self._cache_path.name.replace('_crops.npy', '.npz')}; {REPREPARE}")
        del cache                        # not kept: each DataLoader worker maps its own (below)

    def _crop_from_cache(self, i: int) -> np.ndarray:
        if self._cache is None:          # opened lazily so each DataLoader worker maps its own
            self._cache = np.load(self._cache_path, mmap_mode="r")
        return np.asarray(self._cache[i])

    def _frame(self, i: int) -> np.ndarray:
        rel = str(self.records.images[self.records.image[i]])
        return read_frame(self.raw_root / rel, self.meta["depth_range"])

    def __getitem__(self, i: int):
        r = self.records
        joints = r.joints[i].astype(np.float32)
        center, scale = r.center[i].astype(np.float32), r.scale[i].astype(np.float32)
        rot, flipped = 0.0, False
        if self.augment is None:
            crop = self._crop_from_cache(i) if self.use_cache else crop_image(self._frame(i), center, scale, self.image_size)
            kp = self.codec.frame_to_crop(joints[:, :2], center, scale)
            crop_joints = joints
        else:
            frame = self._frame(i)
            width = frame.shape[1]
            rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, ()).item()))
            a = self.augment
            aug = sample_augmentation(rng, joints, center, scale, flip=a.flip, rotation=a.rotation,
                                      scale_factor=a.scale, half_body_prob=a.half_body_prob,
                                      upper_body=self.spec.upper_body, aspect_ratio=self._aspect, frame_width=width)
            center, scale, rot, flipped = aug.center, aug.scale, aug.rot, aug.flip
            trans = get_affine_transform(center, scale, rot, self.image_size)   # mirrored frame -> crop
            crop_joints, warp = joints, trans
            if flipped:                  # mirror folded into the warp: x -> width - 1 - x, then `trans`
                crop_joints = flip_joints(joints, width, self.flip_perm)
                mirror = np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
                warp = (np.vstack([trans, [0.0, 0.0, 1.0]]) @ mirror)[:2]
            crop = warp_image(frame, warp, self.image_size)
            kp = affine_points(crop_joints[:, :2], trans)
        crop = crop.reshape(self.image_size[1], self.image_size[0], -1)
        image = crop.astype(np.float32) * self._norm_mul + self._norm_add          # (h, w, 3) by broadcasting
        target, weight = self.codec.encode(kp, crop_joints[:, 2])
        meta = {"image_id": int(r.image_id[i]), "index": int(i), "center": center, "scale": scale,
                "score": float(r.score[i]), "area": float(r.area[i]), "rotation": float(rot),
                "flipped": flipped, "joints": joints}
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(target),
                torch.from_numpy(weight), meta)


def prepare_workers(workers: int) -> None:
    """Call before a DataLoader starts `workers` worker processes: > 0 puts OpenCV on one thread
    in this process, which the (forked) workers inherit; their processes are the parallelism
    already, OpenCV threads in each would compete with them and with training. Set here, not in
    a `worker_init_fn`: `cv2.setNumThreads` inside a forked worker hangs once this process's
    OpenCV thread pool has run (OpenCV 5.0, pthreads). Draws no random numbers."""
    if workers > 0:
        cv2.setNumThreads(1)


def denormalize(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, h, w) normalised image -> uint8 (h, w, 3) RGB, for pictures."""
    x = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    x = x.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)
