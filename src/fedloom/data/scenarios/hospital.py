"""Hospital length-of-stay regression: three generated hospitals (no real patients).

==========  ========  ===============  =================================================
client      patients  stay range (d)   population
==========  ========  ===============  =================================================
hospital-A  10000     [5, 15]          older, elective-heavy cardiac/orthopedic surgery
                                       centre; fast-track protocol for elective joints
hospital-B  8000      [3, 18]          younger community hospital; severe cases are
                                       transferred out, so severity saturates
hospital-C  12000     [3, 30]          urban teaching / trauma centre; sicker, more
                                       emergencies, strong age x comorbidity effect
==========  ========  ===============  =================================================

Each patient has 21 features (:data:`FEATURE_NAMES`): age, sex, admission type (one-hot:
emergency/elective/urgent), diagnosis group (one-hot: cardiac, respiratory, orthopedic,
neurological, gastrointestinal, infection), comorbidity count, prior admissions in the last
year, a 0-10 severity score and seven vitals/labs (heart rate, systolic BP, temperature,
log creatinine, hemoglobin, log WBC, SpO2). Sites differ in three ways:

* populations (covariate shift): age, sex, admission and diagnosis mix, comorbidity
  burden; plus case-mix selection — hospital-A admits mainly patients whose EXPECTED stay
  is about 5-13 days (planned surgery), hospital-B transfers out those expected to stay
  beyond ~15 days. Selection uses the expected stay, a function of the features only;
* relationships: a shared nonlinear risk (age hinge, severity x comorbidity interaction,
  thresholds on temperature, creatinine, hemoglobin, SpO2) plus site-specific effects
  (A: fast-track elective joint replacement, longer cardiac step-down; B: severity
  saturates; C: frailty x multimorbidity and stroke placement delays);
* stay ranges: log(days) = shared link of the risk + lognormal noise, then a smooth,
  increasing clamp into the site's closed range (~identity well inside it).

A model fitted on one hospital therefore transfers imperfectly to the others, while a
model trained on all three is about as good as each local one on its own site.

Scaling: continuous features are standardized with FIXED reference values
(:data:`REFERENCE`, clinical population norms chosen once, not computed from any data), so
no statistic crosses sites or the train/test boundary and covariate shift stays visible;
binary and one-hot features are left 0/1. The target is the stay in days, unscaled
(site means about 8, 6 and 12 days): initialise a regression head's bias near the mean
or train with Adam.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedloom.data.base import FederatedDataset, TaskSpec
from fedloom.data.scenarios._common import SiteArrays, assemble, check_seed, site_rng, split_rows, standardize

__all__ = ["FEATURE_NAMES", "REFERENCE", "SITES", "TASK", "HospitalSite", "hospital"]

ADMISSION_TYPES = ("emergency", "elective", "urgent")
DIAGNOSES = ("cardiac", "respiratory", "orthopedic", "neurological", "gastrointestinal", "infection")

FEATURE_NAMES: tuple[str, ...] = (
    "age",
    "female",
    *(f"admission_{a}" for a in ADMISSION_TYPES),
    *(f"diagnosis_{d}" for d in DIAGNOSES),
    "comorbidities",
    "prior_admissions",
    "severity",
    "heart_rate",
    "systolic_bp",
    "temperature",
    "log_creatinine",
    "hemoglobin",
    "log_wbc",
    "spo2",
)

# (center, scale) per feature: fixed clinical reference values; (0, 1) leaves 0/1 columns as is.
REFERENCE: tuple[tuple[float, float], ...] = (
    (55.0, 18.0),  # age, years
    (0.0, 1.0),  # female
    *((0.0, 1.0),) * len(ADMISSION_TYPES),
    *((0.0, 1.0),) * len(DIAGNOSES),
    (2.0, 1.5),  # comorbidities, count
    (0.5, 1.0),  # prior admissions, count
    (4.0, 2.0),  # severity, 0-10
    (85.0, 15.0),  # heart rate, bpm
    (125.0, 18.0),  # systolic BP, mmHg
    (37.0, 0.6),  # temperature, deg C
    (0.0, 0.4),  # log creatinine, log mg/dL
    (13.0, 1.8),  # hemoglobin, g/dL
    (2.0, 0.4),  # log WBC, log 10^9/L
    (96.0, 2.5),  # SpO2, %
)

TASK = TaskSpec(
    kind="regression",
    input_shape=(len(FEATURE_NAMES),),
    num_outputs=1,
    loss="mse",
    metrics=("mae", "rmse", "loss"),
    target_name="length_of_stay_days",
    feature_names=FEATURE_NAMES,
)
"""Regression of the stay in days (unscaled) from 21 standardized features."""

@dataclass(frozen=True)
class HospitalSite:
    """Population and outcome parameters of one generated hospital."""

    patients: int
    stay_range: tuple[float, float]
    age: tuple[float, float]  # mean, sd (years)
    female: float
    admission: tuple[float, float, float]  # P(emergency, elective, urgent)
    diagnosis: tuple[float, ...]  # P(each of DIAGNOSES)
    comorbidity_rate: float
    prior_rate: float
    noise: float  # sd of the unexplained log-stay
    # Case-mix selection on the EXPECTED stay (a function of the features only, so a pure
    # covariate shift): admitted with probability sigmoid((d - lo)/w) * sigmoid((hi - d)/w).
    admit_window: tuple[float, float, float] | None = None


SITES: dict[str, HospitalSite] = {
    "hospital-A": HospitalSite(
        patients=10000, stay_range=(5.0, 15.0), age=(66.0, 11.0), female=0.46,
        admission=(0.25, 0.60, 0.15), diagnosis=(0.40, 0.08, 0.30, 0.08, 0.10, 0.04),
        comorbidity_rate=1.6, prior_rate=1.0, noise=0.22, admit_window=(5.5, 13.0, 0.8),
    ),
    "hospital-B": HospitalSite(
        patients=8000, stay_range=(3.0, 18.0), age=(47.0, 17.0), female=0.55,
        admission=(0.45, 0.35, 0.20), diagnosis=(0.15, 0.20, 0.20, 0.10, 0.20, 0.15),
        comorbidity_rate=1.0, prior_rate=0.8, noise=0.28, admit_window=(0.0, 15.0, 1.5),
    ),
    "hospital-C": HospitalSite(
        patients=12000, stay_range=(3.0, 30.0), age=(58.0, 19.0), female=0.50,
        admission=(0.62, 0.15, 0.23), diagnosis=(0.20, 0.20, 0.10, 0.20, 0.12, 0.18),
        comorbidity_rate=2.0, prior_rate=1.3, noise=0.30,
    ),
}
"""The three hospitals (client id -> parameters)."""

# Shared link from the latent risk to days: log(days) = center + slope * (risk - risk_center).
_RISK_CENTER = 1.0
_LOG_DAYS_CENTER = float(np.log(7.0))
_LOG_DAYS_SLOPE = 0.85
_CLAMP_SOFTNESS = 0.75  # days


def _soft_clamp(x: np.ndarray, lo: float, hi: float, *, softness: float) -> np.ndarray:
    """Smooth, increasing map of the real line into (lo, hi), ~identity well inside it."""
    s = softness
    y = lo + s * np.logaddexp(0.0, (x - lo) / s) - s * np.logaddexp(0.0, (x - hi) / s)
    return np.clip(y, lo, hi)


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _candidates(site: str, p: HospitalSite, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` candidate patients of ``site``: raw features and expected log-stay (no noise)."""
    age = np.clip(rng.normal(p.age[0], p.age[1], n), 18.0, 98.0)
    female = (rng.random(n) < p.female).astype(np.float64)
    adm1h = np.eye(len(ADMISSION_TYPES))[rng.choice(len(ADMISSION_TYPES), size=n, p=np.asarray(p.admission))]
    dia1h = np.eye(len(DIAGNOSES))[rng.choice(len(DIAGNOSES), size=n, p=np.asarray(p.diagnosis))]
    emergency, elective, urgent = adm1h.T
    cardiac, resp, ortho, neuro, gi, infect = dia1h.T

    age_z = (age - 55.0) / 18.0
    comorb = np.minimum(rng.poisson(p.comorbidity_rate * np.exp(0.45 * age_z)), 12).astype(np.float64)
    prior = rng.poisson(p.prior_rate * (0.25 + 0.12 * comorb)).astype(np.float64)
    severity = np.clip(
        2.0 + 2.0 * emergency + 1.0 * urgent + 0.4 * comorb + 0.6 * age_z
        + 0.8 * neuro + 0.6 * infect + 0.5 * resp + rng.normal(0.0, 1.4, n),
        0.0,
        10.0,
    )
    heart_rate = 76.0 + 2.5 * severity + 8.0 * (resp + infect) + rng.normal(0.0, 10.0, n)
    systolic = 122.0 + 6.0 * age_z - 1.8 * severity + 6.0 * cardiac + rng.normal(0.0, 15.0, n)
    temperature = 36.8 + 1.8 * infect * rng.random(n) + 0.06 * severity + rng.normal(0.0, 0.35, n)
    log_creat = np.log(0.85) + 0.07 * comorb + 0.1 * age_z + 0.03 * severity + rng.normal(0.0, 0.25, n)
    hemoglobin = 13.8 - 0.9 * female - 0.18 * severity - 0.6 * gi + rng.normal(0.0, 1.3, n)
    log_wbc = np.log(7.0) + 0.45 * infect + 0.03 * severity + rng.normal(0.0, 0.28, n)
    spo2 = np.minimum(97.5 - 3.0 * resp - 0.35 * severity + rng.normal(0.0, 1.4, n), 100.0)

    # Shared nonlinear risk ...
    sev_z = (severity - 4.0) / 2.0
    lcom = np.log1p(comorb)
    risk = (
        0.35 * sev_z
        + 0.30 * lcom
        + 0.225 * _softplus(2.0 * (age_z - 0.6))  # rises past ~66 years
        + 0.15 * sev_z * lcom
        + 0.25 * emergency + 0.10 * urgent - 0.20 * elective
        + 0.10 * cardiac + 0.15 * resp + 0.20 * ortho + 0.30 * neuro + 0.25 * infect
        + 0.35 * _sigmoid((temperature - 38.0) / 0.25)  # fever
        + 0.045 * _softplus((log_creat - np.log(1.3)) / 0.15)  # renal impairment
        + 0.25 * _sigmoid((10.0 - hemoglobin) / 0.5)  # anaemia
        + 0.30 * _sigmoid((92.0 - spo2) / 1.0)  # hypoxia
        + 0.08 * np.minimum(prior, 5.0)
    )
    # ... plus site-specific effects (different protocols).
    if site == "hospital-A":  # fast-track elective joints; longer cardiac-surgery step-down
        risk += -0.45 * elective * ortho + 0.12 * cardiac - 0.05
    elif site == "hospital-B":  # severe cases transferred out early: severity saturates
        risk += 0.30 * (np.tanh(sev_z) - sev_z) + 0.15 * infect - 0.10 * (prior >= 2)
    else:  # placement delays for frail, multimorbid and stroke patients
        risk += 0.15 * age_z * lcom + 0.10 * emergency + 0.15 * neuro - 0.10
    log_days = _LOG_DAYS_CENTER + _LOG_DAYS_SLOPE * (risk - _RISK_CENTER)

    raw = np.column_stack(
        [age, female, adm1h, dia1h, comorb, prior, severity, heart_rate, systolic, temperature,
         log_creat, hemoglobin, log_wbc, spo2]
    )
    return raw, log_days


