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
