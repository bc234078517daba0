import logging

import numpy as np
import pytest
import torch

from okdpose.model import CheckpointError, MultiOutHRNet, load_model, load_pretrained, save_checkpoint

J, WIDTH = 5, 4


def tiny(num_joints=J, width=WIDTH, n_stage=4, multi=True, seed=0) -> MultiOutHRNet:
    torch.manual_seed(seed)
    model = MultiOutHRNet(num_joints, width, n_stage, multi)
    for p in model.parameters():        # distinguishable from a fresh init
        p.data.normal_(0, 0.1)
    return model.eval()


def x() -> torch.Tensor:
    return torch.randn(1, 3, 64, 32, generator=torch.Generator().manual_seed(1))


def test_save_and_load_model_round_trip(tmp_path):
    model = tiny()
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(path, model, epoch=3, metrics={"AP": 0.5}, history=[1.0, 2.0])
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "okdpose" and raw["version"] == 1
    assert raw["model"] == {"num_joints": J, "width": WIDTH, "n_stage": 4, "multi": True}
    rebuilt, ckpt = load_model(path)
    assert ckpt["epoch"] == 3 and ckpt["metrics"] == {"AP": 0.5}
    with torch.no_grad():
        for a, b in zip(rebuilt.eval()(x()), model(x())):
            torch.testing.assert_close(a, b)
    assert not list(tmp_path.glob("sub/.*tmp"))           # atomic write left nothing behind


def test_save_refuses_reserved_and_unsafe_extras(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "a.pt", tiny(), state_dict={})
    with pytest.raises(TypeError, match="metrics"):
        save_checkpoint(tmp_path / "a.pt", tiny(), metrics={"AP": np.float64(0.5)})


def test_loading_into_a_truncated_model_reports_the_skipped_keys(tmp_path, caplog):
    full = tiny()
    save_checkpoint(tmp_path / "full.pt", full)
    small = MultiOutHRNet(J, WIDTH, 2, multi=True).eval()
    with caplog.at_level(logging.INFO, logger="okdpose.model.checkpoint"):
        report = load_pretrained(small, tmp_path / "full.pt")
    assert report.kind == "okdpose"
    assert set(report.loaded) == set(small.state_dict()) and not report.missing and not report.unused
    assert report.skipped["stage3.0.branches.0.0.conv1.weight"].startswith("trunk that feeds only stages after 2")
    assert "final_layer.weight" in report.skipped and "intermediate_layers.2.bias" in report.skipped
    assert "stage2.0.fuse_layers.1.0.0.0.weight" in report.skipped   # stage 2's unused fusion
    assert "skipped" in caplog.text and "full.pt" in caplog.text       # never silent
    with torch.no_grad():
        for a, b in zip(small(x()), full(x())[:2]):
            torch.testing.assert_close(a, b)


def test_other_joint_count_keeps_the_trunk_and_skips_the_head(tmp_path):
    official_like = tiny(num_joints=17, multi=False)
    torch.save(official_like.state_dict(), tmp_path / "pose.pth")   # plain state_dict, official style
    model = MultiOutHRNet(12, WIDTH, 4, multi=True)
    report = load_pretrained(model, tmp_path / "pose.pth")
    assert report.kind == "state_dict"
    assert set(report.skipped) == {"final_layer.weight", "final_layer.bias"}
    assert "(17, 4, 1, 1) in file vs (12, 4, 1, 1)" in report.skipped["final_layer.weight"]
    assert set(report.missing) == {f"{h}.{p}" for h in model.head_layer_names() for p in ("weight", "bias")}
    torch.testing.assert_close(model.conv1.weight, official_like.conv1.weight)


@pytest.mark.parametrize("wrap", ["module", "state_dict"])
def test_wrapped_state_dicts_load(tmp_path, wrap):
    src = tiny()
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    obj = sd if wrap == "module" else {"epoch": 7, "state_dict": sd, "perf": 0.7}
    torch.save(obj, tmp_path / "c.pth")
    model = MultiOutHRNet(J, WIDTH, 4, multi=True)
    report = load_pretrained(model, tmp_path / "c.pth")
    assert report.counts() == {"loaded": len(sd), "missing": 0, "unused": 0, "skipped": 0}


def test_foreign_keys_are_reported_unused(tmp_path, caplog):
    sd = dict(tiny().state_dict(), **{"extra_head.weight": torch.zeros(3)})
    torch.save(sd, tmp_path / "c.pth")
    with caplog.at_level(logging.WARNING, logger="okdpose.model.checkpoint"):
        report = load_pretrained(MultiOutHRNet(J, WIDTH, 4), tmp_path / "c.pth")
    assert report.unused == ["extra_head.weight"] and "unused" in caplog.text


# Files that are not checkpoints (garbage, text, pickled lists or code, truncated, empty, wrong
# width): the CHECKPOINT_CASES table in tests/test_bad_inputs.py.


def test_missing_file_and_foreign_files_for_load_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(MultiOutHRNet(J, WIDTH, 4), tmp_path / "nope.pth")
    torch.save(tiny().state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="load_pretrained"):
        load_model(tmp_path / "plain.pth")


def test_saving_the_same_weights_twice_gives_the_same_bytes(tmp_path):
    # torch.save(path) names the zip's folder after the (temporary) file: bytes differed every save
    torch.manual_seed(0)
    model = MultiOutHRNet(12, width=2, n_stage=2)
    a, b = tmp_path / "a.pt", tmp_path / "sub" / "b.pt"
    b.parent.mkdir()
    save_checkpoint(a, model, epoch=1)
    save_checkpoint(b, model, epoch=1)
    assert a.read_bytes() == b.read_bytes()
    loaded, extra = load_model(b)
    assert extra["epoch"] == 1 and all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_resume_state_round_trip_and_refusals(tmp_path):
    from okdpose.model.checkpoint import RESUME_VERSION, read_resume, save_resume

    path = tmp_path / "last.pt"
    assert read_resume(path) == (None, None)                     # no file: a fresh start, nothing to say
    save_resume(path, {"epoch": 2, "history": [{"val": {1: {"AP": 0.5}}}], "model": {"w": torch.ones(2)}})
    state, why = read_resume(path)
    assert why is None and state["format"] == "okdpose-last" and state["version"] == RESUME_VERSION == 2
    assert state["history"][0]["val"][1]["AP"] == 0.5 and torch.equal(state["model"]["w"], torch.ones(2))
    torch.save({**state, "version": 1}, path)
    assert read_resume(path) == (None, f"{path} is an okdpose resume checkpoint of version 1, this code reads "
                                       "version 2")
    save_checkpoint(path, tiny())
    assert read_resume(path) == (None, f"{path} is not an okdpose resume checkpoint")
    path.write_bytes(b"garbage")
    state, why = read_resume(path)
    assert state is None and why.startswith(f"{path} cannot be read (")
