"""fetch: local copies, archive extraction, and http downloads from a server on 127.0.0.1 that the
tests start and stop themselves (Range support, dropped connections). Refused inputs (unsafe or
damaged archives, wrong checksums, tampered or truncated downloads) are in tests/test_bad_inputs.py."""
import hashlib
import http.server
import json
import os
import shutil
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from okdpose.data.fetch import FetchError, download, fetch_raw
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


@pytest.mark.parametrize("where", ["is", "lies inside", "contains"])
def test_local_path_overlapping_the_target_is_refused(tiny_raw, tmp_path, where):
    """data.path = data/raw/<name> (or a folder inside it, or its parent): the target is replaced by
    the layout files only, so the user's other files in it would be deleted; refused, nothing written."""
    dest = tmp_path / "raw" / "babypose"
    shutil.copytree(tiny_raw, dest / "orig" if where == "lies inside" else dest)
    (dest / "NOTES.txt").write_text("the user's own notes")
    path = {"is": dest, "lies inside": dest / "orig", "contains": dest.parent}[where]
    before = _tree(tmp_path)
    with pytest.raises(FetchError) as err:
        fetch_raw(dest, "local", path=str(path), progress=False)
    for w in [f"data.path {path} {where} the target folder {dest}", "nothing was changed", "outside", "point data.path"]:
        assert w in str(err.value), (w, str(err.value))
    assert _tree(tmp_path) == before and _leftovers(dest.parent) == ["babypose"]


def test_archive_inside_the_target_is_refused(tiny_raw, tmp_path):
    dest = tmp_path / "raw" / "babypose"
    shutil.copytree(tiny_raw, dest)
    archive = _zip_layout(tiny_raw, dest / "babypose.zip")       # replacing dest would delete it
    with pytest.raises(FetchError, match="lies inside the target folder"):
        fetch_raw(dest, "archive", path=str(archive), progress=False)
    assert archive.is_file() and _leftovers(dest.parent) == ["babypose"]


# Wrong sha256, zip slip (zip and tar, absolute and ..), symlink / hard link / special members and
# damaged archives: the ARCHIVE_CASES table in tests/test_bad_inputs.py.


# --------------------------------------------------------------------------- http

class _Server:
    """Serves `files` on 127.0.0.1 with Range support; `drop` = [bytes] cuts the next responses short;
    `bad_range` = "range" answers Range requests from byte 5 whatever they ask (a broken server or
    proxy), "always" answers every request so (206, even without Range)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop: list[int] = []
        self.bad_range: str | None = None
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
                if rng or outer.bad_range == "always":
                    start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    if outer.bad_range:
                        start = 5
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


def _within(seconds: float, fn, *args, **kwargs) -> BaseException | None:
    """Run fn in a thread and return what it raised (None: nothing); fail, rather than hang, when it
    is still running after `seconds` (pytest-timeout is not installed here)."""
    out: list[BaseException] = []

    def run():
        try:
            fn(*args, **kwargs)
        except BaseException as e:        # handed to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: a retry loop that never ends"
    return out[0] if out else None


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


@pytest.mark.parametrize("have_part", [False, True])
def test_url_server_answering_the_wrong_range_stops(tiny_zip, tmp_path, server, have_part):
    """Always 206 from byte 5 (asked for or not): once restarted without Range, then a clear error; it
    used to delete the .part and ask again for ever. A .part from an earlier run is kept."""
    data = tiny_zip.read_bytes()
    server.files["/babypose.zip"], server.bad_range = data, "always"
    part = tmp_path / "babypose.zip.part"
    if have_part:
        part.write_bytes(data[:1000])
    url = server.url("/babypose.zip")
    err = _within(20, download, url, tmp_path / "babypose.zip", _sha(tiny_zip), retries=1, backoff=0, progress=False)
    assert isinstance(err, FetchError), repr(err)
    for w in [f"data.url {url}", "wrong byte range", "does not serve byte ranges correctly", "data.source: archive"]:
        assert w in str(err), (w, str(err))
    assert server.requests == [("/babypose.zip", "bytes=1000-"), ("/babypose.zip", None)][not have_part:]
    assert ("1000 bytes kept in" in str(err)) == have_part
    assert _leftovers(tmp_path) == (["babypose.zip.part"] if have_part else [])
    assert not have_part or part.read_bytes() == data[:1000]


def test_url_wrong_range_restarts_once_without_range(tiny_zip, tmp_path, server):
    """A server that mis-answers Range requests but serves a plain GET: the download starts over."""
    data = tiny_zip.read_bytes()
    server.files["/babypose.zip"], server.bad_range = data, "range"
    (tmp_path / "babypose.zip.part").write_bytes(data[:1000])
    download(server.url("/babypose.zip"), tmp_path / "babypose.zip", _sha(tiny_zip), backoff=0, progress=False)
    assert server.requests == [("/babypose.zip", "bytes=1000-"), ("/babypose.zip", None)]
    assert (tmp_path / "babypose.zip").read_bytes() == data and _leftovers(tmp_path) == ["babypose.zip"]


@pytest.fixture
def not_http():
    """A server on 127.0.0.1 that answers anything with an SSH banner."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-OpenSSH_9\r\n\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(5)
    srv.close()


