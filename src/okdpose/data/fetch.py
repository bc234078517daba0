"""Bring a data set in the BabyPose layout to `data/raw/<name>/`.

Sources (params `data.source`):
- synthetic: the built-in generator (`okdpose.data.synthetic`).
- local: an existing folder in the layout. Its layout files are *copied*, not hard-linked:
  DVC caches `data/raw`, and a hard link would share the inode with the user's original, so
  DVC's cache protection could make the original read-only and an in-place edit of the
  original would silently change a tracked output. A copy costs disk once; configure DVC's
  cache (`cache.type reflink,hardlink`) to avoid a second copy inside DVC.
- archive: a .zip / .tar(.gz|.bz2|.xz) file, sha256-checked when `data.sha256` is set.
- url: an http(s) archive with a required sha256: streamed to `<download_dir>/<name>.part`
  with a progress bar, resumed with HTTP Range requests after a dropped connection (also in a
  later run), verified, then kept beside as the finished file so a re-run does not download again.

Archives are extracted member by member: absolute paths, `..`, symlinks, hard links and
device files are refused (zip-slip and friends). The result is validated against the layout
and only then moved into place: everything is built in a temporary folder beside the target.
"""
from __future__ import annotations

import gzip
import http.client
import lzma
import os
import shutil
import socket
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from okdpose.data.layout import SPLITS, find_layout_root, image_dir, layout_entries, validate_layout
from okdpose.files import atomic_dir, sha256_file
from okdpose.joints import JointSpec, get_joint_spec
from okdpose.params import SyntheticParams


class FetchError(RuntimeError):
    """The data could not be brought in; the message says what failed and how to fix it."""


class ChecksumError(FetchError):
    pass


class UnsafeArchiveError(FetchError):
    pass


# --------------------------------------------------------------------------- entry point

def fetch_raw(dest: str | Path, source: str, *, path: str | None = None, url: str | None = None,
              sha256: str | None = None, synthetic: SyntheticParams | None = None,
              spec: JointSpec | str = "babypose12", download_dir: str | Path = "data/downloads",
              workers: int = 1, progress: bool = True, retries: int = 5) -> dict:
    """Materialise the data set at `dest` (replaced atomically); return a small report.
    `synthetic`: the generator's settings (params `data.synthetic`; None: the defaults)."""
    spec = get_joint_spec(spec) if isinstance(spec, str) else spec
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        report: dict = {"source": source}
        if source == "synthetic":
            from okdpose.data.synthetic import generate_dataset

            generate_dataset(tmp, synthetic or SyntheticParams(), spec, workers=workers, progress=progress)
        elif source == "local":
            if not path:
                raise FetchError("data.source is 'local' but data.path is not set: point it at the data folder")
            copy_layout(Path(path), tmp)
            report["path"] = str(path)
        elif source == "archive":
            if not path:
                raise FetchError("data.source is 'archive' but data.path is not set: point it at the .zip/.tar.gz file")
            archive = Path(path)
            if not archive.is_file():
                raise FetchError(f"data.path {archive}: archive file not found")
            if sha256:
                verify_sha256(archive, sha256, what=f"archive {archive}")
            _extract_layout(archive, tmp)
            report.update(path=str(archive), sha256=sha256 or sha256_file(archive))
        elif source == "url":
            if not url or not sha256:
                raise FetchError("data.source is 'url': set data.url and data.sha256 (the archive's sha256)")
            archive = download(url, Path(download_dir) / _download_name(url, sha256), sha256,
                               progress=progress, retries=retries)
            _extract_layout(archive, tmp)
            report.update(url=url, sha256=sha256, archive=str(archive))
        else:
            raise FetchError(f"unknown data.source {source!r}; choose synthetic, local, archive or url")
        validate_layout(tmp, what=f"the {source} data for {dest}")
        report["images"] = {s: sum(1 for p in image_dir(tmp, s).iterdir() if p.suffix.lower() == ".png")
                            for s in SPLITS}
    report["root"] = str(dest)
    return report


def _download_name(url: str, sha256: str) -> str:
    base = PurePosixPath(urllib.parse.urlparse(url).path).name or "archive"
    return f"{sha256.lower()[:16]}-{base}"


# --------------------------------------------------------------------------- local folders

def copy_layout(src: Path, dst: Path) -> int:
    """Copy the layout's files (and only those) from `src` (or its single sub-folder) to `dst`."""
    if not src.is_dir():
        raise FetchError(f"data.path {src}: folder not found")
    root = validate_layout(find_layout_root(src), what=f"data.path {src}")
    n = 0
    for split in SPLITS:
        ann, det, img = layout_entries(split)
        for rel in (ann, det):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, dst / rel)
            n += 1
        (dst / img).mkdir(parents=True, exist_ok=True)
        for p in sorted((root / img).iterdir()):
            if p.suffix.lower() == ".png" and p.is_file():
                shutil.copyfile(p, dst / img / p.name)
                n += 1
    return n


# --------------------------------------------------------------------------- archives

def verify_sha256(path: Path, expected: str, what: str | None = None) -> str:
    got = sha256_file(path)
    if got != expected.lower():
        raise ChecksumError(f"{what or path}: sha256 mismatch: expected {expected.lower()}, got {got}. "
                            "The file is corrupt or not the one data.sha256 describes; fix data.sha256 or the source.")
    return got


