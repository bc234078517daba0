"""okdpose.fingerprint: what decides a resume, the readable diff, and the code list = dvc.yaml deps."""
from pathlib import Path

import yaml

from okdpose.fingerprint import (NOT_FINGERPRINTED, TRAINING_CODE, code_digest, describe_changes, fingerprint,
                                 fingerprint_parts, training_params)

ROOT = Path(__file__).resolve().parents[1]


def test_training_code_is_the_train_okd_deps_under_src_okdpose():
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train-okd"]["deps"]
    listed = [d.removeprefix("src/okdpose/") for d in deps if d.startswith("src/okdpose/")]
    assert listed == list(TRAINING_CODE)
    assert all((ROOT / "src" / "okdpose" / n).exists() for n in TRAINING_CODE)


def test_parts_follow_params_init_data_not_how_the_run_executes(tiny_prepared, tmp_path):
    init = tmp_path / "init.pt"
    init.write_bytes(b"weights")
    flat = {"train.lr": 0.001, "train.device": "cpu", "train.workers": 2, "train.nproc_per_node": 4,
            "train.dist_timeout_s": 60, "train.val_batch_size": 16, "loss.kld_weight": 1.0, "evaluate.split": "test"}
    parts = fingerprint_parts(flat, ("loss.", "train."), init, tiny_prepared)
    assert parts["params"] == {"train.lr": 0.001, "loss.kld_weight": 1.0}     # not device / workers / evaluate
    assert set(NOT_FINGERPRINTED) == {"train.device", "train.workers", "train.nproc_per_node", "train.dist_timeout_s",
                                      "train.val_batch_size"}
    # the world size is last.pt's own field (the Trainer accepts a finished run at any)
    assert parts["code_sha256"] == code_digest() and set(parts) == {"params", "init_sha256", "data_sha256",
                                                                      "code_sha256"}
    assert fingerprint(parts) == fingerprint(dict(reversed(parts.items())))   # key order does not matter
    init.write_bytes(b"other weights")
    again = fingerprint_parts(flat, ("loss.", "train."), init, tiny_prepared)
    assert fingerprint(again) != fingerprint(parts)
    assert describe_changes(parts, again) == "init_sha256 changed"
    assert training_params({"train.lr": 1, "model.width": 4}, ("train.",)) == {"train.lr": 1}


def test_describe_changes_names_keys_and_abbreviates():
    assert describe_changes({"a": 1, "init_sha256": "x"}, {"a": 2, "init_sha256": "y"}) == "a: 1 -> 2, init_sha256 changed"
    assert describe_changes({"params": {"train.lr": 0.001}}, {"params": {"train.lr": 0.01}}) == \
        "params.train.lr: 0.001 -> 0.01"
    assert describe_changes({"a": 1}, {"a": 1, "b": 2}) == "b: '(unset)' -> 2"
    assert describe_changes({"a": 1}, {"a": 1}) == "fingerprint differs"
    many = describe_changes({f"k{i}": 0 for i in range(8)}, {f"k{i}": 1 for i in range(8)}, limit=2)
    assert many == "k0: 0 -> 1, k1: 0 -> 1, ... (8 in all)"
