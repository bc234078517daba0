"""The model a checkpoint file alone defines: released OKD-HRNet files, official pose_hrnet files
and okdpose checkpoints -> `Architecture` (joints, width, stages, heads, and from which keys each
was read) and the loaded `MultiOutHRNet` (`load_released`), refusing what cannot be run exactly
as the original ran it.

    model, arch, report = load_released("pretrained/released/HRNet4-OKD.pth")
    print(arch.summary())            # HRNet-W32, 4 stages, an output per stage, 12 joints, read as ...
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from okdpose.joints import JOINT_SPECS
from okdpose.model.checkpoint import (EXPECTED_FILES, HEAD_PREFIXES, CheckpointError, LoadReport, abbrev_keys,
                                      load_state, read_checkpoint, unpack_checkpoint)
from okdpose.model.hrnet import LAYER1_CHANNELS, MAX_STAGES, STEM_MODULES, HRNetTrunk, full_trunk_keys
from okdpose.model.multi_out import MultiOutHRNet, head_name

logger = logging.getLogger(__name__)

# --- The file alone defines the model: released OKD-HRNet, official and okdpose checkpoints -------
#
# Facts from the original code (OKD-HRNet `lib/models/multi_out_pose_hrnet.py`, a subclass of the
# official `lib/models/pose_hrnet.py` PoseHighResolutionNet; tests/original_hrnet.py re-builds it):
# - PoseHighResolutionNet always builds the whole 4-stage trunk and `final_layer`, whatever
#   MODEL.N_STAGE: a released file holds stage2..4, transition1..3 and final_layer even for N_STAGE < 4.
# - MultiOutPoseHrnet adds N_STAGE heads `intermediate_layers.{0..N_STAGE-1}`, 1x1 convs
#   (FINAL_CONV_KERNEL 1) from MODEL.OUT_CHANNELS (32, the width) to NUM_JOINTS.
# - Its forward: head k (0-based) reads branch 0 after transition k+1, i.e. transition1's 256 -> width
#   conv for k = 0 and stage k+1's branch-0 output for k >= 1 (transitions pass existing branches
#   through); it stops after N_STAGE heads, and with N_STAGE 4 appends final_layer on stage 4's
#   branch 0. So intermediate_layers.3 is built but never run, and with N_STAGE < 4 final_layer and
#   the trunk after stage N_STAGE are never run. This is MultiOutHRNet's layout: the head of stage k
#   is intermediate_layers.{k-1} (k < 4) or final_layer (k = 4), reading feature_taps.{k-1}.
# - MODEL.MULTI changes only the loss (false: the last output alone). A head outside the loss (all
#   but the last with MULTI false; students outside LOSS.KLD_COUPLES) keeps init_weights' values,
#   bias exactly 0, which is how `infer_architecture` tells an untrained head.
# - tools/train.py writes checkpoint.pth {epoch, model: MODEL.NAME, state_dict (DataParallel,
#   `module.`-prefixed, last epoch), best_state_dict, perf, optimizer}; model_best_epoch{N}.pth and
#   final_state.pth are plain state_dicts. tools/test.py loads TEST.MODEL_FILE with strict=False.

LAYOUTS = {
    "okdpose": "an okdpose checkpoint (its stored model config)",
    "official": "an official pose_hrnet state_dict (the 4-stage trunk and final_layer, one output)",
    "okd-hrnet": "an OKD-HRNet MultiOutPoseHrnet state_dict (intermediate_layers.0..N_STAGE-1, the whole trunk "
                 "and final_layer)",
    "multi-out": "a MultiOutHRNet state_dict (the trunk up to its last stage, heads on its output stages)",
}
PARAM_KEYS = {"num_joints": "data.joints", "width": "model.width", "n_stage": "model.n_stage", "multi": "model.multi"}
_HEAD_KEY = re.compile(r"(final_layer|intermediate_layers\.(\d+))\.(weight|bias)")
_BN_COUNTER = "num_batches_tracked"     # absent from files of PyTorch < 0.4.1; read only when BN momentum is None


@dataclass
class Architecture:
    """The MultiOutHRNet a checkpoint file defines (`config()`), and how each field was read from it."""

    num_joints: int
    width: int
    n_stage: int
    multi: bool
    layout: str                                                # a LAYOUTS key
    notes: list[str] = field(default_factory=list)             # what was inferred, from which keys
    untrained_heads: list[str] = field(default_factory=list)   # heads the model runs that hold init values
    unused: list[str] = field(default_factory=list)            # file modules the model does not run

    def config(self) -> dict[str, int | bool]:
        """`MultiOutHRNet(**config())`; the same dict as `MultiOutHRNet.config()` and `Params.model_config()`."""
        return {"num_joints": self.num_joints, "width": self.width, "n_stage": self.n_stage, "multi": self.multi}

    def describe(self) -> str:
        outputs = "an output per stage" if self.multi else "one output"
        return f"HRNet-W{self.width}, {self.n_stage} stages, {outputs}, {self.num_joints} joints"

    def summary(self) -> str:
        return "\n".join([f"{self.describe()}, read as {LAYOUTS[self.layout]}"] + [f"  {n}" for n in self.notes])

    def to_dict(self) -> dict[str, Any]:
        return {**self.config(), "layout": self.layout, "notes": list(self.notes),
                "untrained_heads": list(self.untrained_heads), "unused": list(self.unused)}


@dataclass(frozen=True)
class _Reading:
    """One way the file's keys can be run: the model it builds and what says so."""

    n_stage: int
    multi: bool
    layout: str
    why: str


