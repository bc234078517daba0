"""One interface over every model `okdpose predict` runs: an exported ONNX or TorchScript stage, or
one stage (or anytime early exit) of an okdpose checkpoint, each with the `DeployMeta` it needs.

Legend: B crops, J joints, (h, w) = meta.image_size[::-1], (hh, hw) = meta.heatmap_size[::-1].

    runner = load_runner("models/export/stage3.onnx")                 # or stage3.pt (TorchScript)
    runner = load_runner("models/model.pt", stage=3)                  # okdpose checkpoint + params.yaml
    runner = load_runner("models/model.pt", exit_threshold=0.5)       # anytime: exit at the first confident stage
    heatmaps, exit_stage = runner(batch)     # float32 (B, 3, h, w) normalised -> (B, J, hh, hw) float32, (B,) int64
    runner.meta                              # joints, sizes, normalisation, depth range, stage

What a file is: `.onnx` by its suffix (onnxruntime, CPUExecutionProvider; metadata_props
"okdpose"); any other file is tried as TorchScript first (an `okdpose.json` extra file holds the
metadata; a file torch.jit cannot load is not TorchScript) and then as an okdpose checkpoint
(`{"format": "okdpose", ...}`, read with weights_only=True). A checkpoint carries no data
settings: its DeployMeta is built from the params file's `data` section (`DeployMeta.from_params`)
and the checkpoint's model config, and it runs as `okdpose.inference.predict` runs it (BN folded
inference copy, channels-last on the CPU, no_grad). `exit_stage` is the stage that produced each
sample's heatmaps: `meta.stage` except for anytime runners.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from okdpose.deploy_meta import META_KEY, DeployMeta, MetaError

log = logging.getLogger(__name__)

TORCHSCRIPT_META = META_KEY + ".json"


class ModelError(ValueError):
    """A model file that cannot be run as asked; the message names the file and the fix."""


class Runner:
    """Base of the runners: `meta`, `path`, `backend`, and `__call__(batch) -> (heatmaps, exit_stage)`."""

    backend = "?"

    def __init__(self, path: Path, meta: DeployMeta) -> None:
        self.path, self.meta = path, meta
        self._checked = False

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        (w, h) = self.meta.image_size
        if x.ndim != 4 or x.shape[1:] != (3, h, w):
            raise ValueError(f"{self.path}: the model takes (B, 3, {h}, {w}) crops (meta.image_size [w, h] = "
                             f"{[w, h]}), got {tuple(x.shape)}")
        heatmaps, exit_stage = self.run(x)
        if not self._checked:             # once: a graph that disagrees with its own metadata
            self._check_output(heatmaps)
            self._checked = True
        return np.asarray(heatmaps, dtype=np.float32), np.asarray(exit_stage, dtype=np.int64).reshape(len(x))

    def _check_output(self, hm: np.ndarray) -> None:
        m = self.meta
        want = (m.num_joints, m.heatmap_size[1], m.heatmap_size[0])
        if hm.ndim != 4 or tuple(hm.shape[1:]) != want:
            raise ModelError(f"{self.path}: the model outputs {tuple(hm.shape)} heatmaps, its metadata says "
                             f"(B, {m.num_joints} joints, {want[1]}, {want[2]}); re-export it (okdpose export)")

    def describe(self) -> str:
        m = self.meta
        return (f"{self.path} ({self.backend}, stage {m.stage} of a {m.n_stage_trained}-stage W{m.width}, "
                f"{m.num_joints} {m.joints} joints, input {m.image_size[0]}x{m.image_size[1]})")


class OnnxRunner(Runner):
    backend = "onnx"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3              # errors only (no graph-optimisation chatter)
        if threads is not None:
            opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
        try:
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise ModelError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {_first_line(e)}); "
                             "export it again (okdpose export or dvc repro export)") from None
        text = session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if text is None:
            raise ModelError(f"{path}: an ONNX model without okdpose metadata (metadata_props[{META_KEY!r}]); "
                             "export it with okdpose export, which embeds the joints, sizes and normalisation")
        super().__init__(path, _meta(text, path))
        self.session = session
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        (w, h) = self.meta.image_size
        dims = list(inp.shape)
        if len(dims) == 4 and all(isinstance(d, int) for d in dims[2:]) and tuple(dims[2:]) != (h, w):
            raise ModelError(f"{path}: the graph takes {dims[3]}x{dims[2]} inputs but its metadata says image_size "
                             f"{[w, h]}; re-export it")

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.session.run(None, {self.input_name: batch})
        return out[-1], np.full(len(batch), self.meta.stage)


class TorchRunner(Runner):
    """A torch module (TorchScript, or the folded copy of a checkpoint's stage) on `device`."""

    def __init__(self, path: Path, meta: DeployMeta, module: Any, device: Any, backend: str,
                 anytime_threshold: float | None = None) -> None:
        import torch

        super().__init__(path, meta)
        self.module, self.device, self.backend = module, device, backend
        self.threshold = anytime_threshold
        # eager CPU models run channels-last (their folded weights are); a traced TorchScript file
        # holds contiguous weights and is fed contiguous inputs, as okdpose export times it
        cl = device.type == "cpu" and backend != "torchscript"
        self._format = torch.channels_last if cl else torch.contiguous_format

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        x = torch.from_numpy(batch).to(self.device).contiguous(memory_format=self._format)
        with torch.no_grad():
            if self.threshold is not None:
                hm, stage = self.module(x, self.threshold)
                return hm.float().cpu().numpy(), stage.cpu().numpy()
            out = self.module(x)
        if isinstance(out, (list, tuple)):
            out = out[-1]          # a multi-output module: the deepest output is the stage asked for
        return out.float().cpu().numpy(), np.full(len(batch), self.meta.stage)


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def _meta(text: str | bytes, path: Path) -> DeployMeta:
    try:
        return DeployMeta.from_json(text, where=f"{path}: okdpose metadata")
    except (MetaError, TypeError) as e:
        raise ModelError(str(e)) from None


def _device(device: str):
    from okdpose.device import resolve_device

    return resolve_device(device, "--device")


def _load_torchscript(path: Path, device: Any) -> Any | None:
    """The TorchScript module and its metadata text, or None when torch.jit cannot load the file."""
    import warnings

    import torch

    extra = {TORCHSCRIPT_META: ""}
    try:
        with warnings.catch_warnings():      # torch 2.9+: "torch.jit.load is deprecated"; the export format is still it
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception:  # noqa: BLE001 - not TorchScript (a checkpoint zip, garbage): try the next kind
        return None
    return module, extra[TORCHSCRIPT_META]


def load_runner(path: str | Path, *, stage: int | None = None, exit_threshold: float | None = None,
                device: str = "cpu", params: str | Path = "params.yaml", threads: int | None = None) -> Runner:
    """The runner of the model file at `path` (see the module docstring).

    stage: which output of an okdpose checkpoint to run (required for one, unless
    `exit_threshold`; then the deepest stage it may run, default the last); an exported file
    holds one stage and accepts only that one. exit_threshold: anytime early exit with threshold
    τ (okdpose checkpoints of a multi-output model only). params: the params file whose `data`
    section describes a checkpoint's input (sizes, sigma, depth range). threads: onnxruntime's
    intra-op threads (default: its own, one per core); torch models use torch's setting
    (`torch.set_num_threads`).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found; give an exported model (models/export/stage{{k}}.onnx "
                         "or .pt, from dvc repro) or models/model.pt with --stage k")
    if exit_threshold is not None and not exit_threshold >= 0:     # NaN fails too; inf: never exit early
        raise ModelError(f"--exit-threshold must be >= 0 (0: every frame exits at the first stage), got {exit_threshold}")
    if path.suffix.lower() == ".onnx":
        runner: Runner = OnnxRunner(path, threads)
        if device not in ("cpu", "auto"):
            raise ModelError(f"{path}: ONNX models run on the CPU here (onnxruntime CPU build); drop --device or "
                             "use the TorchScript export (.pt) on the GPU")
    else:
        dev = _device(device)
        loaded = _load_torchscript(path, dev)
        if loaded is not None:
            module, text = loaded
            if not text:
                raise ModelError(f"{path}: a TorchScript file without okdpose metadata (extra file "
                                 f"{TORCHSCRIPT_META!r}); export it with okdpose export")
            runner = TorchRunner(path, _meta(text, path), module.eval(), dev, "torchscript")
        else:
            return _checkpoint_runner(path, stage, exit_threshold, dev, Path(params))
    if exit_threshold is not None:
        raise ModelError(f"{path}: an exported file holds one stage (stage {runner.meta.stage}) and cannot exit "
                         "early; use --exit-threshold with the checkpoint (models/model.pt)")
    if stage is not None and stage != runner.meta.stage:
        raise ModelError(f"{path} is the stage-{runner.meta.stage} export; --stage {stage} needs "
                         f"stage{stage} of models/export/ (export.stages in params.yaml) or models/model.pt")
    return runner


# the data keys that define what a checkpoint's input and heatmaps mean
INPUT_KEYS = ("image_size", "heatmap_size", "sigma", "depth_range")


def _warn_input_drift(path: Path, params_path: Path, given: Mapping[str, Any], trained: Any) -> None:
    """Warn when the params file describes another input than the checkpoint was trained on (e.g.
    params.yaml edited after training): the model then runs at that size, and its keypoints move."""
    if not isinstance(trained, Mapping):
        return                 # a checkpoint without its params: nothing to compare
    diff = [f"data.{k} {list(given[k]) if isinstance(given[k], (list, tuple)) else given[k]} "
            f"(trained with {trained[k]})" for k in INPUT_KEYS if k in trained and _plain(trained[k]) != _plain(given[k])]
    if diff:
        log.warning("%s: %s describes another input than %s was trained on: %s; it runs as given, and its keypoints "
                    "move (pass --params with the params the model was trained with)", path, params_path, path.name,
                    "; ".join(diff))


def _plain(v: Any) -> Any:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v)


def _checkpoint_runner(path: Path, stage: int | None, exit_threshold: float | None, device: Any,
                       params_path: Path) -> Runner:
    from okdpose.model.checkpoint import FORMAT, CheckpointError, load_model
    from okdpose.model.fuse import inference_copy
    from okdpose.model.multi_out import MultiOutHRNet
    from okdpose.params import load_params

    try:
        full, ckpt = load_model(path)
    except CheckpointError as e:
        raise ModelError(f"{e}. Give an exported model (.onnx, or a TorchScript .pt from okdpose export) or an "
                         f"okdpose checkpoint ('format': '{FORMAT}', e.g. models/model.pt)") from None
    cfg = full.config()
    stages = full.output_stages
    if stage is None and exit_threshold is None:
        raise ModelError(f"{path} is a checkpoint with outputs at stages {list(stages)}: choose one with --stage k "
                         "(or --exit-threshold τ for anytime early exit)")
    k = stage if stage is not None else cfg["n_stage"]
    if k not in stages:
        why = "" if cfg["multi"] else " (trained with model.multi: false, only the last stage has a head)"
        raise ModelError(f"{path}: --stage {k} is not an output of this model{why}; choose one of {list(stages)}")
    p = load_params(params_path)
    spec = p.joint_spec
    if spec.num_joints != cfg["num_joints"]:
        raise ModelError(f"{path} predicts {cfg['num_joints']} joints but {params_path} data.joints is "
                         f"{spec.name!r} ({spec.num_joints} joints); use the params.yaml the model was trained with")
    if any(v % (4 * 2 ** (k - 1)) for v in p.data.image_size):
        raise ModelError(f"{params_path}: data.image_size {list(p.data.image_size)} is not a multiple of "
                         f"{4 * 2 ** (k - 1)}, which a {k}-stage HRNet needs")
    _warn_input_drift(path, params_path, p.to_dict()["data"], (ckpt.get("params") or {}).get("data"))
    meta = DeployMeta.for_model(p, full, stage=k, source={"checkpoint": str(path)})
    if exit_threshold is not None and (not cfg["multi"] or k < 2):
        raise ModelError(f"{path}: anytime early exit needs a multi-output model (model.multi: true) and at least two "
                         f"stages to choose from (--stage >= 2); this one has outputs {list(stages)}, --stage {k}")
    # only what stage k reads: the trunk up to k and its head (all heads up to k for early exit)
    model = MultiOutHRNet(cfg["num_joints"], cfg["width"], n_stage=k, multi=exit_threshold is not None)
    missing, _ = model.load_state_dict(full.state_dict(), strict=False)
    if missing:       # cannot happen for a checkpoint of this code: truncation only drops keys
        raise ModelError(f"{path}: the stage-{k} model lacks {len(missing)} weights ({missing[:3]}...)")
    model = model.to(device).eval()
    if exit_threshold is not None:
        from okdpose.anytime import AnytimeHRNet

        anytime = AnytimeHRNet(model)
        meta = dataclasses.replace(meta, source={**meta.source, "exit_threshold": float(exit_threshold)})
        return TorchRunner(path, meta, anytime, device, "checkpoint anytime", anytime_threshold=float(exit_threshold))
    fast = inference_copy(model, channels_last=device.type == "cpu")
    return TorchRunner(path, meta, fast, device, "checkpoint")
