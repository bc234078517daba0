"""preprocess: validate data/raw/<data.name>/ and write data/prepared/ (records, cleaned COCO
ground truth, cached crops), reports/data.json (counts, visibility, box statistics, skipped
records) and plots/data/*.png (frames and crops with the ground-truth skeleton)."""
from __future__ import annotations

import sys
from pathlib import Path

# this tree's okdpose before an installed (editable) copy: a queued `dvc exp run` runs the stage in a
# copy of the repository whose src/ is the code it was queued with (README "grid"; test_this_tree.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import time

from okdpose.data.coco import DataError, prepare_dataset, preview
from okdpose.data.layout import LayoutError
from okdpose.files import atomic_dir, write_json
from okdpose.params import ParamsError, load_params
from okdpose.viz import write_png

RAW, PREPARED = Path("data/raw"), Path("data/prepared")
REPORT, PLOTS = Path("reports/data.json"), Path("plots/data")


def main() -> None:
    d = load_params().data
    start = time.perf_counter()
    report = prepare_dataset(RAW / d.name, PREPARED, d.joint_spec, d.image_size, d.depth_range,
                             skip_invalid=d.skip_invalid, progress=sys.stderr.isatty())
    with atomic_dir(PLOTS) as plots:           # replaced as a whole: no mix of old and new pictures
        for split in report["splits"]:
            write_png(plots / f"{split}_frames.png", preview(PREPARED, split, d.joint_spec, num=6))
            write_png(plots / f"{split}_crops.png", preview(PREPARED, split, d.joint_spec, num=16, crops=True))
    write_json(REPORT, report)                # last: the report exists only for a complete run
    t = report["total"]
    print(f"preprocess: {t['records_gt']} records ({t['skipped_invalid']} invalid skipped) -> {PREPARED}, "
          f"{REPORT}, {PLOTS}/ in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, DataError, LayoutError) as e:
        sys.exit(f"preprocess: {e}")
