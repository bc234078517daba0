"""Frame sources for `okdpose predict`: one image, a folder of frames or a video file, read lazily
as uint8 frames, with unreadable frames reported by name and skipped or stopped at.

Legend: H x W frame, C = 1 (depth or grey) or 3 (RGB) channels; indices are 0-based.

    source = open_source("recording/", depth_range=(400, 1200), on_error="skip")
    for frame in source:                  # Frame(index, name, image uint8 (H, W, C))
        ...
    source.skipped                        # [SkippedFrame(index, name, reason)], filled while reading
    source.fps                            # the video's frame rate, None for images / when unknown

Folder and image frames are decoded as preprocess reads them (`okdpose.data.coco.read_frame`):
16-bit single-channel PNGs are depth in mm, mapped through `depth_range` to 255..0; 8-bit frames
are grey or BGR -> RGB. A folder's frames are its image files in natural order (`frame2` before
`frame10`). Videos are read with OpenCV (`cv2.VideoCapture`, anything its FFmpeg reads), BGR ->
RGB; a video is 8-bit, so depth videos must have been encoded as 8-bit grey already.

Unreadable input: a frame file that does not decode, or a video that ends before the frame count
its container declares (a truncated file), is reported with its name or frame index and either
skipped with a warning (`on_error="skip"`, counted in `skipped`) or raised as FrameError
(`on_error="stop"`). OpenCV cannot read on past a failed video read, so a truncated video's
missing frames are one SkippedFrame each. A source that cannot be opened at all (missing path,
empty folder, a video without its index) is always a FrameError.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import cv2
import numpy as np

from okdpose.data.coco import DataError, read_frame

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
OnError = Literal["skip", "stop"]
ON_ERROR = ("skip", "stop")


class FrameError(ValueError):
    """A frame or source that cannot be read; the message names it and the fix."""


@dataclass(frozen=True)
class Frame:
    index: int            # position in the source: file order in a folder, frame number in a video
    name: str             # file name, or `frame_000123` for video frames
    image: np.ndarray     # uint8 (H, W, C), C = 1 or 3 (RGB)


@dataclass(frozen=True)
class SkippedFrame:
    index: int
    name: str
    reason: str

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "reason": self.reason}


def natural_key(name: str) -> list:
    """Sort key: digit runs compare as numbers (`f2.png` < `f10.png`), the rest case-insensitively."""
    # isdecimal, not isdigit: '²' is a digit int() refuses (and re's \d does not match it)
    return [(0, int(part), "") if part.isdecimal() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


def video_frame_name(index: int) -> str:
    return f"frame_{index:06d}"


@dataclass
class FrameSource:
    """Frames of one input (see the module docstring); iterate it once."""

    path: Path
    kind: Literal["image", "folder", "video"]
    on_error: OnError = "stop"
    depth_range: tuple[float, float] = (400.0, 1200.0)
    files: tuple[Path, ...] = ()             # image / folder frames, in reading order
    fps: float | None = None                 # video frame rate when the container says
    count: int | None = None                 # frames expected (files, or the video's declared count)
    skipped: list[SkippedFrame] = field(default_factory=list)

    def __iter__(self) -> Iterator[Frame]:
        return self._video() if self.kind == "video" else self._files()

    def _fail(self, index: int, name: str, reason: str) -> None:
        """Skip (warn and count) or stop at an unreadable frame."""
        if self.on_error == "stop":
            raise FrameError(f"{reason}; pass --on-error skip to skip unreadable frames")
        log.warning("skipping %s", reason)
        self.skipped.append(SkippedFrame(index, name, reason))

    def _files(self) -> Iterator[Frame]:
        for i, f in enumerate(self.files):
            odd = not_a_file(f)
            if odd:                          # reading a fifo would block; a broken link has no frame
                self._fail(i, f.name, f"frame {i} ({f}: {odd}; replace it with the frame's image file or remove it)")
                continue
            try:
                image = read_frame(f, self.depth_range)
            except DataError as e:
                self._fail(i, f.name, f"frame {i} ({e})")
                continue
            yield Frame(i, f.name, image)

    def _video(self) -> Iterator[Frame]:
        cap = _open_video(self.path)
        try:
            i = 0
            while True:
                ok, image = cap.read()
                if not ok:
                    break
                if image.ndim == 3 and image.shape[2] == 3:
                    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
                yield Frame(i, video_frame_name(i), image.reshape(image.shape[:2] + (-1,)))
                i += 1
        finally:
            cap.release()
        if self.count is not None and i < self.count:
            missing = self.count - i
            reason = (f"{self.path}: frame {i}: the video ends after {i} of the {self.count} frames its container "
                      f"declares (truncated or corrupt); re-export or re-copy the file")
            if self.on_error == "stop":
                raise FrameError(f"{reason}; pass --on-error skip to keep the {i} frames read")
            log.warning("%s: %d frames missing", reason, missing)
            self.skipped.extend(SkippedFrame(k, video_frame_name(k), reason) for k in range(i, self.count))

    def summary(self) -> dict:
        return {"input": str(self.path), "kind": self.kind, "fps": self.fps, "frames_expected": self.count,
                "skipped": len(self.skipped), "skipped_frames": [s.to_dict() for s in self.skipped]}


def not_a_file(path: Path) -> str | None:
    """Why `path` cannot be read as a frame or video file (None: a regular file, or a link to one)."""
    if path.is_symlink() and not path.exists():
        return f"a broken symbolic link (to {os.readlink(path)})"
    if path.is_dir():
        return "a folder"
    if path.exists() and not path.is_file():
        return "not a regular file (a fifo, socket or device: reading it would wait for a writer)"
    return None


def _open_video(path: Path) -> cv2.VideoCapture:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise FrameError(f"{path}: cannot be opened as a video or image ({path.stat().st_size} bytes). OpenCV reads "
                         f"image files ({', '.join(sorted(IMAGE_SUFFIXES))}), folders of them and videos its FFmpeg "
                         "decodes; an MP4 whose recording was interrupted has no index ('moov atom') and must be "
                         "repaired or re-exported first")
    return cap


def open_source(path: str | Path, *, depth_range: Sequence[float] = (400.0, 1200.0),
                on_error: OnError = "stop") -> FrameSource:
    """The frame source at `path`: a folder (its image files), an image file, or a video."""
    path = Path(path)
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    rng = (float(depth_range[0]), float(depth_range[1]))
    if path.is_symlink() and not path.exists():
        raise FrameError(f"{path}: {not_a_file(path)}; give an image, a folder of frames or a video file")
    if not path.exists():
        raise FrameError(f"{path}: not found; give an image, a folder of frames or a video file")
    if path.is_dir():
        # every entry named like a frame is one: a broken link, a folder or a fifo among them is an
        # unreadable frame (stop, or skip and count it), not silently left out of the sequence
        files = sorted((f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES),
                       key=lambda f: natural_key(f.name))
        if not files:
            raise FrameError(f"{path}: no frames ({', '.join(sorted(IMAGE_SUFFIXES))} files) in this folder")
        return FrameSource(path, "folder", on_error, rng, tuple(files), count=len(files))
    odd = not_a_file(path)
    if odd:
        raise FrameError(f"{path}: {odd}; predict reads image files, folders of them and video files (to stream, "
                         "write the recording to a file first)")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return FrameSource(path, "image", on_error, rng, (path,), count=1)
    cap = _open_video(path)
    fps, count = cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_COUNT)
    cap.release()
    return FrameSource(path, "video", on_error, rng, fps=float(fps) if fps and 0 < fps < math.inf else None,
                       count=int(count) if count and count > 0 else None)
