"""presets/*.yaml: full, valid params files; the paper preset holds the paper's setting."""
from pathlib import Path

import pytest
import yaml

from okdpose.losses import kld_weight_from_original
from okdpose.params import load_params

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


def flat_keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= flat_keys(v, key + ".") if isinstance(v, dict) else {key}
    return out


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_is_a_full_valid_params_file(path):
    load_params(path)                                  # raises ParamsError naming the key
    ours = flat_keys(yaml.safe_load(path.read_text()))
    reference = flat_keys(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert ours == reference, (f"{path.name} must list every key of params.yaml: missing "
                               f"{sorted(reference - ours)}, extra {sorted(ours - reference)}")


def test_paper_preset_matches_the_paper_setting():
    p = load_params(ROOT / "presets" / "paper_hrnet4_okd.yaml")
    assert (p.model.width, p.model.n_stage, p.model.multi) == (32, 4, True)
    assert p.model.pretrained == "pretrained/pose_hrnet_w32_256x192.pth"
    assert p.data.image_size == (192, 256) and p.data.heatmap_size == (48, 64) and p.data.sigma == 2.0
    assert not p.data.augment.enabled
    t = p.train
    assert (t.optimizer, t.lr, t.lr_steps, t.lr_factor, t.epochs, t.batch_size, t.patience) == \
        ("adam", 7.5e-4, (30, 50), 0.33, 60, 32, 12)
    assert p.loss.kld_couples == ((3, 4),) and p.loss.use_kld and not p.loss.use_target_weight
    assert p.loss.kld_weight == kld_weight_from_original(2000, 12, p.data.heatmap_size) == 7.8125
    assert not p.loss.detach_teacher and p.loss.rampup_epochs == 0
    assert p.kd_stages() == (3, 4) and not p.evaluate.flip_test
