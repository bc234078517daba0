"""okdpose: the package's command-line tools, as subcommands of one command.

    okdpose predict INPUT --model M ...       keypoints on images, frame folders, videos (`okdpose.predict`)
    okdpose export --model M --stage K ...    a standalone ONNX / TorchScript stage (`okdpose.export`)
    okdpose evaluate --checkpoint X.pth ...   evaluate any checkpoint on the prepared data (`okdpose.evaluate_cli`)
    okdpose explain IMAGE --model M ...       CAMs of one frame, per stage and method (`okdpose.explain_image`)
    okdpose grid list|queue|watch|table ...   the paper's experiment grid (`okdpose.grid`)
    okdpose bench [--quick] ...               CPU benchmarks (`okdpose.bench`)
    okdpose precision table                   bf16 vs fp32 training over seeds (`okdpose.precision_runs`)
    okdpose COMMAND --help                    that tool's own options

A subcommand is a module with `main(argv, prog) -> int` (exit status), imported only when it
runs, so `okdpose --help` stays fast; adding a tool is one line in COMMANDS.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS: dict[str, tuple[str, str]] = {     # name -> (module, one-line help)
    "predict": ("okdpose.predict", "keypoints on an image, a folder of frames or a video, with any model"),
    "export": ("okdpose.export", "a standalone ONNX / TorchScript model of one stage, verified"),
    "evaluate": ("okdpose.evaluate_cli", "evaluate a checkpoint file (ours or the original's) without training"),
    "explain": ("okdpose.explain_image", "CAMs of one frame for a stage, joint and method"),
    "grid": ("okdpose.grid", "the paper's experiment grid as queued DVC experiments, and its Table 1"),
    "bench": ("okdpose.bench", "CPU benchmarks: training step, data loading, inference, EigenCAM"),
    "precision": ("okdpose.precision_runs", "bf16 vs fp32 training of the default run over seeds, with intervals"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="okdpose", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        # no options of its own: every argument after the name goes to the tool's parser
        sub.add_parser(name, help=help_text, add_help=False)
    args, rest = ap.parse_known_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(rest, prog=f"okdpose {args.command}")


if __name__ == "__main__":
    sys.exit(main())