def _extract_layout(archive: Path, tmp: Path) -> None:
    """Extract into tmp/.extract, then move the layout folders up into tmp."""
    work = tmp / ".extract"
    extract_archive(archive, work)
    root = find_layout_root(work)
    validate_layout(root, what=f"archive {archive}")
    for top in ("annotations", "person_detection_results", "images"):
        os.replace(root / top, tmp / top)
    shutil.rmtree(work)


def extract_archive(archive: str | Path, dest: str | Path) -> int:
    """Safely extract a zip or tar archive into `dest`; refuse any member that could escape it."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(archive, dest)
        if tarfile.is_tarfile(archive):
            return _extract_tar(archive, dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as e:
        raise FetchError(f"{archive}: damaged or truncated archive ({type(e).__name__}: {e}); download or copy it "
                         "again (set data.sha256 to catch this before extracting)") from None
    raise FetchError(f"{archive}: not a zip or tar archive, or a truncated one (supported: .zip, .tar, .tar.gz, .tgz, "
                     ".tar.bz2, .tar.xz); check data.path / data.url, or download it again")


def _member_target(dest: Path, name: str, archive: Path) -> Path:
    posix = name.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    if (not posix or posix.startswith("/") or (len(posix) > 1 and posix[1] == ":")
            or any(p == ".." for p in parts)):
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: absolute path or '..' would write outside the target folder")
    target = dest.joinpath(*[p for p in parts if p not in ("", ".")])
    root = os.path.realpath(dest)
    if os.path.commonpath([root, os.path.realpath(target)]) != root:
        raise UnsafeArchiveError(f"{archive}: refusing member {name!r}: it resolves outside the target folder")
    return target


def _extract_zip(archive: Path, dest: Path) -> int:
    n = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"{archive}: refusing symlink member {info.filename!r}")
            target = _member_target(dest, info.filename, archive)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            n += 1
    return n


def _extract_tar(archive: Path, dest: Path) -> int:
    n = 0
    with tarfile.open(archive, "r:*") as tf:
        for m in tf:
            if m.issym() or m.islnk():
                raise UnsafeArchiveError(f"{archive}: refusing {'symlink' if m.issym() else 'hard link'} member "
                                         f"{m.name!r} -> {m.linkname!r}")
            if not (m.isfile() or m.isdir()):
                raise UnsafeArchiveError(f"{archive}: refusing special member {m.name!r} (device, fifo or unknown type)")
            target = _member_target(dest, m.name, archive)
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            if src is None:
                raise FetchError(f"{archive}: cannot read member {m.name!r}")
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            n += 1
    return n


# --------------------------------------------------------------------------- download

_TRANSIENT = (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError,
              TimeoutError, socket.timeout, urllib.error.URLError)


def download(url: str, dest_file: str | Path, sha256: str, *, retries: int = 5, timeout: float = 30.0,
             backoff: float = 1.0, chunk: int = 1 << 16, progress: bool = True) -> Path:
    """Download `url` to `dest_file`, resuming `<dest_file>.part` with Range requests; verify sha256.

    A finished `dest_file` with the right checksum is reused. After a checksum mismatch the
    partial download is deleted (a wrong file is never resumed or kept).
    """
    dest_file = Path(dest_file)
    dest_file.parent.mkdir(parents=True, exist_ok=True)
    sha256 = sha256.lower()
    if dest_file.is_file():
        if sha256_file(dest_file) == sha256:
            return dest_file
        dest_file.unlink()
    part = dest_file.with_name(dest_file.name + ".part")
    failures = 0
    while True:
        try:
            if _stream(url, part, timeout, chunk, progress):
                break
        except _TRANSIENT as e:
            if isinstance(e, urllib.error.HTTPError) and e.code < 500:
                raise FetchError(f"{url}: HTTP {e.code} {e.reason}; check data.url") from None
            failures += 1
            if failures > retries:
                have = part.stat().st_size if part.exists() else 0
                raise FetchError(f"{url}: download failed after {failures} attempts ({e!r}); "
                                 f"{have} bytes kept in {part}; run again to resume") from None
            time.sleep(backoff * min(2 ** (failures - 1), 8))
    got = sha256_file(part)
    if got != sha256:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{url}: sha256 mismatch: expected {sha256}, got {got}; the download was deleted. "
                            "Check data.sha256 and data.url.")
    os.replace(part, dest_file)
    return dest_file


def _stream(url: str, part: Path, timeout: float, chunk: int, progress: bool) -> bool:
    """One request appending to `part` from its current size; True when the file is complete."""
    offset = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "okdpose-fetch"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:          # nothing left to send: the part is complete (checksum decides)
            return True
        raise
    with resp:
        total = None
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            if start != offset:               # server resumed elsewhere: start over
                part.unlink(missing_ok=True)
                return False
        else:                                 # 200: full body (server ignores Range)
            offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
        mode = "ab" if offset else "wb"
        with open(part, mode) as out, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                           unit_divisor=1024, desc=part.name[:-5], disable=not progress) as bar:
            while True:
                block = resp.read(chunk)
                if not block:
                    break
                out.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size < total:
        raise http.client.IncompleteRead(b"", total - size)
    return True


def _content_range(value: str) -> tuple[int, int | None]:
    """'bytes 100-999/1000' -> (100, 1000); total None when '*'."""
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        return int(span.split("-", 1)[0]), (None if total.strip() == "*" else int(total))
    except ValueError:
        raise FetchError(f"unexpected Content-Range header {value!r} in a 206 response") from None
