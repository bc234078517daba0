"""Frame sources: 16-bit depth folders read as preprocess reads them, natural order, videos with their
frame rate, and unreadable frames / truncated videos skipped or stopped at with their name."""
from __future__ import annotations

import logging
import os
import shutil
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import DEPTH_RANGE
from okdpose.data.coco import read_frame, to_uint8
from okdpose.frames import FrameError, natural_key, open_source

VIDEO_FPS = 10.0


# --------------------------------------------------------------------------- builders (also used by test_predict)

def depth_folder(tiny_raw: Path, dest: Path) -> Path:
    """A folder of the built-in generator's 16-bit depth PNGs (every split's frames, 9 in all)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted((tiny_raw / "images").glob("*/*.png")):
        shutil.copy(f, dest / f.name)
    return dest


def write_mp4(frames_dir: Path, path: Path, fps: float = VIDEO_FPS) -> Path:
    """An mp4v video of a depth folder's frames (depth mapped to 8-bit grey as preprocess maps it)."""
    files = sorted(frames_dir.glob("*.png"))
    first = read_frame(files[0], DEPTH_RANGE)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (first.shape[1], first.shape[0]))
    assert writer.isOpened()
    for f in files:
        writer.write(cv2.cvtColor(read_frame(f, DEPTH_RANGE)[..., 0], cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def _boxes(data: bytes | bytearray, start: int, end: int):
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        if size < 8:
            return
        yield kind, i, size
        i += size


def faststart(data: bytes) -> bytes:
    """The MP4 with its index ('moov') moved before the media data, as streaming writers and
    `ffmpeg -movflags faststart` lay it out (chunk offsets shifted). OpenCV writes the index last,
    so cutting its file loses the index; cutting a faststart file keeps it: a truncated video
    that opens and declares more frames than it holds."""
    top = {kind: (i, size) for kind, i, size in _boxes(data, 0, len(data))}
    mi, ms = top[b"moov"]
    moov = bytearray(data[mi:mi + ms])

    def shift(start: int, end: int) -> None:
        for kind, i, size in _boxes(moov, start, end):
            if kind in (b"trak", b"mdia", b"minf", b"stbl"):
                shift(i + 8, i + size)
            elif kind == b"stco":
                for k in range(struct.unpack(">I", moov[i + 12:i + 16])[0]):
                    o = i + 16 + 4 * k
                    moov[o:o + 4] = struct.pack(">I", struct.unpack(">I", moov[o:o + 4])[0] + ms)

    shift(8, ms)
    rest = data[:mi] + data[mi + ms:]
    ftyp_end = top[b"ftyp"][1]
    return rest[:ftyp_end] + bytes(moov) + rest[ftyp_end:]


def truncated_mp4(video: Path, path: Path, keep: float = 0.5) -> Path:
    data = faststart(video.read_bytes())
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def corrupt_png(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:200])        # a header and no image data
    return path




# --------------------------------------------------------------------------- tests

def test_natural_order():
    names = ["f10.png", "f2.png", "F1.png", "f2b.png"]
    assert sorted(names, key=natural_key) == ["F1.png", "f2.png", "f2b.png", "f10.png"]
    assert sorted(["1²2.png", "1.png"], key=natural_key) == ["1.png", "1²2.png"]    # '²' isdigit(), int() refuses it


def test_depth_folder_reads_like_preprocess(folder):
    src = open_source(folder, depth_range=DEPTH_RANGE)
    frames = list(src)
    files = sorted(folder.glob("*.png"), key=lambda f: natural_key(f.name))
    assert src.kind == "folder" and src.count == len(files) == len(frames) == 9 and src.fps is None
    assert [f.name for f in frames] == [f.name for f in files]
    assert [f.index for f in frames] == list(range(9))
    raw = cv2.imread(str(files[0]), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(frames[0].image, to_uint8(raw, DEPTH_RANGE))
    assert frames[0].image.shape == (480, 640, 1) and frames[0].image.dtype == np.uint8


def test_one_image(folder):
    f = sorted(folder.glob("*.png"))[0]
    frames = list(open_source(f, depth_range=DEPTH_RANGE))
    assert len(frames) == 1 and frames[0].name == f.name


def test_video_frames_and_fps(video):
    src = open_source(video)
    frames = list(src)
    assert src.kind == "video" and src.fps == pytest.approx(VIDEO_FPS) and src.count == 9
    assert len(frames) == 9 and not src.skipped
    assert frames[3].name == "frame_000003" and frames[3].image.shape == (480, 640, 3)


@pytest.mark.parametrize("on_error", ["skip", "stop"])
def test_corrupt_png_is_skipped_or_stops(folder, on_error, caplog):
    bad = corrupt_png(sorted(folder.glob("*.png"), key=lambda f: natural_key(f.name))[4])
    src = open_source(folder, depth_range=DEPTH_RANGE, on_error=on_error)
    if on_error == "stop":
        with pytest.raises(FrameError, match=rf"frame 4 .*{bad.name}.*corrupt or truncated.*--on-error skip"):
            list(src)
        return
    with caplog.at_level(logging.WARNING, logger="okdpose.frames"):
        frames = list(src)
    assert len(frames) == 8 and bad.name not in [f.name for f in frames]
    assert [(s.index, s.name) for s in src.skipped] == [(4, bad.name)]
    assert bad.name in caplog.text
    assert src.summary()["skipped"] == 1


@pytest.mark.parametrize("kind", ["broken link", "folder", "fifo"])
@pytest.mark.parametrize("on_error", ["skip", "stop"])
def test_frame_entries_that_are_not_files_are_unreadable_frames_not_dropped_or_waited_on(folder, kind, on_error):
    names = sorted((f.name for f in folder.glob("*.png")), key=natural_key)
    odd = folder / names[2]
    odd.unlink()
    if kind == "broken link":
        odd.symlink_to(folder / "gone.png")
    elif kind == "folder":
        odd.mkdir()
    else:
        os.mkfifo(odd)                          # reading it would block until a writer came
    src = open_source(folder, depth_range=DEPTH_RANGE, on_error=on_error)
    assert src.count == 9                       # still part of the sequence
    why = {"broken link": "a broken symbolic link", "folder": "a folder", "fifo": "not a regular file"}[kind]
    if on_error == "stop":
        with pytest.raises(FrameError, match=rf"frame 2 .*{odd.name}: {why}.*--on-error skip"):
            list(src)
        return
    frames = list(src)
    assert [f.name for f in frames] == names[:2] + names[3:]
    assert [(x.index, x.name) for x in src.skipped] == [(2, odd.name)] and why in src.skipped[0].reason


@pytest.mark.parametrize("kind", ["broken link", "fifo", "fifo.png"])
def test_an_input_that_is_not_a_file_is_refused_before_reading(tmp_path, kind):
    path = tmp_path / ("in.png" if kind == "fifo.png" else "in.mp4")
    if kind == "broken link":
        path.symlink_to(tmp_path / "gone.mp4")
    else:
        os.mkfifo(path)
    why = "a broken symbolic link" if kind == "broken link" else "not a regular file"
    with pytest.raises(FrameError, match=rf"in\.(mp4|png): {why}"):
        open_source(path)


@pytest.mark.parametrize("on_error", ["skip", "stop"])
def test_truncated_video_is_reported_with_its_frame(video, tmp_path, on_error):
    cut = truncated_mp4(video, tmp_path / "cut.mp4")
    src = open_source(cut, on_error=on_error)
    assert src.count == 9                            # the index survives and promises 9 frames
    if on_error == "stop":
        with pytest.raises(FrameError, match=r"cut.mp4: frame \d: the video ends after \d of the 9 frames"):
            list(src)
        return
    frames = list(src)
    assert 0 < len(frames) < 9
    assert [s.index for s in src.skipped] == list(range(len(frames), 9))


def test_sources_that_cannot_open(tmp_path, video):
    with pytest.raises(FrameError, match="not found"):
        open_source(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FrameError, match="no frames"):
        open_source(tmp_path / "empty")
    cut = tmp_path / "noindex.mp4"
    cut.write_bytes(video.read_bytes()[: video.stat().st_size // 2])    # OpenCV's layout: the index is lost
    with pytest.raises(FrameError, match="moov"):
        open_source(cut)
    with pytest.raises(ValueError, match="on_error"):
        open_source(video, on_error="ignore")