def infer_architecture(state_dict: Mapping[str, Tensor], *, source: str = "checkpoint",
                       expect: Mapping[str, Any] | None = None) -> Architecture:
    """The MultiOutHRNet that runs `state_dict` (official, OKD-HRNet or MultiOutHRNet keys, `module.`
    prefix allowed) as its own code did; raises CheckpointError for keys no HRNet reading fits.

    When the keys allow several readings (MODEL.MULTI is not stored; three intermediate heads with
    final_layer are OKD-HRNet's N_STAGE 3 or a 4-stage model), the one matching `expect`'s n_stage /
    multi is taken, else the deepest whose last head was trained; `notes` says which and why.
    """
    sd = dict(state_dict)
    notes: list[str] = []
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        notes.append("`module.` prefix (DataParallel) removed from every key")
    heads, trunk, odd = _split_keys(sd)
    width = _infer_width(trunk, source)
    notes.append(f"width {width} from conv transition1.0.0.weight {tuple(trunk['transition1.0.0.weight'].shape)} "
                 f"(layer1's 256 channels -> branch 0)")
    odd += [k for k in trunk if k not in full_trunk_keys(width)]
    if odd:
        raise CheckpointError(
            f"{source}: {len(odd)} keys are neither HRNet-W{width} trunk nor heatmap heads (final_layer, "
            f"intermediate_layers.k): {abbrev_keys(odd)}; a model with extra modules cannot be rebuilt from the file "
            "alone: delete those keys from the state_dict (or use the file as model.pretrained, which reports "
            "them unused)"
        )
    depth = _check_trunk(trunk, width, source)
    notes.append(_depth_note(depth))
    if not any(k.endswith(_BN_COUNTER) for k in trunk):
        notes.append(f"no BatchNorm {_BN_COUNTER} counters (PyTorch < 0.4.1 file): left at 0, unused in eval")
    num_joints, head_note = _check_heads(heads, width, source)
    notes.append(head_note)
    at_init = sorted(h for h, parts in heads.items() if not parts["bias"].any())
    chosen = _choose(_readings(sorted(heads), depth, at_init, source), at_init, _never_ran(trunk), expect, notes)
    arch = Architecture(num_joints, width, chosen.n_stage, chosen.multi, chosen.layout, notes)
    used = _model_keys(arch.config())
    used_heads = [h for h in sorted(heads, key=_module_order) if f"{h}.weight" in used]
    arch.untrained_heads = [h for h in used_heads if h in at_init]
    if arch.untrained_heads:
        notes.append(f"heads {', '.join(arch.untrained_heads)} hold their initial values (bias exactly 0): never "
                     "trained (outside the original's loss), their outputs mean nothing")
    arch.unused = _unused_modules(sd, used)
    for module in arch.unused:
        notes.append(f"unused {module} skipped")
    return arch


