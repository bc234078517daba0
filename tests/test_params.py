from pathlib import Path

import pytest

from okdpose.params import Params, ParamsError, load_params, params_for_checkpoint, params_from_dict

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


NON_FINITE = [float("nan"), float("inf"), -float("inf"), 10 ** 400]


@pytest.mark.parametrize("key", ["data.sigma", "train.lr", "loss.kld_weight", "loss.teacher_weight",
                                 "loss.temperature", "loss.rampup_epochs", "train.grad_clip", "train.momentum",
                                 "train.weight_decay", "data.synthetic.noise_mm", "evaluate.image_thre",
                                 "data.depth_range"])
@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf", "10**400"])
def test_non_finite_numbers_are_refused_by_key(key, value):
    # NaN passes every `x < 0` / `x <= 0` check; before, these reached torch / the codec as tracebacks
    section, _, name = key.rpartition(".")
    raw: dict = {}
    d = raw
    for part in section.split("."):
        d = d.setdefault(part, {})
    d[name] = [0.0, value] if name == "depth_range" else value
    with pytest.raises(ParamsError, match="finite number") as err:
        params_from_dict(raw)
    assert key in str(err.value)


@pytest.mark.parametrize("raw, words", [
    ({"train": {"seed": -1}}, ["train.seed", "0..2**32-1"]),
    ({"data": {"synthetic": {"seed": -1}}}, ["data.synthetic.seed"]),
    ({"explain": {"seed": 2 ** 40}}, ["explain.seed"]),
    ({"train": {"momentum": -1.0}}, ["train.momentum", "[0, 1)"]),
    ({"train": {"momentum": 1.0}}, ["train.momentum"]),
    ({"train": {"weight_decay": -1.0}}, ["train.weight_decay", ">= 0"]),
    ({"evaluate": {"image_thre": 2.0}}, ["evaluate.image_thre"]),
    ({"train": {"epochs": 10 ** 30}}, ["train.epochs", "2**63"]),
])
def test_values_torch_or_numpy_would_refuse_later_are_refused_by_key(raw, words):
    with pytest.raises(ParamsError) as err:
        params_from_dict(raw)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("text, words", [
    ("on: true\n", ["True", "quote"]),                         # YAML 1.1 reads `on` as a boolean
    ("null: a\n", ["None", "quote"]),
    ("train:\n  2: x\n  trainn: 1\n", ["train: key 2", "quote"]),   # mixed key types once broke sorted()
])
def test_keys_that_yaml_reads_as_values_are_named(tmp_path, text, words):
    f = tmp_path / "params.yaml"
    f.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params(f)
    for w in [str(f)] + words:
        assert w in str(err.value)


@pytest.mark.parametrize("text", ["", "\n  \n", "# all commented out\n# train:\n#   lr: 1\n", "---\n", "null\n"])
def test_a_params_file_without_params_is_refused_not_read_as_defaults(tmp_path, text):
    f = tmp_path / "params.yaml"
    f.write_text(text)
    for load in (load_params, lambda p: params_for_checkpoint(p, {"width": 8, "n_stage": 4, "multi": True})):
        with pytest.raises(ParamsError, match="holds no params") as err:
            load(f)
        assert str(f) in str(err.value) and "write {}" in str(err.value)
    f.write_text("{}\n")                                 # every default, said so explicitly
    assert load_params(f) == Params()
    with pytest.raises(ParamsError, match="is a folder"):
        params_for_checkpoint(tmp_path, {"width": 8, "n_stage": 4, "multi": True})


def test_unreadable_params_files_are_named(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_bytes("# réglages\nloss:\n  kld_weight: 0.5\n".encode("latin-1"))
    with pytest.raises(ParamsError, match="not UTF-8") as err:
        load_params(f)
    assert str(f) in str(err.value)
    with pytest.raises(ParamsError, match="is a folder"):
        load_params(tmp_path)
    onnx_like = tmp_path / "stage3.onnx"
    onnx_like.write_bytes(b"\x08\x07\x12\x07pytorch\xff\xfe")
    with pytest.raises(ParamsError, match="not UTF-8"):
        load_params(onnx_like)
