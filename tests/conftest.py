"""Shared fixtures. Data: a tiny built-in data set (1 subject x 3 frames per split), generated and
prepared once per test session; tests that modify it work on copies."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from okdpose.data.coco import prepare_dataset
from okdpose.data.fetch import fetch_raw
from okdpose.joints import BABYPOSE12
from okdpose.params import SyntheticParams

TINY = SyntheticParams(seed=3, subjects=(1, 1, 1), frames_per_subject=3)
TINY_IMAGE_SIZE = (48, 64)
DEPTH_RANGE = (400.0, 1200.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs torch on one thread: the models are tiny (one thread is faster for them) and
    the results do not depend on what else runs on the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "babypose"
    fetch_raw(root, "synthetic", synthetic=TINY, spec=BABYPOSE12, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_prepared(tiny_raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "prepared"
    prepare_dataset(tiny_raw, out, BABYPOSE12, TINY_IMAGE_SIZE, DEPTH_RANGE, progress=False)
    return out


@pytest.fixture
def folder(tiny_raw, tmp_path) -> Path:
    """The tiny test split as a folder of 16-bit depth PNGs (built by tests/test_frames.py)."""
    from test_frames import depth_folder

    return depth_folder(tiny_raw, tmp_path / "frames")


@pytest.fixture
def video(folder, tmp_path) -> Path:
    """`folder` as an MP4 (8-bit grey frames)."""
    from test_frames import write_mp4

    return write_mp4(folder, tmp_path / "rec.mp4")


@pytest.fixture
def fake_launcher(monkeypatch):
    """Replaces the launcher subprocess of `okdpose.distributed` (outside any launcher's environment):
    `fake_launcher(code)` -> the list the commands it was started with are appended to."""
    from okdpose import distributed

    for name in distributed.LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)

    def install(code: int) -> list:
        calls: list = []

        class Launcher:                       # subprocess.Popen, exiting with `code`
            def __init__(self, cmd):
                calls.append(cmd)

            def wait(self):
                return code

        monkeypatch.setattr(distributed.subprocess, "Popen", Launcher)
        return calls

    return install
