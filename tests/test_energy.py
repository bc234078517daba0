"""okdpose.energy: codecarbon records, the estimate/measurement label, and never breaking a stage."""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from okdpose import energy
from okdpose.params import EnergyParams, ParamsError, params_from_dict

ON = EnergyParams(enabled=True, country="ITA", measure_power_secs=1.0)


class FakeCPU:
    def __init__(self, mode, tdp=None):
        self._mode, self._tdp = mode, tdp


class FakeRAM:
    pass


FakeCPU.__name__ = "CPU"
FakeRAM.__name__ = "RAM"


class FakeTracker:
    def __init__(self, cpu_mode="cpu_load", fail_start=False, fail_stop=False):
        self._hardware = [FakeRAM(), FakeCPU(cpu_mode, 8 if cpu_mode == "cpu_load" else None)]
        self.fail_start, self.fail_stop, self.stopped = fail_start, fail_stop, 0
        self.final_emissions_data = SimpleNamespace(energy_consumed=3e-6, cpu_energy=1e-6, ram_energy=2e-6,
                                                    gpu_energy=0.0, emissions=1e-6, country_iso_code="ITA",
                                                    cpu_model="Test CPU")

    def start(self):
        if self.fail_start:
            raise RuntimeError("no power source")

    def stop(self):
        self.stopped += 1
        if self.fail_stop:
            raise OSError("cannot read")
        return self.final_emissions_data.emissions


def test_off_records_only_the_duration():
    with energy.measure_energy(EnergyParams(enabled=False), "train") as meter:
        pass
    assert meter.record["status"] == "off" and meter.record["duration_s"] >= 0
    assert meter.per_item(10) is None and set(energy.metric_values(meter.record, "e")) == {"e.duration_s"}


@pytest.mark.parametrize("tracker", [FakeTracker(fail_start=True), FakeTracker(fail_stop=True)])
def test_codecarbon_failing_never_stops_the_work(tracker):
    ran = []
    with energy.measure_energy(ON, "train", tracker_factory=lambda p: tracker) as meter:
        ran.append(1)
    assert ran == [1] and meter.record["status"] == "unavailable" and meter.record["reason"]
    assert energy.tags(meter.record, "energy.train") == {"energy.train.status": "unavailable"}


def test_missing_codecarbon_is_unavailable(monkeypatch):
    def missing(p):
        raise ImportError("No module named 'codecarbon'")
    with energy.measure_energy(ON, "evaluate", tracker_factory=missing) as meter:
        pass
    assert meter.record["status"] == "unavailable" and "codecarbon" in meter.record["reason"]


def test_an_estimate_is_never_labelled_a_measurement():
    with energy.measure_energy(ON, "train", tracker_factory=lambda p: FakeTracker("cpu_load")) as meter:
        pass
    rec = meter.record
    assert rec["status"] == "ok" and rec["measured"] is False
    assert rec["mode"] == {"ram": "estimate (size)", "cpu": "cpu_load (TDP 8 W)"}
    assert rec["kwh"] == 3e-6 and rec["g_co2eq"] == pytest.approx(1e-3) and meter.per_item(3) == pytest.approx(1e-6)
    assert energy.tags(rec, "energy.train")["energy.train.measured"] == "false"
    # RAPL for the CPU but RAM still estimated: the total is not a measurement either
    assert energy.is_measured({"cpu": "intel_rapl", "ram": "estimate (size)"}, rec) is False
    assert energy.is_measured({"cpu": "intel_rapl", "ram": "estimate (size)"}, {"cpu_kwh": 1.0, "ram_kwh": 0}) is True
    assert energy.is_measured({"gpu": "nvml", "cpu": "cpu_load (TDP 8 W)"}, {"gpu_kwh": 1.0, "cpu_kwh": 0}) is True


def test_the_block_s_exception_propagates_and_the_tracker_is_stopped():
    tracker = FakeTracker()
    with pytest.raises(KeyError):
        with energy.measure_energy(ON, "train", tracker_factory=lambda p: tracker):
            raise KeyError("boom")
    assert tracker.stopped == 1


def test_real_codecarbon_offline_writes_no_files(tmp_path, monkeypatch):
    pytest.importorskip("codecarbon")
    monkeypatch.chdir(tmp_path)
    with energy.measure_energy(ON, "train") as meter:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            sum(range(10000))
    rec = meter.record
    assert rec["status"] == "ok", rec
    assert rec["kwh"] > 0 and rec["country"] == "ITA" and isinstance(rec["measured"], bool)
    assert "cpu" in rec["mode"] and rec["tool"].startswith("codecarbon")
    assert os.listdir(tmp_path) == []                 # no emissions.csv, no lock file


def test_energy_params_are_validated():
    assert params_from_dict({"energy": {"country": "FRA"}}).energy.country == "FRA"
    with pytest.raises(ParamsError, match="energy.country must be an ISO 3166 alpha-3 code"):
        params_from_dict({"energy": {"country": "it"}})
    with pytest.raises(ParamsError, match="energy.measure_power_secs"):
        params_from_dict({"energy": {"measure_power_secs": 0}})
