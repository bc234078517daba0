"""atomic_dir: a failed rename puts the previous folder back and leaves nothing beside it;
replace_problem names what would make it fail, before the work."""
from __future__ import annotations

import os
import subprocess

import pytest

from okdpose import files
from okdpose.files import atomic_dir, replace_problem


def beside(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@pytest.mark.parametrize("failing", [0, 1])        # 0: moving the old folder aside fails, 1: renaming the new one
def test_failed_rename_keeps_the_previous_folder(tmp_path, monkeypatch, failing):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("old")
    calls = []
    real = os.replace

    def replace(src, dst):
        calls.append(src)
        if len(calls) == failing + 1:
            raise OSError(16, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="busy"):
        with atomic_dir(out) as tmp:
            (tmp / "summary.json").write_text("new")
    assert (out / "summary.json").read_text() == "old" and beside(out) == []     # no .tmp, no .old


def test_atomic_dir_of_dot_dot_names_its_temporaries(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(RuntimeError):
        with atomic_dir("..") as tmp:      # `..` has no name of its own: it was `...xyz.tmp` inside the cwd
            assert tmp.parent == tmp_path.parent and tmp.name.startswith(f".{tmp_path.name}.")
            raise RuntimeError("stop before the swap")
    assert not tmp.exists() and os.listdir(tmp_path) == ["work"]


def test_replace_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "current folder" in replace_problem(".") and "current folder" in replace_problem(tmp_path.parent)
    (tmp_path / "single.png").write_bytes(b"x")
    assert "single.png is a file" in replace_problem("single.png/sub")
    assert replace_problem("new/sub") is None and replace_problem(tmp_path / "new") is None
    out = tmp_path / "out"
    out.mkdir()
    assert replace_problem(out) is None
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
        pytest.skip("chattr +i needs root on a file system that has it")
    try:
        assert "immutable" in replace_problem(out)
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
