from pathlib import Path

import pytest

from okdpose.params import Params, ParamsError, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_load_and_match_defaults():
    p = load_params(ROOT / "params.yaml")
    assert p == Params().validate(), "params.yaml and the dataclass defaults have drifted apart"
    assert p.kd_stages() == (1, 2, 3, 4)
    assert p.output_stages() == (1, 2, 3, 4)
    assert p.flat()["loss.kld_weight"] == p.loss.kld_weight


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"loss": {"kld_couples": [[4, 3]]}}, ["kld_couples[0]", "after"]),
        ({"loss": {"kld_couples": [[3, 3]]}}, ["kld_couples[0]", "after"]),
        ({"loss": {"kld_couples": [[2, 5]]}}, ["kld_couples[0]", "n_stage"]),
        ({"model": {"n_stage": 3}, "loss": {"kld_couples": [[3, 4]]}}, ["kld_couples[0]", "n_stage (3)"]),
        ({"loss": {"kld_couples": [[2, 4], [2, 4]]}}, ["kld_couples[1]", "duplicate"]),
        ({"model": {"multi": False}}, ["multi"]),
        ({"loss": {"kld_weigth": 1.0}}, ["loss.kld_weigth", "kld_weight"]),
        ({"data": {"source": "ftp"}}, ["data.source", "synthetic"]),
        ({"data": {"source": "url", "url": "http://x/y.zip"}}, ["sha256"]),
        ({"data": {"image_size": [96, 128], "heatmap_size": [48, 64]}}, ["heatmap_size"]),
        ({"train": {"epochs": "ten"}}, ["train.epochs", "integer"]),
        ({"train": {"lr_steps": [5, 3]}}, ["lr_steps"]),
        ({"train": {"nproc_per_node": 0}}, ["train.nproc_per_node", ">= 1"]),
        ({"train": {"val_batch_size": 0}}, ["train.val_batch_size", ">= 1", "out of memory"]),
        ({"train": {"dist_timeout_s": 0}}, ["train.dist_timeout_s", ">= 1 second"]),
        ({"model": {"n_stage": 5}}, ["model.n_stage"]),
        ({"data": {"joints": "mpii"}}, ["data.joints"]),
        ({"data": {"image_size": [100, 128], "heatmap_size": [25, 32]}}, ["data.image_size", "multiple of 32"]),
        ({"explain": {"precision": "fp8"}}, ["explain.precision", "'fp8'", "bf16"]),
    ],
)
def test_bad_params_name_the_key(raw, words):
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw)
    for w in words:
        assert w in str(err.value)


def test_kd_off_allows_single_output_and_empty_couples():
    p = params_from_dict({"model": {"multi": False}, "loss": {"use_kld": False, "kld_couples": []}})
    assert p.kd_stages() == (4,)
    assert p.output_stages() == (4,)


def test_overrides_and_file_errors(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("loss:\n  kld_weight: 0.5\n")
    assert load_params(f, {"model.n_stage": 4}).loss.kld_weight == 0.5
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    f.write_text("loss: [1, 2\n")
    with pytest.raises(ParamsError, match="YAML"):
        load_params(f)
