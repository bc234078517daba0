"""The BabyPose on-disk layout (DESIGN.md §2), shared by download (writes/validates it) and
preprocess (reads it)::

    <root>/annotations/person_keypoints_{split}.json       COCO keypoints
    <root>/person_detection_results/results_{split}.json   COCO results boxes with scores
    <root>/images/{split}/<image_id:012d>.png               640x480 frames
"""
from __future__ import annotations

from pathlib import Path

SPLITS = ("train", "val", "test")
FRAME_SIZE = (640, 480)   # (w, h) of BabyPose frames


class LayoutError(ValueError):
    """A folder that is not in the BabyPose layout; the message lists what is missing."""


def annotation_file(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"person_keypoints_{split}.json"


def detection_file(root: str | Path, split: str) -> Path:
    return Path(root) / "person_detection_results" / f"results_{split}.json"


def image_dir(root: str | Path, split: str) -> Path:
    return Path(root) / "images" / split


def image_file(root: str | Path, split: str, image_id: int) -> Path:
    return image_dir(root, split) / image_name(image_id)


def image_name(image_id: int) -> str:
    return f"{int(image_id):012d}.png"


def layout_entries(split: str) -> tuple[str, str, str]:
    """Relative paths of the three layout entries of a split (files, files, folder)."""
    return (f"annotations/person_keypoints_{split}.json",
            f"person_detection_results/results_{split}.json",
            f"images/{split}/")


def missing_entries(root: str | Path, splits: tuple[str, ...] = SPLITS) -> list[str]:
    root = Path(root)
    missing = []
    for split in splits:
        ann, det, img = layout_entries(split)
        for rel in (ann, det):
            if not (root / rel).is_file():
                missing.append(rel)
        d = root / img
        if not d.is_dir():
            missing.append(img)
        elif not any(p.suffix.lower() == ".png" for p in d.iterdir()):
            missing.append(f"{img}*.png (the folder is empty)")
    return missing


def validate_layout(root: str | Path, splits: tuple[str, ...] = SPLITS, what: str | None = None) -> Path:
    """Raise LayoutError naming every missing entry unless `root` is in the layout."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{what or root}: not a folder")
    missing = missing_entries(root, splits)
    if missing:
        expected = "\n".join(f"  <root>/{e}" for s in splits for e in layout_entries(s))
        raise LayoutError(
            f"{what or root} is not in the BabyPose layout; missing: {', '.join(missing)}.\n"
            f"Expected (one set per split):\n{expected}<image_id:012d>.png"
        )
    return root


def find_layout_root(folder: str | Path) -> Path:
    """`folder` itself if it holds the layout, else its single sub-folder that does (archives often
    wrap everything in one top-level directory); otherwise `folder` (validation then says why)."""
    folder = Path(folder)
    if (folder / "annotations").is_dir():
        return folder
    subs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    if len(subs) == 1 and (subs[0] / "annotations").is_dir():
        return subs[0]
    return folder
