"""Load official HRNet / okdpose checkpoints into a `MultiOutHRNet`, and save our own.

Our checkpoint format (a dict; `torch.load(weights_only=True)` reads it):

    {"format": "okdpose", "version": 1,
     "model": {"num_joints": J, "width": w, "n_stage": n, "multi": bool},   # MultiOutHRNet(**model)
     "state_dict": {key: tensor},                                          # official key names
     ...extras}                                                            # e.g. epoch, optimizer, metrics

`load_pretrained` also reads plain state_dicts (official `pose_hrnet_*.pth`), DataParallel
`module.`-prefixed ones and dicts holding a `state_dict` (the original training checkpoints).
It never loads silently: the report lists loaded, missing, unused and skipped keys.
`okdpose.model.released.load_released` builds the model from any of these files alone.

The training resume state (`models/last.pt`, `save_resume` / `read_resume`; tensors, numbers,
strings, lists and dicts, read with weights_only=True):

    {"format": "okdpose-last", "version": 2,
     "fingerprint": hex, "fingerprint_parts": dict,       # okdpose.fingerprint
     "epoch": last completed (1-based), "finished": bool,
     "world_size": processes that trained it (absent: 1),
     "model", "optimizer", "scheduler", "scaler": state dicts (scaler None without fp16),
     "rng": {torch, cuda, numpy, python},                 # okdpose.seeding.rng_state
     "best": {epoch, score, state_dict}, "epochs_since_best": int,
     "history": [one record per epoch, val metrics keyed by int stage]}   # version 1: "stage{k}"
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from okdpose.files import atomic_path, save_deterministic
from okdpose.model.hrnet import STEM_MODULES, full_trunk_keys
from okdpose.model.multi_out import MultiOutHRNet

logger = logging.getLogger(__name__)

FORMAT, VERSION = "okdpose", 1
RESUME_FORMAT, RESUME_VERSION = "okdpose-last", 2
RESERVED_KEYS = frozenset({"format", "version", "model", "state_dict"})
HEAD_PREFIXES = ("final_layer.", "intermediate_layers.")
EXPECTED_FILES = ("an official pose_hrnet_*.pth state_dict, a training checkpoint holding a 'state_dict', "
             "or a file written by okdpose.model.save_checkpoint")


class CheckpointError(ValueError):
    """A checkpoint file that cannot initialise the model; the message names the file and the fix."""


@dataclass
class LoadReport:
    """What `load_pretrained` did with each key (key lists use the model's names)."""

    source: str
    kind: str                                   # "okdpose" | "state_dict" | "wrapped state_dict"
    loaded: list[str] = field(default_factory=list)     # model keys copied from the file
    missing: list[str] = field(default_factory=list)    # model keys the file lacks (keep their init)
    unused: list[str] = field(default_factory=list)     # file keys the architecture has no place for
    skipped: dict[str, str] = field(default_factory=dict)  # file key -> why it was not loaded

    def counts(self) -> dict[str, int]:
        return {"loaded": len(self.loaded), "missing": len(self.missing),
                "unused": len(self.unused), "skipped": len(self.skipped)}

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "counts": self.counts(),
                "missing": self.missing, "unused": self.unused, "skipped": self.skipped}

    def summary(self) -> str:
        c = self.counts()
        lines = [f"{self.source} ({self.kind}): loaded {c['loaded']}, missing {c['missing']}, "
                 f"unused {c['unused']}, skipped {c['skipped']} keys"]
        for title, keys in (("missing (kept at init)", self.missing), ("unused", self.unused)):
            if keys:
                lines.append(f"  {title}: {abbrev_keys(keys)}")
        reasons: dict[str, list[str]] = {}
        for key, why in self.skipped.items():
            reasons.setdefault(why, []).append(key)
        lines += [f"  skipped ({why}): {abbrev_keys(keys)}" for why, keys in reasons.items()]
        return "\n".join(lines)