def _split_keys(sd: Mapping[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor], list[str]]:
    """-> (heads {name: {weight, bias}}, trunk {key: tensor}, head-like keys of no head)."""
    heads: dict[str, dict[str, Tensor]] = {}
    trunk: dict[str, Tensor] = {}
    odd: list[str] = []
    for key, value in sd.items():
        match = _HEAD_KEY.fullmatch(key)
        if match:
            heads.setdefault(match.group(1), {})[match.group(3)] = value
        elif key.startswith(HEAD_PREFIXES):
            odd.append(key)
        else:
            trunk[key] = value
    return heads, trunk, odd


def _choose(readings: list[_Reading], at_init: list[str], never_ran: list[int],
            expect: Mapping[str, Any] | None, notes: list[str]) -> _Reading:
    """The reading `expect` asks for, else the deepest whose teacher was trained; notes why.

    An OKD-HRNet file of N_STAGE 3 always leaves final_layer at init (bias 0) or, trained from
    scratch, stage 4 unrun (BN counters 0); with both trained the same keys are a 4-stage model."""
    doubts = {r: _doubt(r, at_init, never_ran) for r in readings}
    trusted = [r for r in readings if doubts[r] is None]
    if trusted:
        for n_stage, why in sorted({(r.n_stage, doubts[r]) for r in readings if doubts[r]}):
            notes.append(f"not n_stage {n_stage}: {why}")
        readings = sorted(trusted, key=lambda r: -r.n_stage)       # stable: the heads' multi first
    else:
        notes.append(f"looks untrained: {doubts[readings[0]]} (an initialisation, not a trained model?)")
    chosen = readings[0]
    if expect is not None:
        fits = [r for r in readings if all(expect.get(k, getattr(r, k)) == getattr(r, k) for k in ("n_stage", "multi"))]
        chosen = fits[0] if fits else chosen
    notes.append(chosen.why)
    others = sorted({(r.n_stage, r.multi) for r in readings} - {(chosen.n_stage, chosen.multi)}, reverse=True)
    if others:
        notes.append("the keys also fit " + ", ".join(f"n_stage {n} multi {m}" for n, m in others)
                     + ": expect (params' model.n_stage / model.multi) picks among them")
    return chosen


def _infer_width(trunk: Mapping[str, Tensor], source: str) -> int:
    w = trunk.get("transition1.0.0.weight")
    if w is None or w.dim() != 4 or w.shape[1] != LAYER1_CHANNELS or w.shape[0] < 1:
        found = "no such key" if w is None else f"shape {tuple(w.shape)}"
        raise CheckpointError(
            f"{source}: the HRNet width is read from conv transition1.0.0.weight (width, {LAYER1_CHANNELS}, 3, 3), "
            f"found {found}; this is not an HRNet pose checkpoint; expected {EXPECTED_FILES}"
        )
    return int(w.shape[0])


def _check_trunk(trunk: Mapping[str, Tensor], width: int, source: str) -> int:
    """-> the deepest stage with keys in the file, after checking stages 1..it are complete and every
    trunk tensor has the shape of an HRNet-W{width}."""
    shapes = _trunk_shapes(width, MAX_STAGES)
    wrong = [k for k, v in trunk.items() if tuple(v.shape) != shapes[k]]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{source}: {len(wrong)} trunk tensors do not have the shapes of an HRNet-W{width} (W{width} read from "
            f"transition1.0.0.weight; e.g. {k}: {tuple(trunk[k].shape)} in the file, {shapes[k]} expected); okdpose "
            "builds the official W18/W32/W48 stage layout (1/4/3 modules of 4 BasicBlocks, branches doubling in "
            "width): a file of another layout cannot be loaded"
        )
    depth = max([k for k in range(2, MAX_STAGES + 1) if any(key.startswith(f"stage{k}.") for key in trunk)], default=1)
    need = [k for k in _trunk_shapes(width, depth) if k not in trunk and not k.endswith(_BN_COUNTER)]
    if need:
        parts = sorted({k.split(".")[0] for k in need}, key=_module_order)
        raise CheckpointError(
            f"{source}: the trunk is incomplete: {len(need)} tensors of {', '.join(parts)} are missing (e.g. "
            f"{need[0]}) while stage{depth}.* is present; the file is cut short or from another architecture: "
            "download or export it again"
        )
    return depth


