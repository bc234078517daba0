"""The training fingerprint: a digest of everything a training result depends on (training params,
init weights, prepared data, the training code), which decides whether `last.pt` may be resumed,
and the readable list of what changed between two of them.

    parts = fingerprint_parts(p.flat(), PARAMS, "models/init.pt", "data/prepared")
    fingerprint(parts)                    # sha256 hex
    describe_changes(old_parts, parts)    # 'params.loss.kld_weight: 0.5 -> 0.25, init_sha256 changed'
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from okdpose.files import sha256_file
from okdpose.params import flatten

# the okdpose sources that decide a training result: exactly the src/okdpose deps of train-okd in
# dvc.yaml (tests/test_fingerprint.py compares the two), in that order
TRAINING_CODE = ("train.py", "given_model.py", "device.py", "distributed.py", "seeding.py", "fingerprint.py",
                 "reports.py", "losses.py", "data", "codec.py", "geometry.py", "evaluation.py", "inference.py",
                 "metrics.py", "joints.py", "tracking.py", "energy.py", "model")
# the prepared data training reads (train samples, val samples and their COCO ground truth)
PREPARED_FILES = ("meta.json", "train_gt.npz", "val_gt.npz", "val_gt.json")
# params that change how a run executes, not what it computes: a run resumes across them
# (train.nproc_per_node sets the world size, which last.pt records and the Trainer checks itself:
# a finished run is accepted at any world size, an unfinished one resumes only at its own;
# train.val_batch_size moves the validation numbers by float rounding only)
NOT_FINGERPRINTED = ("train.device", "train.workers", "train.nproc_per_node", "train.dist_timeout_s",
                     "train.val_batch_size")


def fingerprint(parts: Mapping[str, Any]) -> str:
    """sha256 of the JSON of `parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_parts(flat_params: Mapping[str, Any], prefixes: Sequence[str], init: str | Path,
                      prepared: str | Path) -> dict[str, Any]:
    """What `fingerprint` digests: the training params (flat keys starting with one of `prefixes`),
    the sha256 of the init weights, of the prepared data and of the training code. Not the world
    size: last.pt records it apart, so a finished result is found again at any world size."""
    return {"params": training_params(flat_params, prefixes), "init_sha256": sha256_file(init),
            "data_sha256": files_digest([Path(prepared) / n for n in PREPARED_FILES]),
            "code_sha256": code_digest()}


def training_params(flat: Mapping[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
    """The flat params whose key starts with one of `prefixes`, minus `NOT_FINGERPRINTED`."""
    return {k: v for k, v in flat.items()
            if k.startswith(tuple(prefixes)) and k not in NOT_FINGERPRINTED}


def files_digest(paths: Sequence[str | Path]) -> str:
    """One sha256 over the named files (names and bytes); folders are walked in sorted order."""
    h = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*.py")) if root.is_dir() else [root]
        for f in files:
            h.update(str(f.relative_to(root.parent) if root.is_dir() else f.name).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def code_digest() -> str:
    """Digest of the `TRAINING_CODE` sources."""
    pkg = Path(__file__).resolve().parent
    return files_digest([pkg / n for n in TRAINING_CODE])


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    """'loss.kld_weight: 1.0 -> 0.5, init_sha256 changed' for two fingerprint_parts dicts."""
    a, b = flatten(old), flatten(new)
    changes = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if k.endswith(("sha256", "digest")):
                changes.append(f"{k} changed")
            else:
                changes.append(f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}")
    if not changes:
        return "fingerprint differs"
    return ", ".join(changes[:limit]) + (f", ... ({len(changes)} in all)" if len(changes) > limit else "")
