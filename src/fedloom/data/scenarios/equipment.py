"""Equipment monitoring (predictive maintenance): three generated production lines.

========  =======  ============  ===============================================
client    devices  failure rate  line specifics
========  =======  ============  ===============================================
line-A    100      2.0 %         reference calibration; mostly bearing wear
line-B    80       1.5 %         temperature +4 °C offset, pressure gauge reads 7 %
                                 low, rpm +20; mostly seal leaks
line-C    120      2.5 %         heavier load; accelerometer gain 1.3, current
                                 +1.5 A, temperature -2.5 °C; mostly electrical
                                 (winding) faults
========  =======  ============  ===============================================

**What the failure rate means.** Every device is observed for :data:`WINDOWS_PER_DEVICE`
= 250 consecutive one-hour windows, each of :data:`SAMPLES_PER_WINDOW` = 32 readings of
five sensors (vibration mm/s, temperature °C, pressure bar, current A, speed rpm). A window
is labelled 1 when the device fails within the next :data:`HORIZON` = 10 windows (the
failure happens at the end of that window or of one of the 9 after it). A failed device
is repaired and runs on, so a device may fail 0, 1 or 2 times. The failure rate of a line
is the share of its windows labelled 1, and it is EXACT: line-A has 2 % x 100 x 250 = 500
positive windows (50 failures), line-B 1.5 % x 80 x 250 = 300 (30 failures), line-C
2.5 % x 120 x 250 = 750 (75 failures). The split is BY DEVICE (80 % / 20 % of devices,
no device in both) and puts exactly 20 % of each line's failures on the test devices, so
both splits keep the line's rate exactly.

Before a failure the device degrades for 20-60 windows with an accelerating health index
h in [0, 1]; the fault mode (bearing wear, seal leak, electrical) decides which sensors
drift (bearing: vibration and temperature up, noisier speed; seal: pressure down, current
up; electrical: current up with spikes, temperature up, speed down). Early degradation
windows are labelled 0; 40 % of the devices that never fail show a "near miss" (a partial
degradation stopped by preventive maintenance, labelled 0); healthy devices have transient
load bursts and differ in baseline and noise. So the task is not trivially separable.
Each line has its own operating load, fault mix and sensor calibration (gain and
offset), so a detector trained on one line transfers imperfectly.

Features (:data:`FEATURE_NAMES`, 25): per sensor the window's mean, standard deviation,
least-squares slope (units per window), maximum, and drift: the window mean minus an
exponentially weighted moving average (span 48 windows) of the device's PAST window means,
a causal per-device baseline that cancels device spread and calibration offsets. All are
standardized with FIXED reference values (:data:`REFERENCE`: the nominal healthy machine at nominal load, set once,
not computed from data), so no statistic crosses lines or the device split and the lines'
calibration offsets stay visible.

Rows are device-major: row ``r`` of a client's train (test) split is window
``r % 250`` of device ``info["sites"][line]["train_devices"][r // 250]`` (``test_devices``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedloom.core.errors import DataError
from fedloom.data.base import FederatedDataset, TaskSpec
from fedloom.data.scenarios._common import SiteArrays, assemble, check_seed, site_rng, standardize

__all__ = [
    "FAULT_MODES",
    "FEATURE_NAMES",
    "HORIZON",
    "REFERENCE",
    "SAMPLES_PER_WINDOW",
    "SENSORS",
    "SITES",
    "TASK",
    "WINDOWS_PER_DEVICE",
    "LineSite",
    "equipment",
]

WINDOWS_PER_DEVICE = 250
SAMPLES_PER_WINDOW = 32
HORIZON = 10
TEST_DEVICE_FRACTION = 0.2
SENSORS = ("vibration", "temperature", "pressure", "current", "rpm")
FAULT_MODES = ("bearing", "seal", "electrical")
_STATS = ("mean", "std", "slope", "max", "drift")
_BASELINE_SPAN = 48  # windows: span of the EWMA baseline behind the "drift" feature

FEATURE_NAMES: tuple[str, ...] = tuple(f"{s}_{st}" for s in SENSORS for st in _STATS)

# Nominal healthy machine: baseline, load sensitivity, reading noise sd (per sensor).
_BASE = np.array([2.0, 55.0, 6.0, 12.0, 1480.0])
_LOAD = np.array([0.4, 6.0, -0.3, 2.5, -15.0])
_NOISE = np.array([0.15, 0.3, 0.06, 0.25, 4.0])
_DEVICE_SD = np.array([0.25, 2.5, 0.15, 0.6, 8.0])  # device-to-device baseline spread
_NOMINAL_LOAD = 0.5

# (center, scale) per feature, from the nominal machine: mean ~ baseline + load x 0.5,
# std ~ noise, slope ~ 0, max ~ mean + 2 sd; scales cover device spread and daily load swing.
REFERENCE: tuple[tuple[float, float], ...] = tuple(
    ref
    for b, ld, ns, dv in zip(_BASE, _LOAD, _NOISE, _DEVICE_SD, strict=True)
    for ref in (
        (float(b + ld * _NOMINAL_LOAD), float(np.hypot(dv, abs(ld) * 0.25))),  # mean
        (float(ns), float(ns * 0.5)),  # std
        (0.0, float(abs(ld) * 0.1 + ns * 0.5)),  # slope per window
        (float(b + ld * _NOMINAL_LOAD + 2.0 * ns), float(np.hypot(dv, abs(ld) * 0.25) + ns)),  # max
        (0.0, float(np.hypot(abs(ld) * 0.2, ns))),  # drift from the device's own baseline
    )
)

TASK = TaskSpec(
    kind="binary",
    input_shape=(len(FEATURE_NAMES),),
    num_outputs=1,
    loss="bce",
    metrics=("f1", "auprc", "loss"),
    target_name="failure_within_horizon",
    feature_names=FEATURE_NAMES,
)
"""Binary failure prediction (one logit) from 25 per-window sensor summaries."""


@dataclass(frozen=True)
class LineSite:
    """Devices, failure rate, operating conditions and sensor calibration of one line."""

    devices: int
    failure_rate: float  # share of windows labelled 1
    load: float  # mean operating load (0..1)
    fault_mix: tuple[float, float, float]  # P(each of FAULT_MODES)
    burst_rate: float  # P(a healthy window has a transient load burst)
    gain: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)  # sensor calibration: reading = gain * x + offset
    offset: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0)

    @property
    def failures(self) -> int:
        """Number of failure events: rate x devices x windows / horizon (exact by construction)."""
        return round(self.failure_rate * self.devices * WINDOWS_PER_DEVICE / HORIZON)


SITES: dict[str, LineSite] = {
    "line-A": LineSite(devices=100, failure_rate=0.02, load=0.5, fault_mix=(0.7, 0.2, 0.1), burst_rate=0.04),
    "line-B": LineSite(
        devices=80, failure_rate=0.015, load=0.4, fault_mix=(0.2, 0.7, 0.1), burst_rate=0.05,
        gain=(1.0, 1.0, 0.93, 1.0, 1.0), offset=(0.0, 4.0, 0.0, 0.0, 20.0),
    ),
    "line-C": LineSite(
        devices=120, failure_rate=0.025, load=0.7, fault_mix=(0.25, 0.15, 0.6), burst_rate=0.04,
        gain=(1.3, 1.0, 1.0, 1.0, 1.0), offset=(0.0, -2.5, 0.0, 1.5, 0.0),
    ),
}
"""The three production lines (client id -> parameters)."""

# Sensor drift at full degradation (h = 1), per fault mode: (drift, extra noise sd) per sensor.
_DRIFT = {
    "bearing": (np.array([1.1, 2.5, 0.0, 0.1, -3.0]), np.array([0.25, 0.0, 0.0, 0.0, 3.0])),
    "seal": (np.array([0.0, 0.0, -0.35, 0.7, 0.0]), np.array([0.0, 0.0, 0.05, 0.05, 0.0])),
    "electrical": (np.array([0.0, 1.5, 0.0, 0.8, -10.0]), np.array([0.0, 0.0, 0.0, 0.15, 2.0])),
}
_SPIKE_RATE, _SPIKE_SIZE = 0.08, 2.5  # electrical faults: current spikes, P per reading = rate x h
_NEAR_MISS = 0.4  # P(a device without failures shows a degradation fixed by maintenance in time)


def _check_exact(site: str, p: LineSite) -> None:
    exact = p.failure_rate * p.devices * WINDOWS_PER_DEVICE / HORIZON
    test = p.failures * TEST_DEVICE_FRACTION
    n_test = p.devices * TEST_DEVICE_FRACTION
    if abs(exact - p.failures) > 1e-9 or abs(test - round(test)) > 1e-9 or abs(n_test - round(n_test)) > 1e-9:
        raise DataError(f"{site}: rate {p.failure_rate} of {p.devices} devices cannot be met exactly")


def _events_per_device(rng: np.random.Generator, devices: int, events: int) -> np.ndarray:
    """Spread ``events`` failures over ``devices`` devices, at most two each."""
    if events > 2 * devices:
        raise DataError(f"{events} failures do not fit {devices} devices (at most 2 each)")
    slots = rng.choice(2 * devices, size=events, replace=False)
    return np.bincount(slots // 2, minlength=devices)


@dataclass(frozen=True)
class _Line:
    """A generated line: its site arrays, the device split and what failed."""

    arrays: SiteArrays
    train_devices: np.ndarray
    test_devices: np.ndarray
    events: np.ndarray  # failures per device
    modes: dict[str, int]  # failures per fault mode


def _device_rows(devices: np.ndarray) -> np.ndarray:
    """Row indices (device-major) of every window of ``devices``."""
    return (devices[:, None] * WINDOWS_PER_DEVICE + np.arange(WINDOWS_PER_DEVICE)[None, :]).reshape(-1)


def _line(site: str, p: LineSite, rng: np.random.Generator) -> _Line:
    _check_exact(site, p)
    d, w, s = p.devices, WINDOWS_PER_DEVICE, SAMPLES_PER_WINDOW
    t_len = w * s
    n_test = round(p.devices * TEST_DEVICE_FRACTION)
    perm = rng.permutation(d)
    test_dev, train_dev = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    test_events = round(p.failures * TEST_DEVICE_FRACTION)
    events = np.zeros(d, dtype=np.int64)
    events[train_dev] = _events_per_device(rng, train_dev.size, p.failures - test_events)
    events[test_dev] = _events_per_device(rng, test_dev.size, test_events)

    t = np.arange(t_len) / s  # time in windows
    # Healthy signal: device baseline + daily load cycle + hourly load jitter + reading noise.
    base = _BASE + rng.normal(0.0, 1.0, (d, 5)) * _DEVICE_SD  # (d, 5)
    phase = rng.uniform(0.0, 2 * np.pi, (d, 1))
    load = p.load + 0.25 * np.sin(2 * np.pi * t[None, :] / 24.0 + phase)
    load = load + np.repeat(rng.normal(0.0, 0.08, (d, w)), s, axis=1)
    burst = rng.random((d, w)) < p.burst_rate  # transient heavy batches (healthy)
    burst_load = np.repeat(burst * rng.uniform(0.4, 1.0, (d, w)), s, axis=1)
    load = load + burst_load
    x = base[:, :, None] + _LOAD[None, :, None] * load[:, None, :]  # (d, 5, T)
    x[:, 0, :] += 1.2 * burst_load  # bursts also shake the machine
    device_noise = _NOISE[None, :] * rng.lognormal(0.0, 0.3, (d, 5))  # some devices are noisier
    noise_sd = np.repeat(device_noise[:, :, None], t_len, axis=2)

    def degrade(dev: int, stop_window: int, length: int, top: float) -> str:
        """Accelerating degradation of ``dev`` over ``length`` windows ending at ``stop_window``."""
        power = rng.uniform(1.5, 3.0)
        mode = FAULT_MODES[int(rng.choice(3, p=np.asarray(p.fault_mix)))]
        start, stop = (stop_window - length) * s, stop_window * s
        h = top * ((np.arange(start, stop) - start + 1) / (stop - start)) ** power
        drift, extra = _DRIFT[mode]
        x[dev, :, start:stop] += drift[:, None] * h[None, :]
        noise_sd[dev, :, start:stop] += extra[:, None] * h[None, :]
        if mode == "electrical":
            x[dev, 3, start:stop] += _SPIKE_SIZE * (rng.random(h.size) < _SPIKE_RATE * h)
        return mode

    # Failures: degradation over 20-60 windows, failure at the end of window t_fail, repair.
    labels = np.zeros((d, w), dtype=np.float32)
    modes_count = dict.fromkeys(FAULT_MODES, 0)
    for dev in range(d):
        k = int(events[dev])
        if k == 0:  # a near miss: degradation stopped by preventive maintenance (label 0)
            if rng.random() < _NEAR_MISS:
                length = int(rng.integers(20, 61))
                degrade(dev, int(rng.integers(length, w + 1)), length, rng.uniform(0.3, 0.8))
            continue
        seg = w // k
        for e in range(k):
            length = int(rng.integers(20, 61))
            t_fail = int(rng.integers(e * seg + length, (e + 1) * seg))
            modes_count[degrade(dev, t_fail + 1, length, 1.0)] += 1
            labels[dev, t_fail + 1 - HORIZON : t_fail + 1] = 1.0

    x = x + rng.standard_normal(x.shape, dtype=np.float32) * noise_sd
    x = np.asarray(p.gain)[None, :, None] * x + np.asarray(p.offset)[None, :, None]  # calibration

    win = x.reshape(d, 5, w, s)
    mean = win.mean(axis=3)
    std = win.std(axis=3)
    u = (np.arange(s) - (s - 1) / 2.0) / s
    slope = (win * u).sum(axis=3) / float((u * u).sum())
    mx = win.max(axis=3)
    # Drift: window mean minus an EWMA of the device's PAST window means (causal, per device),
    # so device spread and calibration offsets cancel while slow degradation shows.
    drift = np.empty_like(mean)
    ewma = mean[:, :, 0].copy()
    a = 1.0 / _BASELINE_SPAN
    for i in range(w):
        drift[:, :, i] = mean[:, :, i] - ewma
        ewma += a * (mean[:, :, i] - ewma)
    feats = np.stack([mean, std, slope, mx, drift], axis=2)  # (d, 5, stats, w)
    feats = feats.transpose(0, 3, 1, 2).reshape(d * w, 5 * len(_STATS))
    xs = standardize(feats, REFERENCE)
    y = labels.reshape(d * w)

    arrays = SiteArrays(site, xs, y, _device_rows(train_dev), _device_rows(test_dev))
    return _Line(arrays, train_dev, test_dev, events, modes_count)


def equipment(*, seed: int = 0) -> FederatedDataset:
    """The three lines, each split 80/20 by device; deterministic in ``seed``."""
    seed = check_seed(seed)
    sites: list[SiteArrays] = []
    per_site: dict[str, dict[str, object]] = {}
    for site, params in SITES.items():
        line = _line(site, params, site_rng(seed, "equipment", site))
        sites.append(line.arrays)
        y, tr, te, events = line.arrays.y, line.arrays.train_idx, line.arrays.test_idx, line.events
        tag = site.split("-")[-1]

        def ids(devices: np.ndarray, tag: str = tag) -> list[str]:
            return [f"{tag}-{int(i):03d}" for i in devices]

        per_site[site] = {
            "devices": params.devices,
            "failure_rate": float(y.mean()),
            "failures": int(events.sum()),
            "failed_devices": int((events > 0).sum()),
            "fault_modes": line.modes,
            "windows": int(y.size),
            "positive_windows": int(y.sum()),
            "train_devices": ids(line.train_devices),
            "test_devices": ids(line.test_devices),
            "train_windows": int(tr.size),
            "train_positive": int(y[tr].sum()),
            "test_windows": int(te.size),
            "test_positive": int(y[te].sum()),
        }
    info = {
        "scenario": "equipment",
        "seed": seed,
        "sites": per_site,
        "windows_per_device": WINDOWS_PER_DEVICE,
        "samples_per_window": SAMPLES_PER_WINDOW,
        "horizon_windows": HORIZON,
        "failure_rate_definition": "share of windows followed by a failure within the horizon",
        "feature_scaling": "fixed reference from the nominal healthy machine (center, scale)",
    }
    return assemble("equipment", TASK, sites, info, y_dtype=torch.float32)