def _depth_note(depth: int) -> str:
    if depth == MAX_STAGES:
        return f"trunk: stage2..stage{MAX_STAGES} present"
    if depth == 1:
        return "trunk: stem and layer1 only, stage2.* absent"
    return f"trunk: stage{depth}.* present, stage{depth + 1}.* absent"


def _check_heads(heads: Mapping[str, Mapping[str, Tensor]], width: int, source: str) -> tuple[int, str]:
    """-> (joint count, note), after checking every head is a 1x1 conv width -> J with one J for all."""
    if not heads:
        raise CheckpointError(
            f"{source}: no heatmap head (final_layer or intermediate_layers.k): a backbone, not a pose model, so the "
            "joint count is unknown; use it as model.pretrained to initialise training instead"
        )
    joints: dict[str, int] = {}
    for name, parts in sorted(heads.items()):
        w, b = parts.get("weight"), parts.get("bias")
        if w is None or b is None:
            raise CheckpointError(f"{source}: head {name} has no {'weight' if w is None else 'bias'}; the file is "
                                  "cut short: download or export it again")
        if w.dim() != 4 or tuple(w.shape[1:]) != (width, 1, 1) or tuple(b.shape) != (w.shape[0],):
            raise CheckpointError(
                f"{source}: head {name} has weight {tuple(w.shape)} and bias {tuple(b.shape)}; okdpose heads are 1x1 "
                f"convs from the width-{width} branch 0 (J, {width}, 1, 1) (the original's FINAL_CONV_KERNEL 1)"
            )
        joints[name] = int(w.shape[0])
    if len(set(joints.values())) > 1:
        raise CheckpointError(
            f"{source}: heads of different joint counts ({', '.join(f'{h}: {j}' for h, j in joints.items())}); one "
            "model predicts one joint set: delete the other heads from the state_dict, or use the file as "
            "model.pretrained (heads of another joint count are skipped there)"
        )
    first = min(joints, key=_module_order)
    return joints[first], (f"num_joints {joints[first]} from the output channels of {len(joints)} head"
                           f"{'s' * (len(joints) > 1)}, e.g. {first}.weight {tuple(heads[first]['weight'].shape)}")


def _readings(heads: list[str], depth: int, at_init: list[str], source: str) -> list[_Reading]:
    """Every (n_stage, multi) the heads and trunk depth allow, the original's first."""
    inter = sorted(int(h.split(".")[1]) for h in heads if h != "final_layer")
    final = "final_layer" in heads
    n = len(inter)
    if inter and inter == list(range(n)) and n <= MAX_STAGES and (n < MAX_STAGES or final):
        if depth < n:
            raise CheckpointError(
                f"{source}: heads intermediate_layers.0..{n - 1} run {n} stages but the trunk ends at stage {depth} "
                f"(stage{depth + 1}.* absent): the file is cut short or inconsistent"
            )
        names = "intermediate_layers." + ("0" if n == 1 else f"0..{n - 1}")
        why = (f"n_stage {n}: {n} head{'s' * (n > 1)} {names} (the original builds one per stage, MODEL.N_STAGE"
               + ("; with 4 the stage-4 output is final_layer)" if n == MAX_STAGES else ")"))
        readings = _with_multi(n, "okd-hrnet" if final or depth > n else "multi-out", why, at_init)
        if n == MAX_STAGES - 1 and final and depth == MAX_STAGES:
            readings += _with_multi(MAX_STAGES, "multi-out", "n_stage 4: heads intermediate_layers.0..2 and "
                                    "final_layer on the 4-stage trunk (a MultiOutHRNet, or an OKD-HRNet 4-stage "
                                    "file without its unused intermediate_layers.3)", at_init)
        return readings
    if not inter and final and depth == MAX_STAGES:
        return [_Reading(MAX_STAGES, False, "official", "n_stage 4, multi False: final_layer is the only head "
                         "(official pose_hrnet)")]
    if len(inter) == 1 and not final and inter[0] + 1 <= depth:
        k = inter[0] + 1
        return [_Reading(k, False, "multi-out", f"n_stage {k}, multi False: intermediate_layers.{k - 1} (the stage-{k} "
                         "head) is the only head")]
    raise CheckpointError(
        f"{source}: heads {', '.join(heads)} on a trunk up to stage {depth} fit no known layout: OKD-HRNet "
        "(intermediate_layers.0..N-1, plus final_layer when N = 4), official (final_layer on the 4-stage trunk) or "
        "a single-output MultiOutHRNet (one intermediate_layers.{N-1} on an N-stage trunk)"
    )


