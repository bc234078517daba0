import cv2
import numpy as np
import pytest
import torch

from okdpose.explain_image import main
from okdpose.model import MultiOutHRNet, save_checkpoint
from okdpose.params import params_from_dict

DATA = {"image_size": [48, 64], "heatmap_size": [12, 16]}


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = MultiOutHRNet(12, 4, 2)
    p = params_from_dict({"data": DATA, "model": {"width": 4, "n_stage": 2}, "loss": {"kld_couples": [[1, 2]]}})
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, params=p.to_dict())
    return path


def depth_frame(tmp_path, bits: int):
    rng = np.random.default_rng(0)
    img = (rng.uniform(500, 1100, (120, 90)).astype(np.uint16) if bits == 16
           else rng.integers(0, 255, (120, 90, 3), dtype=np.uint8))
    path = tmp_path / f"frame{bits}.png"
    cv2.imwrite(str(path), img)
    return path


@pytest.mark.parametrize("bits", [8, 16])
def test_one_frame_one_picture_per_stage_and_method(tmp_path, ckpt, bits, capsys):
    frame, out = depth_frame(tmp_path, bits), tmp_path / "cam.png"
    assert main([str(frame), "--model", str(ckpt), "--all-stages", "--method", "gradcam", "eigencam",
                 "--joint", "right_hand", "--box", "10", "20", "60", "80", "--out", str(out)]) == 0
    pic = cv2.imread(str(out))
    assert pic.shape[0] > pic.shape[1] / 3 * 1.5      # 2 rows (stages) x 3 columns
    assert "stages [1, 2]" in capsys.readouterr().out
    assert main([str(frame), "--model", str(ckpt), "--stage", "1"]) == 0     # whole frame, eigencam, default name
    assert (tmp_path / f"frame{bits}_cam.png").is_file()


def test_errors_name_the_fix(tmp_path, ckpt, capsys):
    frame = depth_frame(tmp_path, 16)
    assert main([str(frame), "--model", str(ckpt), "--joint", "nose"]) == 2
    assert "right_hand" in capsys.readouterr().err
    assert main([str(frame), "--model", str(ckpt), "--stage", "3"]) == 2
    assert "outputs stages [1, 2]" in capsys.readouterr().err
    onnx = tmp_path / "stage2.onnx"
    onnx.write_bytes(b"x")
    assert main([str(frame), "--model", str(onnx)]) == 2
    assert "exported student cannot be explained" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.png"), "--model", str(ckpt)]) == 2
    assert "missing.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(frame), "--method", "fullgrad"])


