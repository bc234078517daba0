"""download: bring the data set named by params `data` to data/raw/<data.name>/ in the BabyPose
layout (built-in synthetic frames, a local folder, an archive, or an http(s) URL with sha256).
The folder is built beside the target and renamed into place only once it validates."""
from __future__ import annotations

import sys
from pathlib import Path

# this tree's okdpose before an installed (editable) copy: a queued `dvc exp run` runs the stage in a
# copy of the repository whose src/ is the code it was queued with (README "grid"; test_this_tree.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import os
import time

from okdpose.data.fetch import FetchError, fetch_raw
from okdpose.data.layout import LayoutError
from okdpose.params import ParamsError, load_params

RAW, DOWNLOADS = Path("data/raw"), Path("data/downloads")   # downloads/ keeps resumable .part files


def main() -> None:
    d = load_params().data
    start = time.perf_counter()
    report = fetch_raw(RAW / d.name, d.source, path=d.path, url=d.url, sha256=d.sha256,
                       synthetic=d.synthetic, spec=d.joint_spec, download_dir=DOWNLOADS,
                       workers=min(2, os.cpu_count() or 1), progress=sys.stderr.isatty())
    images = ", ".join(f"{s} {n}" for s, n in report["images"].items())
    print(f"download: {d.source} -> {report['root']} ({images} frames) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, FetchError, LayoutError, ValueError) as e:
        sys.exit(f"download: {e}")
