from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from okdpose.codec import HeatmapCodec
from okdpose.data.dataset import PoseDataset
from okdpose.inference import predict
from okdpose.joints import BABYPOSE12
from okdpose.model import MultiOutHRNet

from conftest import TINY_IMAGE_SIZE

SPEC = BABYPOSE12
J = SPEC.num_joints
CODEC = HeatmapCodec(TINY_IMAGE_SIZE, (TINY_IMAGE_SIZE[0] // 4, TINY_IMAGE_SIZE[1] // 4), 1.0)


# ------------------------------------------------------------------ stubs

class StubDataset(Dataset):
    """What `predict` reads of a PoseDataset (codec, records.ann_id, flip_perm, the samples) with
    chosen images, boxes and ids: detection boxes (ann_id -1), targets all zero."""

    def __init__(self, images, centers, scales, hm_size, image_ids=None):
        self.images, self.centers, self.scales = images, centers, scales
        self.image_ids = image_ids if image_ids is not None else list(range(1, len(images) + 1))
        h, w = np.shape(images[0])[1:]
        self.codec = HeatmapCodec((w, h), hm_size, 2.0)
        self.records = SimpleNamespace(ann_id=np.full(len(images), -1, np.int64))
        self.flip_perm = SPEC.flip_permutation()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        w, h = self.codec.heatmap_size
        meta = {"image_id": self.image_ids[i], "index": i, "center": np.asarray(self.centers[i], np.float32),
                "scale": np.asarray(self.scales[i], np.float32), "score": 1.0}
        return torch.as_tensor(self.images[i]), torch.zeros(J, h, w), torch.ones(J), meta


class FixedModel(nn.Module):
    """Returns the same heatmaps for every input, for `n` stage outputs."""

    def __init__(self, heatmaps, n=1):
        super().__init__()
        self.hm = torch.as_tensor(heatmaps, dtype=torch.float32)
        self.output_stages = tuple(range(1, n + 1))
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return [self.hm.expand(x.shape[0], -1, -1, -1).clone() for _ in self.output_stages]


class MirrorModel(nn.Module):
    """Heatmaps = 4x average pool of channel 0, right joints see the image's left half, left joints
    the right half: model(flip(x)) = flip(model(x)) with left/right joints swapped."""

    output_stages = (4,)

    def forward(self, x):
        pooled = nn.functional.avg_pool2d(x[:, :1], 4)                  # (B, 1, H/4, W/4)
        w = pooled.shape[-1]
        left_half = torch.arange(w) < w // 2
        mask = torch.stack([left_half if SPEC.names[j].startswith("right") else ~left_half for j in range(J)])
        return [pooled * mask[None, :, None, :].float()]


# ------------------------------------------------------------------ decoding and flip test

def test_decoding_vector_through_predict():
    """DESIGN §4: peak (10, 20), right .5 > left .2, up .3 > down .1 -> (10.25, 19.75) heatmap px ->
    (214.0625, 123.4375) with center (300, 200), scale (1.5, 2.0) on 48x64 heatmaps."""
    hm = np.zeros((J, 64, 48), np.float32)
    hm[:, 20, 10], hm[:, 20, 11], hm[:, 20, 9], hm[:, 19, 10], hm[:, 21, 10] = 1.0, 0.5, 0.2, 0.3, 0.1
    ds = StubDataset([np.zeros((3, 256, 192), np.float32)] * 3, [(300, 200)] * 3, [(1.5, 2.0)] * 3, (48, 64))
    model = FixedModel(hm, n=2)
    model.train()
    preds = predict(model, ds, batch_size=2)
    assert model.training                       # mode restored
    assert preds.stages == (1, 2) and preds.coords.shape == (2, 3, J, 2)
    np.testing.assert_allclose(preds.coords, np.broadcast_to([214.0625, 123.4375], (2, 3, J, 2)), atol=1e-4)
    np.testing.assert_allclose(preds.maxvals, 1.0)
    np.testing.assert_array_equal(preds.hm_coords[..., 0], 10)
    np.testing.assert_array_equal(preds.hm_coords[..., 1], 20)
    np.testing.assert_allclose(preds.areas, 1.5 * 2.0 * 200 * 200)
    assert preds.image_ids.tolist() == [1, 2, 3] and preds.ann_ids.tolist() == [-1, -1, -1]


def symmetric_image(h=64, w=32, col=8, row=28):
    """A left-right symmetric image: two bright 4x4 blocks on the pooling grid, mirrored."""
    img = np.zeros((3, h, w), np.float32)
    img[:, row:row + 4, col:col + 4] = 1.0
    img[:, row:row + 4, w - col - 4:w - col] = 1.0
    assert np.array_equal(img, img[:, :, ::-1])
    return img


def test_flip_test_on_a_symmetric_input_gives_the_known_quarter_pixel_shift():
    center, scale = (300.0, 200.0), (0.8, 1.6)
    ds = StubDataset([symmetric_image()], [center], [scale], (8, 16))
    model = MirrorModel()
    plain = predict(model, ds)
    flipped = predict(model, ds, flip_test=True)
    # plain: right joints peak at heatmap column 2, left ones at 5, row 7, no refinement (zero neighbours)
    right = np.array([n.startswith("right") for n in SPEC.names])
    np.testing.assert_array_equal(plain.hm_coords[0, 0, right, 0], 2)
    np.testing.assert_array_equal(plain.hm_coords[0, 0, ~right, 0], 5)
    # flip test: flip_back (mirror, swap pairs, shift one column) puts each joint's peak one column
    # right of the plain one; the average (0.5 | 0.5) decodes a quarter pixel right of the plain peak
    frame_px_per_hm_px = scale[0] * 200 / 8
    np.testing.assert_allclose(flipped.coords - plain.coords,
                               np.broadcast_to([0.25 * frame_px_per_hm_px, 0.0], plain.coords.shape), atol=1e-4)
    np.testing.assert_allclose(flipped.maxvals, plain.maxvals * 0.5)
    # without swapping the flip pairs, each joint would average with its mirror image's peak
    wrong = predict(model, ds, flip_test=True, flip_perm=np.arange(J))
    assert not np.allclose(wrong.coords, flipped.coords)
    assert flipped.codec == ds.codec and flipped.flip_test and not plain.flip_test


def test_flip_test_needs_a_permutation():
    ds = StubDataset([symmetric_image()], [(300, 200)], [(0.8, 1.6)], (8, 16))
    ds.flip_perm = None
    with pytest.raises(ValueError, match="flip_perm"):
        predict(MirrorModel(), ds, flip_test=True)


def test_heatmaps_of_another_size_than_the_codec_are_refused():
    ds = StubDataset([symmetric_image()], [(300, 200)], [(0.8, 1.6)], (8, 16))
    ds.codec = HeatmapCodec((64, 128), (16, 32), 2.0)
    with pytest.raises(ValueError, match="heatmap_size"):
        predict(MirrorModel(), ds)


# ------------------------------------------------------------------ a real (tiny) model

def test_predict_runs_the_folded_copy_and_matches_the_model_itself(tiny_prepared, monkeypatch):
    torch.manual_seed(0)
    model = MultiOutHRNet(J, width=2, n_stage=2, multi=True)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):   # BNs that fold into something
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.running_var, 0.5, 2.0)
        nn.init.uniform_(bn.running_mean, -0.1, 0.1)
    ds = PoseDataset(tiny_prepared, "test", SPEC, CODEC)
    import okdpose.model.fuse as fuse

    made = []
    real = fuse.inference_copy
    monkeypatch.setattr(fuse, "inference_copy", lambda m, **kw: made.append(m) or real(m, **kw))
    fast = predict(model, ds, batch_size=2)
    exact = predict(model, ds, batch_size=2, fold_bn=False)
    assert made == [model]                      # one copy per call, only with fold_bn
    assert not any(isinstance(m, nn.Identity) and n.endswith("bn1") for n, m in model.named_modules())
    # folding changes the float rounding (by an amount that depends on the CPU's kernels), so the
    # outputs agree to a bound relative to their scale, and the decoded points wherever the
    # decoding is not a near-tie that such rounding could tip (argmax runner-up, refinement side)
    scale = np.abs(exact.maxvals).max()
    np.testing.assert_allclose(fast.maxvals, exact.maxvals, rtol=0, atol=1e-4 * scale)
    with torch.no_grad():
        hm = np.stack([o.numpy() for o in model.eval()(torch.stack([ds[i][0] for i in range(len(ds))]))])
    flat = np.sort(hm.reshape(*hm.shape[:3], -1), axis=-1)                     # (S, N, J, H*W)
    # measured |folded - exact| <= 2.7e-7 x scale on a 2-core AVX2 CPU; 1e-5 leaves ~40x for other kernels
    clear = flat[..., -1] - flat[..., -2] > 1e-5 * scale                      # no runner-up within reach
    np.testing.assert_array_equal(fast.hm_coords[clear], exact.hm_coords[clear])
    frame_px = exact.scales[None, :, None, :1] * 200 / CODEC.heatmap_size[0]   # frame px per heatmap px
    err = np.abs(fast.coords - exact.coords)
    assert (err[clear] <= 0.25 * np.broadcast_to(frame_px, err.shape)[clear] + 1e-3).all()   # one refinement flip at most
    assert clear.mean() > 0.8 and (err.max(axis=-1) < 1e-3).mean() > 0.8       # and most points agree exactly


def test_a_subset_keeps_the_annotation_ids(tiny_prepared):
    torch.manual_seed(0)
    model = MultiOutHRNet(J, width=2, n_stage=2, multi=True)
    ds = PoseDataset(tiny_prepared, "test", SPEC, CODEC)
    full = predict(model, ds, batch_size=2, flip_test=True)
    assert (full.ann_ids >= 0).all() and full.ann_ids.tolist() == ds.records.ann_id.tolist()
    sub = predict(model, Subset(ds, [2, 0]), flip_test=True)       # rows map back to the records
    assert sub.ann_ids.tolist() == [int(ds.records.ann_id[2]), int(ds.records.ann_id[0])]
    np.testing.assert_allclose(sub.coords, full.coords[:, [2, 0]], atol=1e-3)
