"""Energy, emissions and duration of a block of work, measured with codecarbon (offline, no network).

    with measure_energy(params.energy, "train") as meter:
        ...                                   # the work
    meter.record   # {"kwh", "cpu_kwh", "ram_kwh", "gpu_kwh", "g_co2eq", "duration_s", "mode", "measured", ...}

codecarbon reads power counters where the machine has them (Intel RAPL files under
/sys/class/powercap, NVIDIA NVML for GPUs) and otherwise *estimates*: CPU power from a TDP table
(or 4 W per thread for an unknown CPU) times the CPU load, RAM power from its size. `mode` says,
per component, which one it used and `measured` is true only when every non-zero component came
from a counter, so an estimate is never shown as a measurement. Emissions use codecarbon's
offline carbon intensity of `energy.country` (ISO 3166 alpha-3).

Measurement never stops a stage: energy off, codecarbon missing or failing gives a record with
`status` "off" / "unavailable" and the reason, and the work runs as it would without it.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:
    from okdpose.params import EnergyParams

log = logging.getLogger(__name__)

# codecarbon's CPU modes (codecarbon.external.hardware.CPU._mode) that read a power counter
COUNTER_MODES = {"intel_rapl", "intel_power_gadget", "apple_powermetrics", "amd_rapl"}


@dataclass
class EnergyMeter:
    """What `measure_energy` yields; `record` is filled when the block ends."""

    what: str
    record: dict[str, Any] = field(default_factory=dict)

    def per_item(self, n: int, key: str = "kwh") -> Optional[float]:
        """`record[key] / n` (e.g. kWh per test image), None without a measurement."""
        v = self.record.get(key)
        return None if v is None or n <= 0 else v / n


def hardware_modes(tracker: Any) -> dict[str, str]:
    """{"cpu": "intel_rapl" | "cpu_load (TDP 8 W)" | ..., "ram": "estimate", "gpu": "nvml"} from a
    started codecarbon tracker (its private hardware list: codecarbon has no public accessor)."""
    modes: dict[str, str] = {}
    for hw in getattr(tracker, "_hardware", []) or []:
        kind = type(hw).__name__.lower()
        if kind == "cpu":
            mode = str(getattr(hw, "_mode", "unknown"))
            tdp = getattr(hw, "_tdp", None)
            modes["cpu"] = mode if mode in COUNTER_MODES or tdp is None else f"{mode} (TDP {tdp} W)"
        elif kind == "gpu":
            modes["gpu"] = "nvml"
        elif kind == "ram":
            modes["ram"] = "estimate (size)"
        else:
            modes[kind] = "unknown"
    return modes


def is_measured(modes: dict[str, str], record: dict[str, Any]) -> bool:
    """True when every component with energy > 0 came from a power counter."""
    parts = {"cpu": "cpu_kwh", "gpu": "gpu_kwh", "ram": "ram_kwh"}
    used = [k for k, key in parts.items() if (record.get(key) or 0) > 0]
    def counted(k: str) -> bool:
        m = modes.get(k, "")
        return m == "nvml" if k == "gpu" else m.split(" ")[0] in COUNTER_MODES
    return bool(used) and all(counted(k) for k in used)


def _tracker(p: "EnergyParams") -> Any:
    from codecarbon import OfflineEmissionsTracker

    # offline: no network; no output files (the stage writes the record); process mode: the CPU
    # load of this process only (two grid workers share the machine)
    return OfflineEmissionsTracker(country_iso_code=p.country, output_methods=[], log_level="error",
                                   measure_power_secs=p.measure_power_secs, tracking_mode="process",
                                   allow_multiple_runs=True)


def _record(tracker: Any, duration: float) -> dict[str, Any]:
    d = tracker.final_emissions_data
    rec = {"kwh": float(d.energy_consumed), "cpu_kwh": float(d.cpu_energy), "ram_kwh": float(d.ram_energy),
           "gpu_kwh": float(d.gpu_energy), "g_co2eq": 1000.0 * float(d.emissions), "duration_s": round(duration, 2),
           "country": d.country_iso_code, "cpu_model": d.cpu_model}
    modes = hardware_modes(tracker)
    rec.update(mode=modes, measured=is_measured(modes, rec), status="ok")
    try:
        import codecarbon
        rec["tool"] = f"codecarbon {codecarbon.__version__} (offline)"
    except Exception:  # noqa: BLE001
        pass
    return rec


@contextlib.contextmanager
def measure_energy(p: "EnergyParams", what: str, tracker_factory: Any = None) -> Iterator[EnergyMeter]:
    """Measure the `with` block; exceptions of the block propagate untouched (nothing is recorded)."""
    meter = EnergyMeter(what)
    start = time.perf_counter()
    if not p.enabled:
        yield meter
        meter.record = {"status": "off", "duration_s": round(time.perf_counter() - start, 2)}
        return
    tracker, reason = None, None
    try:
        tracker = (tracker_factory or _tracker)(p)
        tracker.start()
    except Exception as e:  # noqa: BLE001 - codecarbon missing or failing must not stop the stage
        tracker, reason = None, f"{type(e).__name__}: {e}"
        log.warning("energy (%s): codecarbon could not start (%s); the stage goes on without it", what, reason)
    start = time.perf_counter()
    try:
        yield meter
    except BaseException:
        if tracker is not None:
            with contextlib.suppress(Exception):
                tracker.stop()
        raise
    duration = time.perf_counter() - start
    if tracker is None:
        meter.record = {"status": "unavailable", "reason": reason, "duration_s": round(duration, 2)}
        return
    try:
        tracker.stop()
        meter.record = _record(tracker, duration)
    except Exception as e:  # noqa: BLE001
        log.warning("energy (%s): codecarbon could not measure (%s)", what, e)
        meter.record = {"status": "unavailable", "reason": f"{type(e).__name__}: {e}", "duration_s": round(duration, 2)}


def metric_values(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numeric part of a record for MLflow: {prefix.kwh: ..., prefix.g_co2eq: ..., ...}."""
    keys = ("kwh", "cpu_kwh", "ram_kwh", "gpu_kwh", "g_co2eq", "duration_s", "kwh_per_image", "g_co2eq_per_image")
    return {f"{prefix}.{k}": float(record[k]) for k in keys if isinstance(record.get(k), (int, float))}


def tags(record: dict[str, Any], prefix: str) -> dict[str, str]:
    """How the energy was obtained, as MLflow tags (so an estimate is never read as a measurement)."""
    out = {f"{prefix}.status": str(record.get("status"))}
    if record.get("status") == "ok":
        out[f"{prefix}.measured"] = str(record["measured"]).lower()
        out.update({f"{prefix}.mode.{k}": v for k, v in record["mode"].items()})
    return out
