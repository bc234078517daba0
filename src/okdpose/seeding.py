"""The package's one seeding place: seed python / numpy / torch, derive independent per-epoch (and
per-rank) seeds, and capture / restore every RNG state for exact resume.

    seed_everything(seed)                   # once, at a fresh start
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))       # epoch `epoch`'s shuffle
    state = rng_state(); ...; set_rng_state(state)                   # last.pt round trip
"""
from __future__ import annotations

import logging
import random
from typing import Any, Mapping, Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: Optional[int] = None) -> int:
    """A 63-bit seed of its own for every (seed, epoch) pair, or (seed, epoch, rank) triple: the
    streams do not collide as seed + epoch would."""
    keys = [seed, epoch] if rank is None else [seed, epoch, rank]
    return int(np.random.SeedSequence(keys).generate_state(1, dtype=np.uint64)[0] >> 1)


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors / plain lists (weights_only loading accepts them)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` captured: the CUDA states of the GPUs visible now (one per GPU
    of the saving machine was stored; the others are skipped, and the log says so)."""
    torch.set_rng_state(state["torch"])
    saved = list(state.get("cuda") or [])
    visible = torch.cuda.device_count() if saved and torch.cuda.is_available() else 0
    for i, cuda_state in enumerate(saved[:visible]):
        torch.cuda.set_rng_state(cuda_state, i)
    if len(saved) > visible:
        log.info("restored the CUDA RNG states of %d GPU(s); %d saved for GPUs not visible now were skipped",
                 visible, len(saved) - visible)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