def test_url_not_an_http_server(tmp_path, not_http):
    url = f"http://127.0.0.1:{not_http}/babypose.zip"
    with pytest.raises(FetchError) as err:
        download(url, tmp_path / "babypose.zip", "0" * 64, retries=1, backoff=0, progress=False)
    for w in [f"data.url {url}", f"127.0.0.1:{not_http}", "BadStatusLine: 'SSH-2.0-OpenSSH_9'", "not an HTTP(S) server", "check data.url"]:
        assert w in str(err.value), (w, str(err.value))
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("url", ["http://[::1/babypose.zip", "http://127.0.0.1:99999/babypose.zip",
                                 "http://127.0.0.1:port/babypose.zip", "http:///babypose.zip"])
def test_url_malformed_is_named(tmp_path, url):
    with pytest.raises(FetchError) as err:
        fetch_raw(tmp_path / "raw" / "babypose", "url", url=url, sha256="0" * 64, download_dir=tmp_path / "dl",
                  progress=False, retries=0)
    for w in [f"data.url {url!r} is malformed", "http(s)://host[:port]/"]:
        assert w in str(err.value), (w, str(err.value))
    assert _leftovers(tmp_path) == []                 # nothing written: no raw/, no dl/


@pytest.mark.parametrize("have_part", [False, True])
def test_url_connection_refused_is_named(tmp_path, have_part):
    with socket.create_server(("127.0.0.1", 0)) as s:     # a port that nobody listens on once closed
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/babypose.zip"
    if have_part:
        (tmp_path / "babypose.zip.part").write_bytes(b"x" * 10)
    with pytest.raises(FetchError) as err:
        download(url, tmp_path / "babypose.zip", "0" * 64, retries=1, backoff=0, progress=False)
    msg = str(err.value)
    for w in [f"data.url {url}", f"the server at 127.0.0.1:{port} refused the connection", "check data.url"]:
        assert w in msg, (w, msg)
    assert ("10 bytes kept" in msg and "resume" in msg) if have_part else ("resume" not in msg and "bytes kept" not in msg)


def test_url_unknown_host_is_named(tmp_path, monkeypatch):
    def no_dns(*args, **kwargs):                         # the resolver's answer, without asking one
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    url = "http://data.example.invalid/babypose.zip"
    with pytest.raises(FetchError) as err:
        download(url, tmp_path / "babypose.zip", "0" * 64, retries=1, backoff=0, progress=False)
    msg = str(err.value)
    assert f"data.url {url}: the host name data.example.invalid could not be resolved" in msg and "check data.url" in msg
    assert "resume" not in msg and _leftovers(tmp_path) == []


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