def _with_multi(n: int, layout: str, why: str, at_init: list[str]) -> list[_Reading]:
    """The multi and the single-output reading of heads on stages 1..n; the one the heads support first."""
    runs = [head_name(k) for k in range(1, n + 1)]
    earlier_untrained = n > 1 and all(h in at_init for h in runs[:-1])
    multi_why = (f"; multi False: heads {', '.join(runs[:-1])} are at init (bias exactly 0), trained with "
                 "MODEL.MULTI false" if earlier_untrained else
                 "; multi True: a trained head on every stage (MODEL.MULTI itself is not stored)")
    return [_Reading(n, not earlier_untrained, layout, why + multi_why),
            _Reading(n, earlier_untrained, layout, why + f"; multi {earlier_untrained} as params ask "
                     "(MODEL.MULTI is not stored in the file)")]


def _doubt(reading: _Reading, at_init: list[str], never_ran: list[int]) -> str | None:
    """Why `reading`'s teacher cannot be the trained output, or None."""
    teacher = head_name(reading.n_stage)
    if teacher in at_init:
        return f"its last head {teacher} holds init values (bias exactly 0)"
    if reading.n_stage in never_ran:
        return f"stage{reading.n_stage} never ran in training (its BatchNorm {_BN_COUNTER} are all 0)"
    return None


def _never_ran(trunk: Mapping[str, Tensor]) -> list[int]:
    """Stages whose BatchNorm counters are all 0: never run in training mode (absent counters: unknown)."""
    out = []
    for k in range(2, MAX_STAGES + 1):
        counters = [v for key, v in trunk.items() if key.startswith(f"stage{k}.") and key.endswith(_BN_COUNTER)]
        if counters and not any(bool(c.any()) for c in counters):
            out.append(k)
    return out


def _unused_modules(sd: Mapping[str, Tensor], used: frozenset[str]) -> list[str]:
    """File modules the model does not run: heads by name, trunk modules by top-level name."""
    out: dict[str, None] = {}
    for key in sorted((k for k in sd if k not in used), key=_module_order):
        if key.startswith(HEAD_PREFIXES):
            out[key.rsplit(".", 1)[0]] = None
        else:
            top = key.split(".")[0]
            built = any(k.startswith(f"{top}.") for k in used)
            out[f"{top} outputs for branches >= 1 (only branch 0 is read)" if built else f"{top}.*"] = None
    return list(out)


def _module_order(key: str) -> tuple[int, str]:
    """Forward order: stem, layer1, transition k before stage k + 1, heads by stage."""
    top = key.split(".")[0]
    match = re.fullmatch(r"(stage|transition)(\d)", top)
    if match:
        return 2 * int(match.group(2)) + (match.group(1) == "transition"), key
    if top == "intermediate_layers":
        return 100 + int(key.split(".")[1]), key
    return (0 if top in STEM_MODULES[:4] else 1 if top == "layer1" else 200), key     # final_layer last


@functools.lru_cache(maxsize=32)
def _trunk_shapes(width: int, n_stage: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in HRNetTrunk(width, n_stage).state_dict().items()}


def _model_keys(config: Mapping[str, Any]) -> frozenset[str]:
    return _model_keys_of(*(config[k] for k in PARAM_KEYS))


@functools.lru_cache(maxsize=32)
def _model_keys_of(num_joints: int, width: int, n_stage: int, multi: bool) -> frozenset[str]:
    # the trunk's keys plus a head per output stage (MultiOutHRNet.output_stages); building the
    # whole MultiOutHRNet on the meta device would take seconds (init_weights), for the same keys
    stages = range(1, n_stage + 1) if multi else (n_stage,)
    heads = {f"{head_name(k)}.{part}" for k in stages for part in ("weight", "bias")}
    return frozenset(_trunk_shapes(width, n_stage)) | heads


