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
  A server that answers a Range request with another range is asked once more without Range;
  then (or a plain GET answered with a range) the download stops with an error, keeping the .part.

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
import ssl
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
    if source in ("local", "archive") and path:
        _refuse_overlap(Path(path), dest, source)      # before atomic_dir writes anything
    if source == "url" and url:
        _check_url(url)
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


def _refuse_overlap(path: Path, dest: Path, source: str) -> None:
    """Refuse a data.path that is, holds or lies inside `dest`: `dest` is replaced by a fresh copy of
    the layout files, so anything else in it (the user's originals, notes, the archive) would be lost."""
    src = path.resolve()
    target = dest.parent.resolve() / dest.name     # the folder that is replaced (a symlink itself, not its target)
    if src == target:
        where = "is"
    elif target in src.parents:
        where = "lies inside"
    elif source == "local" and src in target.parents:
        where = "contains"
    else:
        return
    raise FetchError(f"data.path {path} {where} the target folder {dest}, which download replaces with a copy of the "
                     f"layout files only (everything else in it would be deleted); nothing was changed. Move the "
                     f"original data outside {dest.parent} and point data.path at it")


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
              TimeoutError, socket.timeout, urllib.error.URLError, ssl.SSLError)   # SSLError: a TLS drop mid-body


class _RangeMismatch(Exception):
    """A 206 answer whose Content-Range does not start where the request asked."""

    def __init__(self, asked: int, content_range: str):
        super().__init__(asked, content_range)
        self.asked, self.content_range = asked, content_range


def _check_url(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) `url`; FetchError naming data.url when it cannot be parsed."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port      # .port raises on a non-numeric or out-of-range port
    except ValueError as e:
        raise FetchError(f"data.url {url!r} is malformed ({e}); write it as http(s)://host[:port]/path/archive.zip") from None
    if parts.scheme not in ("http", "https") or not host:
        raise FetchError(f"data.url {url!r} is malformed (no http(s) scheme or no host); "
                         "write it as http(s)://host[:port]/path/archive.zip")
    return host, port or (443 if parts.scheme == "https" else 80)


def _no_server(e: BaseException, host: str, port: int) -> str | None:
    """What went wrong when no server answered at all (a resume hint would mislead), else None."""
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, ConnectionRefusedError):
        return f"the server at {host}:{port} refused the connection"
    if isinstance(reason, socket.gaierror):
        return f"the host name {host} could not be resolved ({reason.strerror})"
    return None


def download(url: str, dest_file: str | Path, sha256: str, *, retries: int = 5, timeout: float = 30.0,
             backoff: float = 1.0, chunk: int = 1 << 16, progress: bool = True) -> Path:
    """Download `url` to `dest_file`, resuming `<dest_file>.part` with Range requests; verify sha256.

    A finished `dest_file` with the right checksum is reused. After a checksum mismatch the
    partial download is deleted (a wrong file is never resumed or kept).
    """
    host, port = _check_url(url)
    dest_file = Path(dest_file)
    dest_file.parent.mkdir(parents=True, exist_ok=True)
    sha256 = sha256.lower()
    if dest_file.is_file():
        if sha256_file(dest_file) == sha256:
            return dest_file
        dest_file.unlink()
    part = dest_file.with_name(dest_file.name + ".part")
    failures, use_range, restarted = 0, True, False
    while True:
        try:
            if _stream(url, part, timeout, chunk, progress, use_range):
                break
        except _RangeMismatch as e:
            # a server that resumes elsewhere than asked: restart once from byte 0 without Range (the .part
            # is only replaced once a full body arrives); a second time, or a plain GET answered with a
            # range, is the server's fault and retrying would loop for ever
            if restarted or not e.asked:
                have = part.stat().st_size if part.exists() else 0
                asked = f"Range: bytes={e.asked}-" if e.asked else "no Range header"
                kept = f"; {have} bytes kept in {part}" if have else ""
                raise FetchError(f"data.url {url}: the server answered a request with {asked} with a wrong byte "
                                 f"range (206, Content-Range {e.content_range!r}): it does not serve byte ranges "
                                 f"correctly{kept}. Check data.url (a proxy or mirror in the way?), or download "
                                 "the archive by hand and use data.source: archive") from None
            restarted, use_range = True, False
        except _TRANSIENT as e:
            if isinstance(e, urllib.error.HTTPError) and e.code < 500:
                raise FetchError(f"{url}: HTTP {e.code} {e.reason}; check data.url") from None
            if isinstance(e, urllib.error.URLError) and isinstance(e.reason, ssl.SSLError):
                raise FetchError(f"data.url {url}: TLS handshake failed ({e.reason}); check data.url (https:// "
                                 "for a plain http server?) and the server's certificate") from None
            failures, use_range = failures + 1, True          # a drop after a restart resumes again
            if failures > retries:
                have = part.stat().st_size if part.exists() else 0
                what = _no_server(e, host, port)
                if what:
                    kept = f"; {have} bytes kept in {part}, run again to resume" if have else ""
                    raise FetchError(f"data.url {url}: {what} ({failures} attempts); check data.url (host and "
                                     f"port), the network and that the server is running{kept}") from None
                raise FetchError(f"{url}: download failed after {failures} attempts ({e!r}); "
                                 f"{have} bytes kept in {part}; run again to resume") from None
            time.sleep(backoff * min(2 ** (failures - 1), 8))
        except http.client.HTTPException as e:   # after _TRANSIENT: IncompleteRead is one too
            raise FetchError(f"data.url {url}: the server at {host}:{port} did not answer in HTTP "
                             f"({type(e).__name__}: {str(e).strip()!r}); it is not an HTTP(S) server: check data.url "
                             "(scheme, host and port)") from None
    got = sha256_file(part)
    if got != sha256:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{url}: sha256 mismatch: expected {sha256}, got {got}; the download was deleted. "
                            "Check data.sha256 and data.url.")
    os.replace(part, dest_file)
    return dest_file


def _stream(url: str, part: Path, timeout: float, chunk: int, progress: bool, use_range: bool = True) -> bool:
    """One request appending to `part` from its current size (from 0 without `use_range`); True when the
    file is complete."""
    offset = (part.stat().st_size if part.exists() else 0) if use_range else 0
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
            start, total = _content_range(resp.headers.get("Content-Range", ""), url)
            if start != offset:               # server resumed elsewhere: download() decides
                raise _RangeMismatch(offset, resp.headers.get("Content-Range", ""))
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


def _content_range(value: str, url: str = "") -> tuple[int, int | None]:
    """'bytes 100-999/1000' -> (100, 1000); total None when '*'."""
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        return int(span.split("-", 1)[0]), (None if total.strip() == "*" else int(total))
    except ValueError:
        raise FetchError(f"data.url {url}: unexpected Content-Range header {value!r} in a 206 response; the server "
                         "does not serve byte ranges correctly: check data.url") from None