def abbrev_keys(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def read_checkpoint(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` on CPU, with errors that name the file and the fix."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file; give the .pth / .pt file inside it")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: checkpoint not found; put the file there (e.g. under pretrained/) or fix the path "
            "(params.yaml model.pretrained or model.checkpoint, or the command's --checkpoint / --model; "
            "model.pretrained: null starts from scratch)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage bytes, truncated zip, pickled non-tensor objects, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: not a checkpoint torch can load safely ({type(e).__name__}: {first}): damaged, truncated or "
            f"another kind of file ({path.stat().st_size} bytes); copy it again, expected {EXPECTED_FILES}"
        ) from None


def unpack_checkpoint(obj: Any, source: str) -> tuple[dict[str, Tensor], str, Mapping[str, Any] | None]:
    """-> (state_dict without `module.` prefixes, kind, stored model config or None)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a dict of tensors; expected {EXPECTED_FILES}")
    config = None
    if obj.get("format") == FORMAT:
        version = obj.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise CheckpointError(f"{source}: okdpose checkpoint version {version!r} is newer than this code "
                                  f"reads ({VERSION}); update okdpose")
        kind, config, sd = FORMAT, obj.get("model"), obj.get("state_dict")
        if not isinstance(config, Mapping):
            raise CheckpointError(f"{source}: okdpose checkpoint without its 'model' config; re-save it "
                                  "with okdpose.model.save_checkpoint")
    elif isinstance(obj.get("state_dict"), Mapping):
        kind, sd = "wrapped state_dict", obj["state_dict"]
    else:
        kind, sd = "state_dict", obj
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(f"{source}: no tensors found (empty or missing state_dict); expected {EXPECTED_FILES}")
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: entry {key!r} holds a {type(value).__name__}, not a tensor; "
                                  f"expected {EXPECTED_FILES}")
    for key, value in sd.items():            # NaN weights would only show up later as NaN heatmaps or a crash
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source}: tensor {key!r} holds {bad} non-finite values (NaN / inf) of "
                                  f"{value.numel()}: the weights are broken (a diverged run or a damaged file); "
                                  "use an earlier checkpoint or train again")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd), kind, config


def load_pretrained(model: MultiOutHRNet, path: str | Path) -> LoadReport:
    """Copy matching weights from `path` into `model` and report every key's fate.

    Loaded: same name and shape. Skipped: heads whose shape differs (another joint count),
    heads the model does not have, trunk keys of stages the model does not build. Unused: keys
    foreign to HRNet. A trunk shape mismatch (another width), a file without the stem/layer1,
    or a file that is not a checkpoint raises `CheckpointError`.
    """
    source = str(path)
    sd, kind, config = unpack_checkpoint(read_checkpoint(path), source)
    return load_state(model, sd, kind, config, source)


def load_state(model: MultiOutHRNet, sd: Mapping[str, Tensor], kind: str, config: Mapping[str, Any] | None,
                source: str) -> LoadReport:
    """`load_pretrained` on an unpacked state_dict (shared with `load_released`)."""
    if config is not None and config.get("width") != model.width:
        raise CheckpointError(f"{source}: an okdpose checkpoint of width {config.get('width')}, the model has "
                              f"width {model.width}; set model.width: {config.get('width')} (or use another file)")
    own = model.state_dict()
    full = full_trunk_keys(model.width)
    report = LoadReport(source, kind)
    to_load: dict[str, Tensor] = {}
    wrong_shape: list[str] = []
    for key, value in sd.items():
        head = key.startswith(HEAD_PREFIXES)
        if key in own:
            if value.shape == own[key].shape:
                to_load[key] = value
            elif head:
                report.skipped[key] = (f"head shape {tuple(value.shape)} in file vs {tuple(own[key].shape)} "
                                       "in model (other joint count)")
            else:
                wrong_shape.append(key)
        elif head:
            report.skipped[key] = f"head not in this model (n_stage={model.n_stage}, multi={model.multi})"
        elif key in full:
            report.skipped[key] = f"trunk that feeds only stages after {model.n_stage}, not built"
        else:
            report.unused.append(key)
    if wrong_shape:
        key = wrong_shape[0]
        file_width = _width_of(sd)
        fix = f"set model.width: {file_width}" if file_width else "use a checkpoint of this architecture"
        raise CheckpointError(
            f"{source}: {len(wrong_shape)} trunk tensors do not fit a width-{model.width} HRNet (e.g. {key}: "
            f"{tuple(sd[key].shape)} in file vs {tuple(own[key].shape)} in model); {fix}"
        )
    stem = [k for k in own if k.split(".")[0] in STEM_MODULES]
    absent = [k for k in stem if k not in to_load]
    if absent:
        raise CheckpointError(
            f"{source}: covers {len(stem) - len(absent)} of the {len(stem)} HRNet stem/layer1 tensors (e.g. "
            f"{absent[0]!r} is missing) and {len(to_load)} of {len(own)} model tensors; this is not an HRNet "
            f"pose checkpoint; expected {EXPECTED_FILES}"
        )
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys   # only model keys were selected
    report.loaded = list(to_load)
    report.missing = list(result.missing_keys)
    logger.log(logging.WARNING if report.unused or _trunk(report.missing) else logging.INFO,
               "load_pretrained %s", report.summary())
    return report


def _width_of(sd: Mapping[str, Tensor]) -> int | None:
    w = sd.get("transition1.0.0.weight")
    return int(w.shape[0]) if w is not None and w.dim() == 4 else None


def _trunk(keys: list[str]) -> list[str]:
    return [k for k in keys if not k.startswith(HEAD_PREFIXES)]


def save_checkpoint(path: str | Path, model: MultiOutHRNet, **extra: Any) -> None:
    """Write an okdpose checkpoint atomically; `extra` holds plain data (numbers, strings, lists,
    dicts, tensors) such as epoch, optimizer state or metrics."""
    clash = RESERVED_KEYS & extra.keys()
    if clash:
        raise ValueError(f"save_checkpoint: extra keys {sorted(clash)} are reserved for the format")
    for key, value in extra.items():
        _check_plain(value, key)
    ckpt = {"format": FORMAT, "version": VERSION, "model": model.config(),
            # contiguous CPU copies: the file does not depend on device or memory format
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            **extra}
    with atomic_path(path) as tmp:
        save_deterministic(ckpt, tmp)


def _check_plain(value: Any, where: str) -> None:
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, (Tensor, torch.Size)):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_plain(k, f"{where} key")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"save_checkpoint: extra {where} is a {type(value).__name__}; store plain numbers, "
                    "strings, lists, dicts or tensors (weights_only loading refuses other objects)")


def load_model(path: str | Path, expect: Mapping[str, Any] | None = None,
               fix: str = "re-run the stage that writes it (dvc repro)") -> tuple[MultiOutHRNet, dict[str, Any]]:
    """Rebuild the model stored in an okdpose checkpoint, on CPU -> (model, checkpoint dict).

    `expect`: the configuration the caller's params ask for ({num_joints, width, n_stage, multi});
    a file holding another model raises CheckpointError naming both and `fix`."""
    source = str(path)
    if not Path(path).exists():
        raise CheckpointError(f"{source}: not found; {fix}")
    obj = read_checkpoint(path)                 # a folder is named as one there
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not an okdpose checkpoint (no 'format': '{FORMAT}'); for official or "
                              "other files build MultiOutHRNet(...) and call load_pretrained(model, path)")
    sd, _, config = unpack_checkpoint(obj, source)
    try:
        model = MultiOutHRNet(**config)
        model.load_state_dict(sd, strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{source}: stored model {config!r} does not rebuild: {e}") from None
    if expect is not None and model.config() != dict(expect):
        raise CheckpointError(f"{source} holds a model {model.config()}, params.yaml asks for {dict(expect)}; "
                              f"{fix}, or fix params.yaml model / data.joints")
    return model, dict(obj)


def save_resume(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write the resume state (`state`: every key of the format but format and version) atomically."""
    with atomic_path(path) as tmp:
        save_deterministic({"format": RESUME_FORMAT, "version": RESUME_VERSION, **state}, tmp)


def read_resume(path: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """-> (state, None) for a resume state this code reads; (None, why not) for a file that is
    unreadable, foreign or of another version; (None, None) when there is no file."""
    path = Path(path)
    if not path.is_file():
        return None, None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: the caller starts fresh
        return None, f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        return None, f"{path} is not an okdpose resume checkpoint"
    if state.get("version") != RESUME_VERSION:
        return None, (f"{path} is an okdpose resume checkpoint of version {state.get('version')!r}, this code "
                      f"reads version {RESUME_VERSION}")
    return state, None
