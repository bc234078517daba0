import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from okdpose.codec import HeatmapCodec, decode_heatmaps
from okdpose.data import PoseDataset
from okdpose.data.coco import DataError
from okdpose.data.dataset import denormalize
from okdpose.joints import BABYPOSE12, COCO17
from okdpose.params import AugmentParams

from conftest import TINY_IMAGE_SIZE

HEATMAP = (TINY_IMAGE_SIZE[0] // 4, TINY_IMAGE_SIZE[1] // 4)


def make(prepared, **kw):
    args = dict(split="train", spec=BABYPOSE12, codec=HeatmapCodec(TINY_IMAGE_SIZE, HEATMAP, 1.0))
    args.update(kw)
    return PoseDataset(prepared, **args)


def test_sample_shapes_and_default_collate(tiny_prepared):
    ds = make(tiny_prepared)
    assert len(ds) == 3 and ds.use_cache
    image, target, weight, meta = ds[1]
    assert image.shape == (3, 64, 48) and image.dtype == torch.float32
    assert target.shape == (12, 16, 12) and weight.shape == (12,) and weight.dtype == torch.float32
    assert meta["index"] == 1 and isinstance(meta["image_id"], int) and meta["joints"].shape == (12, 3)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch[0].shape == (2, 3, 64, 48) and batch[3]["center"].shape == (2, 2)
    assert batch[3]["image_id"].dtype == torch.int64 and batch[3]["joints"].shape == (2, 12, 3)


def test_normalisation_round_trip(tiny_prepared):
    ds = make(tiny_prepared)
    crop = np.load(ds._cache_path)[0]
    rgb = denormalize(ds[0][0])
    np.testing.assert_array_equal(rgb, np.repeat(crop, 3, axis=2))    # depth replicated to 3 channels


def test_cache_and_frames_agree(tiny_prepared):
    a, b = make(tiny_prepared), make(tiny_prepared, use_cache=False)
    assert a.use_cache and not b.use_cache
    for i in range(len(a)):
        for x, y in zip(a[i][:3], b[i][:3]):
            assert torch.equal(x, y)


def test_targets_decode_to_the_ground_truth(tiny_prepared):
    ds = make(tiny_prepared, split="val")
    _, target, weight, meta = ds[0]
    coords, _ = decode_heatmaps(target[None].numpy(), meta["center"][None], meta["scale"][None])
    hm_px = meta["scale"][0] * 200 / HEATMAP[0]
    on = weight.numpy() > 0
    assert on.sum() >= 6
    err = np.abs(coords[0] - meta["joints"][:, :2])[on]
    assert err.max() <= 0.5 * hm_px + 1e-3
    assert not (weight.numpy()[meta["joints"][:, 2] == 0]).any()


def test_flip_augmentation_swaps_sides(tiny_prepared):
    ds = make(tiny_prepared, augment=AugmentParams(flip=True), train=True)
    assert not ds.use_cache
    perm = BABYPOSE12.flip_permutation()
    torch.manual_seed(0)
    seen = set()
    plain = make(tiny_prepared)[0][0].numpy()
    for _ in range(12):
        image, target, weight, meta = ds[0]
        seen.add(meta["flipped"])
        # the pixels follow: a flipped crop is the plain crop mirrored about x = w / 2 (one-column shift)
        other = plain[..., ::-1][..., :-1] if meta["flipped"] else plain[..., 1:]
        assert np.abs(image.numpy()[..., 1:] - other).max() < 0.02          # <= 1 grey level
        coords, _ = decode_heatmaps(target[None].numpy(), meta["center"][None], meta["scale"][None])
        gt = meta["joints"]
        expect = gt[:, :2].copy()
        if meta["flipped"]:           # decoded in the mirrored frame, joints swapped
            expect = np.stack([639 - gt[perm, 0], gt[perm, 1]], axis=1)
        on = weight.numpy() > 0
        hm_px = meta["scale"][0] * 200 / HEATMAP[0]
        assert np.abs(coords[0] - expect)[on].max() <= 0.5 * hm_px + 1e-3
    assert seen == {True, False}


def test_rotation_scale_half_body_run(tiny_prepared):
    ds = make(tiny_prepared, augment=AugmentParams(flip=True, rotation=40, scale=0.3, half_body_prob=1.0), train=True)
    torch.manual_seed(1)
    rots = [ds[i % 3][3]["rotation"] for i in range(9)]
    assert any(r != 0 for r in rots)
    not_train = make(tiny_prepared, augment=AugmentParams(flip=True, rotation=40), train=False)
    assert not_train.augment is None and not_train.use_cache


def test_detection_boxes(tiny_prepared):
    ds = make(tiny_prepared, split="test", use_gt_bbox=False)
    image, target, weight, meta = ds[0]
    assert weight.sum() == 0 and target.max() == 0 and (meta["joints"] == 0).all()
    assert 0 < meta["score"] <= 1


def test_other_image_size_falls_back_to_frames(tiny_prepared):
    ds = make(tiny_prepared, codec=HeatmapCodec((96, 128), (24, 32), 1.0))
    assert not ds.use_cache and ds[0][0].shape == (3, 128, 96)


def test_wrong_spec_or_split(tiny_prepared):
    with pytest.raises(DataError, match="babypose12"):
        make(tiny_prepared, spec=COCO17)
    with pytest.raises(DataError, match="no split"):
        make(tiny_prepared, split="holdout")