def check_expected(arch: Architecture, expect: Mapping[str, Any] | None, source: str) -> None:
    """CheckpointError naming every field where the file's model differs from `expect` (a subset of
    {num_joints, width, n_stage, multi}, e.g. `Params.model_config()`) and the params keys to set."""
    if expect is None:
        return
    extra = set(expect) - set(PARAM_KEYS)
    if extra:
        raise ValueError(f"expect: unknown keys {sorted(extra)}; use {sorted(PARAM_KEYS)}")
    have = arch.config()
    diffs = [k for k in PARAM_KEYS if k in expect and expect[k] != have[k]]
    if diffs:
        what = "; ".join(f"{k} {have[k]} in the file, {expect[k]} in params ({PARAM_KEYS[k]})" for k in diffs)
        fixes = ", ".join(_joints_fix(have[k]) if k == "num_joints" else f"{PARAM_KEYS[k]}: "
                          f"{str(have[k]).lower() if isinstance(have[k], bool) else have[k]}" for k in diffs)
        raise CheckpointError(f"{source} holds {arch.describe()}, not what params.yaml configures: {what}; set "
                              f"{fixes} to use this file as it is, or choose a checkpoint of the configured model")


def _joints_fix(num_joints: int) -> str:
    names = [name for name, spec in JOINT_SPECS.items() if spec.num_joints == num_joints]
    return (f"data.joints: {' or '.join(names)}" if names else
            f"data.joints to a joint set of {num_joints} joints (okdpose.joints has none; add one)")


def load_released(path: str | Path, *, expect: Mapping[str, Any] | None = None
                  ) -> tuple[MultiOutHRNet, Architecture, LoadReport]:
    """Rebuild, from the file alone, the model a checkpoint holds and load it (eval mode, CPU), with
    outputs equal to the original model's -> (model, how it was inferred, key report).

    Reads what `load_pretrained` reads: okdpose files (their stored config), official pose_hrnet
    state_dicts, OKD-HRNet multi-output ones, `module.` prefixes, dicts holding a `state_dict`.
    Unlike it, refuses what it cannot run exactly (foreign keys, a partial trunk, odd shapes,
    mixed joint counts). `expect` ({num_joints, width, n_stage, multi} or a subset) picks among
    readings the keys allow and must then match, else CheckpointError names each difference.
    """
    source = str(path)
    obj = read_checkpoint(path)
    sd, kind, config = unpack_checkpoint(obj, source)
    if config is not None:
        arch = _stored_architecture(config, source)
    else:
        arch = infer_architecture(sd, source=source, expect=expect)
        if kind == "wrapped state_dict":
            rest = ", ".join(sorted(str(k) for k in obj if k != "state_dict"))
            arch.notes.insert(0, f"state_dict of a training checkpoint dict (also holds {rest or 'nothing else'})"
                              + ("; best_state_dict (the original's best epoch) is not loaded: save it alone to "
                                 "use it" if "best_state_dict" in obj else ""))
        raw = obj["state_dict"] if kind == "wrapped state_dict" else obj
        if all(str(k).startswith("module.") for k in raw):
            arch.notes.insert(0, "`module.` prefix (DataParallel) removed from every key")
    check_expected(arch, expect, source)
    try:
        model = MultiOutHRNet(**arch.config())
    except (TypeError, ValueError) as e:     # an okdpose file's stored config
        raise CheckpointError(f"{source}: stored model {arch.config()!r} does not rebuild: {e}") from None
    report = load_state(model, sd, kind, config, source)
    missing = [k for k in report.missing if not k.endswith(_BN_COUNTER)]
    if missing or report.unused:
        bad = missing or report.unused
        raise CheckpointError(f"{source}: its keys do not fit the {arch.describe()} it declares ({len(missing)} "
                              f"missing, {len(report.unused)} unused, e.g. {bad[0]}); re-save it with "
                              "okdpose.model.save_checkpoint")
    logger.info("load_released %s: %s", source, arch.summary())
    return model.eval(), arch, report


def _stored_architecture(config: Mapping[str, Any], source: str) -> Architecture:
    if set(config) != set(PARAM_KEYS):
        raise CheckpointError(f"{source}: okdpose checkpoint whose model config has keys {sorted(config)}, not "
                              f"{sorted(PARAM_KEYS)}; re-save it with okdpose.model.save_checkpoint")
    return Architecture(**{k: config[k] for k in PARAM_KEYS}, layout="okdpose",
                        notes=["num_joints, width, n_stage, multi from the file's model config (format okdpose)"])
