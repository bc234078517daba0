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


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid                            # reaped: no process has this id now (until reused)


def test_a_killed_writers_temporaries_are_swept_a_live_ones_kept(tmp_path):
    out = tmp_path / "prepared"
    dead, live = _dead_pid(), os.getppid()              # the parent (pytest's launcher) outlives this test
    stale_dir = tmp_path / f".prepared.{dead}.ab12_cd.tmp"
    stale_dir.mkdir()
    (stale_dir / "half.npy").write_bytes(b"x" * 100)     # what SIGTERM's default action leaves behind
    stale_file = tmp_path / f".report.json.{dead}.k9x.tmp"
    stale_file.write_text("{")
    other = tmp_path / f".prepared.{live}.zz9.tmp"        # a concurrent run's live temporary
    other.mkdir()
    unrelated = [tmp_path / ".prepared.5.x.y.tmp", tmp_path / ".prepared.old.tmp", tmp_path / f".prepared2.{dead}.a.tmp"]
    for u in unrelated:
        u.write_text("keep")
    with atomic_dir(out) as tmp:
        assert tmp.name.startswith(f".prepared.{os.getpid()}.")
        (tmp / "meta.json").write_text("{}")
    assert (out / "meta.json").exists() and not stale_dir.exists() and other.is_dir()
    assert all(u.read_text() == "keep" for u in unrelated)
    assert stale_file.exists()                            # another target's: swept when that one is written
    files.write_json(tmp_path / "report.json", {"ok": 1})
    assert not stale_file.exists() and (tmp_path / "report.json").read_text() == '{\n  "ok": 1\n}\n'


def test_a_non_finite_json_value_is_named_and_nothing_written(tmp_path):
    path = tmp_path / "eval.json"
    with pytest.raises(ValueError, match=r"eval.json: not written, a value is not finite .* at stage3\.ap"):
        files.write_json(path, {"stage2": {"ap": 0.5}, "stage3": {"ap": float("nan")}})
    assert os.listdir(tmp_path) == []
