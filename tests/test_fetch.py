"""fetch: local copies, archive extraction, and http downloads from a server on 127.0.0.1 that the
tests start and stop themselves (Range support, dropped connections). Refused inputs (unsafe or
damaged archives, wrong checksums, tampered or truncated downloads) are in tests/test_bad_inputs.py."""
import hashlib
import http.server
import json
import os
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from okdpose.data.fetch import download, fetch_raw
from okdpose.data.layout import LayoutError, validate_layout


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _zip_layout(raw: Path, out: Path, top: str = "babypose") -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for p in sorted(raw.rglob("*")):
            if p.is_file():
                zf.write(p, f"{top}/{p.relative_to(raw)}")
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- local and archive

def test_local_copies_the_layout(tiny_raw, tmp_path):
    (tiny_raw.parent / "notes.txt").write_text("not part of the layout")
    dest = tmp_path / "raw" / "babypose"
    report = fetch_raw(dest, "local", path=str(tiny_raw), progress=False)
    assert _tree(dest) == _tree(tiny_raw)
    a = next((dest / "images" / "train").iterdir())
    assert os.stat(a).st_ino != os.stat(tiny_raw / "images" / "train" / a.name).st_ino   # a copy, not a link
    assert report["images"] == {"train": 3, "val": 3, "test": 3}


def test_missing_entries_are_named_and_nothing_replaced(tiny_raw, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_raw, src)
    (src / "annotations" / "person_keypoints_val.json").unlink()
    shutil.rmtree(src / "images" / "test")
    dest = tmp_path / "raw" / "babypose"
    dest.mkdir(parents=True)
    (dest / "previous.txt").write_text("kept")
    with pytest.raises(LayoutError) as err:
        fetch_raw(dest, "local", path=str(src), progress=False)
    assert "annotations/person_keypoints_val.json" in str(err.value) and "images/test/" in str(err.value)
    assert _leftovers(dest.parent) == ["babypose"] and (dest / "previous.txt").read_text() == "kept"


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_archive_with_a_top_folder(tiny_raw, tmp_path, fmt):
    if fmt == "zip":
        archive = _zip_layout(tiny_raw, tmp_path / "data.zip")
    else:
        archive = tmp_path / "data.tar.gz"
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(tiny_raw, arcname="babypose")
    dest = tmp_path / "raw" / "babypose"
    fetch_raw(dest, "archive", path=str(archive), sha256=_sha(archive), progress=False)
    assert _tree(dest) == _tree(tiny_raw)
    assert _leftovers(dest.parent) == ["babypose"]


# Wrong sha256, zip slip (zip and tar, absolute and ..), symlink / hard link / special members and
# damaged archives: the ARCHIVE_CASES table in tests/test_bad_inputs.py.


# --------------------------------------------------------------------------- http

class _Server:
    """Serves `files` on 127.0.0.1 with Range support; `drop` = [bytes] cuts the next responses short."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop: list[int] = []
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if outer.drop:                     # promise the whole body, send part of it, hang up
                    self.wfile.write(body[start:start + outer.drop.pop(0)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def tiny_zip(tiny_raw, tmp_path_factory) -> Path:
    return _zip_layout(tiny_raw, tmp_path_factory.mktemp("zip") / "babypose.zip")


def test_url_resumes_a_dropped_transfer(tiny_raw, tiny_zip, tmp_path, server):
    data = tiny_zip.read_bytes()
    server.files["/d/babypose.zip"] = data
    server.drop = [100_000]
    dest = tmp_path / "raw" / "babypose"
    report = fetch_raw(dest, "url", url=server.url("/d/babypose.zip"), sha256=_sha(tiny_zip),
                       download_dir=tmp_path / "dl", progress=False)
    assert _tree(dest) == _tree(tiny_raw)
    assert server.requests == [("/d/babypose.zip", None), ("/d/babypose.zip", "bytes=100000-")]
    assert Path(report["archive"]).read_bytes() == data and _leftovers(tmp_path / "dl") == [Path(report["archive"]).name]
    # a second run reuses the verified download: no request
    fetch_raw(dest, "url", url=server.url("/d/babypose.zip"), sha256=_sha(tiny_zip), download_dir=tmp_path / "dl",
              progress=False)
    assert len(server.requests) == 2


# Dropped connections on every retry (.part kept, resumed by the next run), tampered and truncated
# downloads, HTTP errors: DOWNLOAD_CASES and test_interrupted_download_is_kept_and_resumed in
# tests/test_bad_inputs.py.


def test_url_complete_part_is_verified_not_refetched(tiny_zip, tmp_path, server):
    server.files["/babypose.zip"] = tiny_zip.read_bytes()
    (tmp_path / "babypose.zip.part").write_bytes(tiny_zip.read_bytes())      # killed after the last byte
    download(server.url("/babypose.zip"), tmp_path / "babypose.zip", _sha(tiny_zip), progress=False)
    assert server.requests[0][1] == f"bytes={tiny_zip.stat().st_size}-"     # answered 416, then verified
    assert (tmp_path / "babypose.zip").read_bytes() == tiny_zip.read_bytes()


def test_url_archive_not_in_the_layout(tiny_raw, tmp_path, server):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("babypose/annotations/person_keypoints_train.json", json.dumps({}))
    server.files["/bad.zip"] = bad.read_bytes()
    with pytest.raises(LayoutError, match="person_detection_results/results_train.json"):
        fetch_raw(tmp_path / "raw" / "babypose", "url", url=server.url("/bad.zip"), sha256=_sha(bad),
                  download_dir=tmp_path / "dl", progress=False)
    assert _leftovers(tmp_path / "raw") == []
    validate_layout(tiny_raw)     # the shared fixture is untouched
