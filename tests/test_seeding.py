"""okdpose.seeding: the RNG state round trip and independent (seed, epoch[, rank]) streams."""
import logging
import random

import numpy as np
import pytest
import torch

from okdpose.seeding import epoch_seed, rng_state, seed_everything, set_rng_state


def test_rng_state_round_trip_and_epoch_seeds():
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    seeds = {epoch_seed(s, e) for s in range(3) for e in range(1, 4)}
    assert len(seeds) == 9          # (seed, epoch) streams do not collide as seed + epoch would
    ranks = {epoch_seed(0, 1, r) for r in range(4)}
    assert len(ranks) == 4 and all(0 <= s < 2 ** 63 for s in ranks | seeds)


def test_seed_everything_seeds_every_library():
    seed_everything(5)
    a = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(5)                # torch alone gives torch's numbers: model init needs only that
    assert torch.equal(torch.rand(2), a[0])
    seed_everything(5)
    b = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def _fake_cuda(monkeypatch, visible):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append((int(s[0]), i)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restores every saved state"))
    return restored


@pytest.mark.parametrize("visible", [2, 0])
def test_resume_with_fewer_gpus_restores_the_visible_ones_and_says_so(monkeypatch, caplog, visible):
    state = {**rng_state(), "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(4)]}   # saved on 4 GPUs
    restored = _fake_cuda(monkeypatch, visible)
    with caplog.at_level(logging.INFO, logger="okdpose.seeding"):
        set_rng_state(state)
    assert restored == [(i, i) for i in range(visible)]
    assert f"states of {visible} GPU(s); {4 - visible} saved for GPUs not visible now were skipped" in caplog.text


def test_resume_on_as_many_gpus_restores_all_silently(monkeypatch, caplog):
    state = {**rng_state(), "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(2)]}
    restored = _fake_cuda(monkeypatch, 2)
    with caplog.at_level(logging.INFO, logger="okdpose.seeding"):
        set_rng_state(state)
    assert restored == [(0, 0), (1, 1)] and "skipped" not in caplog.text
