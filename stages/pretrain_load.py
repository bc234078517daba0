"""pretrain-load: build the configured MultiOutHRNet, load `model.pretrained` when set, and write
models/init.pt (okdpose checkpoint) and reports/pretrain.json (source, sha256, key counts, and
params + forward FLOPs per stage output at data.image_size)."""
from __future__ import annotations

import sys
from pathlib import Path

# this tree's okdpose before an installed (editable) copy: a queued `dvc exp run` runs the stage in a
# copy of the repository whose src/ is the code it was queued with (README "grid"; test_this_tree.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import logging

from okdpose.files import write_json
from okdpose.model import CheckpointError, save_checkpoint
from okdpose.model.initial import initial_model, model_costs
from okdpose.params import ParamsError, load_params
from okdpose.seeding import seed_everything

PRETRAINED_DIR = Path("pretrained")          # the stage's DVC dependency
INIT, REPORT = Path("models/init.pt"), Path("reports/pretrain.json")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = load_params()
    key, path = ("model.checkpoint", p.model.checkpoint) if p.model.checkpoint else ("model.pretrained", p.model.pretrained)
    if path is None:
        print(f"pretrain-load: model.pretrained is null, so no checkpoint is loaded: the model is initialised "
              f"from scratch (HRNet init, train.seed {p.train.seed})")
    elif PRETRAINED_DIR.resolve() not in Path(path).resolve().parents:
        logging.warning("%s %s is outside %s/: DVC will not re-run this stage when it changes; "
                        "move it into %s/", key, path, PRETRAINED_DIR, PRETRAINED_DIR)
    seed_everything(p.train.seed)
    model, info = initial_model(p.model_config(), p.model.pretrained, p.model.checkpoint)
    if p.model.checkpoint:
        arch = info["source"]["architecture"]
        print(f"pretrain-load: model.checkpoint {path}: {info['source']['model']} (taken as trained: train-okd "
              "will not train it)\n  " + "\n  ".join(arch["notes"]))
        if arch["untrained_heads"]:
            logging.warning("%s: heads %s still hold their initial values (never trained): their stages' AP "
                            "means nothing", path, arch["untrained_heads"])
    save_checkpoint(INIT, model, source=info["source"], load_report=info["load_report"])
    write_json(REPORT, {"source": info["source"], "keys": info["keys"], "model": model.config(),
                         **model_costs(p.model_config(), p.data.image_size)})
    print(f"pretrain-load: wrote {INIT} and {REPORT}")


if __name__ == "__main__":
    try:
        main()
    except (ParamsError, CheckpointError, FileNotFoundError) as e:
        sys.exit(f"pretrain-load: {e}")
