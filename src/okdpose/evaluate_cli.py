"""`okdpose evaluate --checkpoint FILE`: evaluate a checkpoint file as it is (ours, the official
HRNet's or an original OKD-HRNet release) on the prepared data, without training and outside the
pipeline, as the original's `tools/test.py` does.

The file alone defines the model: joints, width, stages and heads are inferred from its keys
(`okdpose.model.checkpoint.load_released`, which says what it inferred). The data and the
evaluation options come from params.yaml (`data`, `evaluate`; `--split`, `--device` override),
and the same code as the evaluate stage writes OUT/eval.json, OUT/results/ and OUT/plots/ (each
replaced as a whole, so refused when it holds anything else; the rest of OUT is kept).
Inside the pipeline, `model.checkpoint` does the same through pretrain-load (README, "Checking
the paper's released models").
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from okdpose.data.coco import DataError
from okdpose.data.dataset import load_prepared_meta
from okdpose.files import replace_problem, sha256_file


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, type=Path, help="the .pth / .pt file to evaluate")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="data and evaluate settings")
    ap.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="preprocess output")
    ap.add_argument("--split", choices=("val", "test"), help="default: evaluate.split")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: evaluate.device")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                    help="autocast of the model (default: evaluate.precision, fp32)")
    ap.add_argument("--out", type=Path, help="output folder (default: results/checkpoints/<file stem>)")
    return ap


def check_out(out: Path, args: argparse.Namespace) -> None:
    """--out, checked before any work. Only what evaluate writes there is replaced (eval.json and the
    results/ and plots/ folders, each as a whole): those must be an earlier evaluate output or absent,
    hold none of this run's inputs, and be replaceable; anything else in --out is kept."""
    from okdpose.eval_run import foreign_files

    fix = "choose another --out (default: results/checkpoints/<checkpoint name>)"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: it is a file, not a folder; {fix}")
    where = out.resolve()
    if args.prepared.exists() and (where == args.prepared.resolve() or args.prepared.resolve() in where.parents):
        raise ValueError(f"--out {out}: it is inside --prepared {args.prepared} (preprocess output); {fix}")
    for name in ("results", "plots", "eval.json"):
        path = out / name
        for option, given in (("--checkpoint", args.checkpoint), ("--params", args.params),
                              ("--prepared", args.prepared)):
            if given.exists() and (given.resolve() == path.resolve() or path.resolve() in given.resolve().parents):
                raise ValueError(f"--out {out}: {path} holds {option} {given}, and evaluate replaces it as a whole; "
                                 f"{fix}")
        if name == "eval.json":
            if path.exists() and not _earlier_eval_json(path):
                raise ValueError(f"--out {out}: {path} exists and is not an earlier `okdpose evaluate` output (no "
                                 f"'checkpoint' key); evaluate would overwrite it: {fix}, or move it")
            continue
        problem = replace_problem(path)
        if problem is not None:
            raise ValueError(f"--out {out}: {path} cannot be replaced ({problem}); {fix}")
        foreign = foreign_files(path, name)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ValueError(f"--out {out}: {path} holds files evaluate did not write ({shown}); evaluate replaces "
                             f"{path} as a whole and would delete them: {fix}, or move them")


def _earlier_eval_json(path: Path) -> bool:
    import json

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "checkpoint" in doc


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this run created (deepest first) that it left empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def main(argv: Optional[Sequence[str]] = None, prog: str = "okdpose evaluate") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from dataclasses import replace

    from okdpose.device import autocast_dtype, resolve_device
    from okdpose.eval_run import run_evaluation, write_evaluation
    from okdpose.model import CheckpointError
    from okdpose.model.released import load_released
    from okdpose.params import ParamsError, params_for_checkpoint

    out = args.out or Path("results/checkpoints") / args.checkpoint.stem
    created = [p for p in (out, *out.parents) if not (p.exists() or p.is_symlink())]
    try:
        check_out(out, args)
        model, arch, _ = load_released(args.checkpoint)
        print(f"{prog}: {args.checkpoint}: {arch.summary()}")
        p = params_for_checkpoint(args.params, arch.config())
        e = replace(p.evaluate, **{k: v for k, v in (("split", args.split), ("device", args.device),
                                                     ("precision", args.precision)) if v})
        meta = load_prepared_meta(args.prepared)
        if model.num_joints != p.joint_spec.num_joints:
            raise CheckpointError(f"{args.checkpoint} predicts {model.num_joints} joints, the prepared data "
                                  f"({args.prepared}, data.joints {p.data.joints}) has {p.joint_spec.num_joints}; "
                                  "evaluate it on data with its joints")
        if list(meta["image_size"]) != list(p.data.image_size):
            raise DataError(f"{args.prepared} holds {meta['image_size']} crops, {args.params} data.image_size is "
                            f"{list(p.data.image_size)}; use the params the data was prepared with")
        device = resolve_device(e.device, "--device")
        run = run_evaluation(model.to(device), e, p.data, p.joint_spec, args.prepared, device=device,
                             progress=sys.stderr.isatty(),
                             autocast=autocast_dtype(device, e.precision, key="--precision"), name=str(args.checkpoint))
        source = {"path": str(args.checkpoint), "sha256": sha256_file(args.checkpoint), "model": model.config()}
        write_evaluation(run, metrics=out / "eval.json", results=out / "results", plots=out / "plots",
                         num_images=e.num_images, extra={"checkpoint": source})
    except (ParamsError, DataError, CheckpointError, OSError, ValueError) as err:   # OSError: disk full, unwritable
        _remove_empty(created)
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(f"{prog}: " + ", ".join(f"stage{k} AP {m['AP']:.3f}" for k, m in run.stages.items())
          + f" ({e.split}) -> {out}/eval.json")
    return 0
