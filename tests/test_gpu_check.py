"""okdpose.gpu_check: the paper preset through the Trainer, run here on the CPU with a tiny model
(the GPU run is scripts/gpu_check.sh), so that the check cannot rot."""
import pytest
import torch

from okdpose.gpu_check import check_params, main, run_check

TINY = {"model.width": 4, "data.image_size": [32, 64], "data.heatmap_size": [8, 16], "train.batch_size": 2}


def test_params_are_the_preset_with_synthetic_data_and_one_epoch():
    p = check_params("presets/paper_hrnet4_okd.yaml", "cpu", 3, {})
    assert p.data.source == "synthetic" and p.data.synthetic.subjects == (3, 1, 1)
    assert p.data.synthetic.frames_per_subject == 32 == p.train.batch_size
    assert p.model.pretrained is None and p.train.epochs == 1 and p.train.device == "cpu"
    assert (p.model.width, p.model.n_stage, p.loss.kld_couples, p.train.channels_last) == (32, 4, ((3, 4),), True)


def test_one_epoch_of_the_paper_config_trains_validates_and_resumes_on_cpu(tmp_path):
    r = run_check("cpu", steps=2, overrides=TINY, workdir=tmp_path)
    assert r["steps"] == 2 and r["resumed_from"] == 1 and r["precision"] == "fp32"
    assert r["img_per_s"] > 0 and r["peak_memory_gib"] is None
    assert r["device"].startswith("device cpu") and r["device"].endswith("memory format channels-last")
    assert not torch.distributed.is_initialized()          # its one-process group is gone


def test_without_a_gpu_it_exits_2_saying_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--device", "cuda"]) == 2
    assert "no CUDA GPU visible" in capsys.readouterr().err


def test_bad_override_is_refused():
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--set", "train.precision"])