def one_line(err: str) -> str:
    """The CLI's error: one line, no traceback."""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("box, problem", [
    (["nan", "nan", "10", "10"], "not four finite numbers"),
    (["0", "0", "inf", "10"], "not four finite numbers"),
    (["0", "0", "nan", "nan"], "not four finite numbers"),
    (["1e9", "1e9", "10", "10"], "lies outside the frame"),
    (["-50", "0", "40", "10"], "lies outside the frame"),
    (["0", "0", "1e-9", "1e-9"], "at least 1 px"),
    (["0", "0", "10", "0"], "at least 1 px"),
    (["0", "0", "1e30", "10"], "of it lies on the frame"),      # overlaps, but crops almost only padding
    (["-100", "0", "120", "120"], "16.7% of it lies on the frame"),
])
def test_box_must_be_a_person_box_on_the_frame(tmp_path, ckpt, capsys, box, problem):
    frame, out = depth_frame(tmp_path, 16), tmp_path / "cam.png"
    assert main([str(frame), "--model", str(ckpt), "--box", *box, "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("okdpose explain: --box ") and problem in err and "frame is 90x120 px" in err
    assert not out.exists()


def test_stage_0_is_refused_not_the_last(tmp_path, ckpt, capsys):
    frame, out = depth_frame(tmp_path, 16), tmp_path / "cam.png"
    for stage in ("0", "-1"):
        assert main([str(frame), "--model", str(ckpt), "--stage", stage, "--out", str(out)]) == 2
        assert f"--stage {stage}: " in one_line(capsys.readouterr().err)
    assert not out.exists()


def released_file(tmp_path, num_joints: int, n_stage: int = 2):
    """A plain state dict (an original HRNet-like file) of a W4 model predicting `num_joints`."""
    torch.manual_seed(0)
    path = tmp_path / f"hrnet_j{num_joints}.pth"
    torch.save(MultiOutHRNet(num_joints, 4, n_stage).state_dict(), path)
    (tmp_path / "params.yaml").write_text("data: {image_size: [48, 64], heatmap_size: [12, 16], joints: babypose12}\n")
    return path


@pytest.mark.parametrize("num_joints, fix", [(17, "set data.joints: coco17"), (5, "no okdpose joint set")])
def test_released_file_of_another_joint_count(tmp_path, capsys, num_joints, fix):
    frame, out, model = depth_frame(tmp_path, 16), tmp_path / "cam.png", released_file(tmp_path, num_joints)
    params = tmp_path / "params.yaml"
    assert main([str(frame), "--model", str(model), "--params", str(params), "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{model} predicts {num_joints} joints, {params} data.joints (babypose12) has 12" in err and fix in err
    assert not out.exists()
    assert main([str(frame), "--model", str(released_file(tmp_path, 12)), "--params", str(params),
                 "--out", str(out)]) == 0                                   # the same file of the right count works


def test_non_finite_outputs_stop_naming_model_and_stage(tmp_path, capsys):
    torch.manual_seed(0)
    model = MultiOutHRNet(12, 4, 2)
    with torch.no_grad():                       # finite weights whose outputs overflow to inf / NaN
        for t in model.parameters():
            if t.ndim > 1:
                t.fill_(1e10)
    p = params_from_dict({"data": DATA, "model": {"width": 4, "n_stage": 2}, "loss": {"kld_couples": [[1, 2]]}})
    path, frame, out = tmp_path / "big.pt", depth_frame(tmp_path, 16), tmp_path / "cam.png"
    save_checkpoint(path, model, params=p.to_dict())
    assert main([str(frame), "--model", str(path), "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{path}: stage 2 heatmaps" in err and "non-finite" in err
    assert not out.exists()


def test_out_is_checked_before_any_work(tmp_path, ckpt, capsys, monkeypatch):
    frame = depth_frame(tmp_path, 16)
    folder, afile = tmp_path / "out", tmp_path / "afile"
    folder.mkdir()
    afile.write_text("keep")
    before = {f: f.read_bytes() for f in (frame, ckpt, afile)}
    for out, problem in ((folder, "is a folder"), (afile / "x.png", "is a file, not a folder"),
                         (afile / "sub" / "x.png", "is a file, not a folder"),
                         (frame, "is the input frame"), (ckpt, "is the model file")):
        assert main([str(frame), "--model", str(ckpt), "--out", str(out)]) == 2
        err = one_line(capsys.readouterr().err)
        assert err.startswith(f"okdpose explain: --out {out}: ") and problem in err
    assert {f: f.read_bytes() for f in before} == before and list(folder.iterdir()) == []
    import okdpose.explain_image as ei
    monkeypatch.setattr(ei.os, "access", lambda *a, **k: False)      # root ignores chmod: fake an unwritable folder
    assert main([str(frame), "--model", str(ckpt), "--out", str(folder / "x.png")]) == 2
    assert "is not writable" in one_line(capsys.readouterr().err)


def test_folders_are_named_folders(tmp_path, ckpt, capsys):
    frame, out = depth_frame(tmp_path, 16), tmp_path / "cam.png"
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "dir.pt").mkdir()
    assert main([str(tmp_path / "dir.png"), "--model", str(ckpt), "--out", str(out)]) == 2
    assert "dir.png: is a folder" in one_line(capsys.readouterr().err)
    assert main([str(frame), "--model", str(tmp_path / "dir.pt"), "--out", str(out)]) == 2
    assert "dir.pt: is a folder" in one_line(capsys.readouterr().err)


def test_unwritable_out_is_one_line(tmp_path, ckpt, capsys, monkeypatch):
    import okdpose.files

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(okdpose.files.Path, "write_bytes", full)
    out = tmp_path / "cam.png"
    assert main([str(depth_frame(tmp_path, 16)), "--model", str(ckpt), "--out", str(out)]) == 2
    assert f"--out {out}: cannot be written (No space left on device)" in one_line(capsys.readouterr().err)
    assert not out.exists() and not list(tmp_path.glob(".cam.png*"))      # no temporary left beside it


def test_a_box_half_on_the_frame_is_a_person_at_the_edge(tmp_path, ckpt):
    frame, out = depth_frame(tmp_path, 16), tmp_path / "cam.png"
    assert main([str(frame), "--model", str(ckpt), "--box", "-40", "0", "80", "120", "--out", str(out)]) == 0
    assert out.is_file()


@pytest.mark.parametrize("name, magic", [("cam.jpg", b"\xff\xd8\xff"), ("cam.JPEG", b"\xff\xd8\xff"),
                                         ("cam.png", b"\x89PNG"), ("cam.webp", b"RIFF")])
def test_the_picture_is_in_the_format_its_suffix_names(tmp_path, ckpt, name, magic):
    frame, out = depth_frame(tmp_path, 16), tmp_path / name
    assert main([str(frame), "--model", str(ckpt), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(magic)
    assert cv2.imread(str(out)).ndim == 3


@pytest.mark.parametrize("name, problem", [("cam", "has no picture suffix"), ("cam.txt", "'.txt' is not a picture type"),
                                           ("cam.pt", "'.pt' is not a picture type")])
def test_an_out_that_is_no_picture_type_is_refused_before_any_work(tmp_path, ckpt, capsys, name, problem):
    frame, out = depth_frame(tmp_path, 16), tmp_path / name
    assert main([str(frame), "--model", str(ckpt), "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert problem in err and ".png, .jpg" in err and f"--out {out.with_suffix('.png')}" in err
    assert not out.exists()