def _site(site: str, p: HospitalSite, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = p.patients
    raws: list[np.ndarray] = []
    logs: list[np.ndarray] = []
    have = 0
    while have < n:  # admit candidates by case mix until the site holds exactly n patients
        raw, log_days = _candidates(site, p, rng, 2 * n)
        if p.admit_window is not None:
            lo_w, hi_w, width = p.admit_window
            d = np.exp(log_days)
            keep = rng.random(d.size) < _sigmoid((d - lo_w) / width) * _sigmoid((hi_w - d) / width)
            raw, log_days = raw[keep], log_days[keep]
        raws.append(raw)
        logs.append(log_days)
        have += log_days.size
    raw = np.concatenate(raws)[:n]
    log_days = np.concatenate(logs)[:n]
    # Unexplained variation, then a smooth clamp into the site's stay range.
    days = np.exp(log_days + rng.normal(0.0, p.noise, n))
    stay = _soft_clamp(days, *p.stay_range, softness=_CLAMP_SOFTNESS)
    return standardize(raw, REFERENCE), stay.astype(np.float32)


def hospital(*, seed: int = 0) -> FederatedDataset:
    """The three hospitals, each split 80/20 into local train/test at random; deterministic in ``seed``."""
    seed = check_seed(seed)
    sites: list[SiteArrays] = []
    per_site: dict[str, dict[str, object]] = {}
    for site, params in SITES.items():
        x, y = _site(site, params, site_rng(seed, "hospital", site))
        tr, te = split_rows(len(y), site_rng(seed, "hospital", site, "split"))
        sites.append(SiteArrays(site, x, y, tr, te))
        per_site[site] = {
            "patients": int(len(y)),
            "train": int(tr.size),
            "test": int(te.size),
            "stay_range": params.stay_range,
            "stay_min": float(y.min()),
            "stay_max": float(y.max()),
            "stay_mean": float(y.mean()),
            "stay_median": float(np.median(y)),
        }
    info = {
        "scenario": "hospital",
        "seed": seed,
        "sites": per_site,
        "target_unit": "days (unscaled)",
        "feature_scaling": "fixed clinical reference (center, scale); binary and one-hot columns as 0/1",
    }
    return assemble("hospital", TASK, sites, info, y_dtype=torch.float32)
