"""Small file helpers shared by the stages: atomic writes (JSON, CSV, text, folders) and checksums.

Every output a later stage reads is written to a temporary file in the same folder and renamed
into place, so an interrupted stage never leaves a file that looks complete.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

_UMASK = os.umask(0)
os.umask(_UMASK)


def _tmp_prefix(path: Path) -> str:
    """The temporary names beside `path`: `.{name}.{pid}.*.tmp`, so that a later run can tell the
    leftovers of a killed process (SIGKILL, or SIGTERM's default action, skip every `finally`)
    from the live temporary of a concurrent one."""
    return f".{path.name}.{os.getpid()}."


def _sweep_leftovers(path: Path) -> None:
    """Remove temporaries beside `path` whose process has ended: otherwise a killed stage's
    half-written folder would sit inside a DVC output (cached, pushed) for good."""
    ours = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.[A-Za-z0-9_]+\.tmp")   # tempfile's random part
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for e in entries:
        m = ours.fullmatch(e.name)
        if m is None or _alive(int(m.group(1))):
            continue
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e, ignore_errors=True)
        else:
            e.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                          # exists, another user's
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_UMASK)   # mkstemp makes 0600; outputs are ordinary files
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    try:                                     # before the temporary exists: nothing to clean up
        text = json.dumps(obj, indent=indent, allow_nan=False) + "\n"
    except ValueError as e:                  # NaN / inf somewhere in obj: say which file and where
        raise ValueError(f"{path}: not written, a value is not finite (NaN / inf) at {_non_finite_at(obj)} "
                         f"({e})") from None
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _non_finite_at(obj: Any, where: str = "") -> str:
    """The first key path in `obj` holding a non-finite float ('?' when none is found)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the top level"
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite_at(v, f"{where}.{k}" if where else str(k))
        if found != "?":
            return found
    return "?"


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Rows (dicts) as a CSV table, atomically: the columns are every key in first-seen order, a
    missing value or a non-finite float is an empty cell (what pandas and DVC plots read as NaN)."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()}
                     for r in rows)
    write_text(path, buf.getvalue())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` (a folder).

    On failure the temporary folder is removed and an existing `path` is left untouched, so a
    half-built output never looks complete. If the rename itself fails (a busy or immutable
    folder), the previous `path` is put back and nothing beside it is left.
    """
    path = Path(path)
    if path.name in ("", ".", ".."):        # `.` has no name to build the temporary names from
        path = Path(os.path.abspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)                  # mkdtemp makes it 0700; the result is an ordinary folder
    try:
        yield tmp
        _replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename `tmp` onto `path`, moving an existing `path` aside first and back if that fails."""
    if not (path.exists() or path.is_symlink()):
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    try:
        os.replace(path, old / path.name)
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old / path.name, path)       # the previous output stays where it was
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def replace_problem(path: str | Path) -> str | None:
    """Why `atomic_dir(path)` could not put a new folder in place, or None: checked before the work
    (a folder that is the working directory or holds it, a mount point, a file on the way, no
    write permission on it or its parent, an immutable folder)."""
    path = Path(os.path.abspath(path))
    cwd = Path(os.getcwd())
    if path == cwd or path in cwd.parents:
        return "it is the current folder or holds it"
    parent = next((p for p in path.parents if p.exists() or p.is_symlink()), None)
    if parent is not None and not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if path.is_symlink() or not path.exists():
        target = path.parent if path.parent.exists() else parent
        if target is not None and not os.access(target, os.W_OK | os.X_OK):
            return f"no write permission in {target}"
        return None
    if not path.is_dir():
        return "it is a file, not a folder"
    if os.path.ismount(path):
        return "it is a mount point"
    # renaming a folder aside rewrites its `..`: it needs write permission on the folder itself,
    # which access() also denies for an immutable one (chattr +i), even to root
    for p in (path.parent, path):
        if not os.access(p, os.W_OK | os.X_OK):
            return f"no write permission on {p} (or it is immutable)"
    return None


def save_deterministic(obj: Any, path: str | Path) -> None:
    """`torch.save` through a file object: given a path, torch names the zip's top folder after the
    file, so the same weights written through a temporary name gave different bytes every time
    (and DVC a changed models/init.pt, retraining for nothing); through a file object it is always
    'archive', so equal contents give equal files."""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)
