"""Card-fraud detection: three generated bank branches (no real transactions).

========  ============  ======  ==================================================
client    transactions  fraud   population and branch-specific fraud
========  ============  ======  ==================================================
branch-A  50000         500     urban; synthetic-identity fraud on new accounts
          (1.0 %)
branch-B  40000         800     rural, online-heavy; card testing (bursts of tiny
          (2.0 %)               online payments)
branch-C  60000         900     tourist region, many foreign cards; late-night
          (1.5 %)               collusive merchant fraud in restaurants/travel
========  ============  ======  ==================================================

Labels come first, so the counts are exact: each branch has exactly the stated number of
frauds at random positions. Legitimate transactions follow the branch's customer base
(merchant mix, amounts, distance from home, foreign share: covariate shift). Each fraud is
drawn from a mixture of fraud *modes*: three shared ones (account takeover online, stolen
card spree, foreign skimming) and the branch's own mode; 15 % of frauds are camouflaged
(drawn exactly like legitimate traffic), which caps recall as in real data. A detector
trained on one branch misses the other branches' own modes.

Features (:data:`FEATURE_NAMES`, 17): log amount, hour of day (sin, cos), merchant category
(one-hot, 8), log distance from home, card-present flag, log transaction velocity (24 h),
log account age, foreign flag, log ratio of the amount to the customer's usual amount.

Scaling: continuous features are standardized with FIXED reference values
(:data:`REFERENCE`, chosen once, not computed from data); flags, one-hot columns and the
cyclical hour stay as they are. The local 80/20 train/test split is stratified: both
splits keep the branch's fraud rate exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedloom.data.base import FederatedDataset, TaskSpec
from fedloom.data.scenarios._common import SiteArrays, assemble, check_seed, site_rng, split_rows, standardize

__all__ = ["FEATURE_NAMES", "FRAUD_MODES", "MERCHANTS", "REFERENCE", "SITES", "TASK", "BranchSite", "fraud"]

MERCHANTS = ("grocery", "gas", "restaurant", "retail", "online", "travel", "electronics", "atm")
_M = {m: i for i, m in enumerate(MERCHANTS)}
FRAUD_MODES = ("account_takeover", "stolen_card_spree", "foreign_skimming",
               "synthetic_identity", "card_testing", "merchant_collusion")

FEATURE_NAMES: tuple[str, ...] = (
    "log_amount",
    "hour_sin",
    "hour_cos",
    *(f"merchant_{m}" for m in MERCHANTS),
    "log_distance_km",
    "card_present",
    "log_velocity_24h",
    "log_account_age_days",
    "foreign",
    "log_amount_ratio",
)

REFERENCE: tuple[tuple[float, float], ...] = (
    (3.9, 1.0),  # log(1 + amount), ~ $50
    (0.0, 1.0),  # hour sin
    (0.0, 1.0),  # hour cos
    *((0.0, 1.0),) * len(MERCHANTS),
    (2.0, 1.5),  # log(1 + km from home)
    (0.0, 1.0),  # card present
    (1.3, 0.6),  # log(1 + transactions in the last 24 h)
    (7.0, 1.0),  # log(1 + account age in days), ~3 years
    (0.0, 1.0),  # foreign
    (0.0, 0.6),  # log(amount / customer's usual amount)
)

TASK = TaskSpec(
    kind="binary",
    input_shape=(len(FEATURE_NAMES),),
    num_outputs=1,
    loss="bce",
    metrics=("auprc", "recall_at_1fpr", "loss"),
    target_name="fraud",
    feature_names=FEATURE_NAMES,
)
"""Binary fraud detection (one logit) from 17 features."""

_TYPICAL_AMOUNT = np.array([40.0, 45.0, 35.0, 60.0, 50.0, 300.0, 250.0, 100.0])
_AMOUNT_SPREAD = np.array([0.6, 0.4, 0.6, 0.8, 1.0, 0.8, 0.8, 0.6])
_PEAK_HOUR = np.array([15.0, 13.0, 19.5, 15.0, 20.0, 12.0, 15.0, 14.0])
_CAMOUFLAGED = 0.15


@dataclass(frozen=True)
class BranchSite:
    """Customer base and fraud mix of one generated branch."""

    transactions: int
    frauds: int
    merchant_mix: tuple[float, ...]  # P(each of MERCHANTS) for legitimate transactions
    amount_scale: float
    home_km: float  # median distance from home of local customers
    tourist_share: float  # share of transactions by visitors (far from home, often foreign)
    velocity: float  # mean transactions per 24 h
    hour_shift: float
    mode_mix: tuple[float, ...]  # P(each of FRAUD_MODES) among non-camouflaged frauds


SITES: dict[str, BranchSite] = {
    "branch-A": BranchSite(
        transactions=50000, frauds=500, merchant_mix=(0.25, 0.08, 0.18, 0.18, 0.18, 0.03, 0.04, 0.06),
        amount_scale=1.1, home_km=5.0, tourist_share=0.03, velocity=3.0, hour_shift=0.0,
        mode_mix=(0.35, 0.25, 0.10, 0.30, 0.0, 0.0),
    ),
    "branch-B": BranchSite(
        transactions=40000, frauds=800, merchant_mix=(0.30, 0.18, 0.10, 0.12, 0.18, 0.02, 0.04, 0.06),
        amount_scale=0.9, home_km=15.0, tourist_share=0.01, velocity=2.0, hour_shift=-0.5,
        mode_mix=(0.25, 0.15, 0.05, 0.0, 0.55, 0.0),
    ),
    "branch-C": BranchSite(
        transactions=60000, frauds=900, merchant_mix=(0.18, 0.08, 0.22, 0.18, 0.10, 0.12, 0.04, 0.08),
        amount_scale=1.2, home_km=6.0, tourist_share=0.28, velocity=4.0, hour_shift=1.0,
        mode_mix=(0.25, 0.20, 0.20, 0.0, 0.0, 0.35),
    ),
}
"""The three branches (client id -> parameters)."""


def _legit(p: BranchSite, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Raw columns of ``n`` legitimate transactions of branch ``p``."""
    merchant = rng.choice(len(MERCHANTS), size=n, p=np.asarray(p.merchant_mix))
    usual = _TYPICAL_AMOUNT[merchant] * p.amount_scale
    ratio = rng.normal(0.0, 0.5, n)
    amount = usual * np.exp(rng.normal(0.0, _AMOUNT_SPREAD[merchant] * 0.6, n) + 0.6 * ratio)
    hour = (rng.normal(_PEAK_HOUR[merchant] + p.hour_shift, 3.5, n)) % 24.0
    tourist = rng.random(n) < p.tourist_share
    distance = np.where(
        tourist, rng.lognormal(np.log(900.0), 1.0, n), rng.lognormal(np.log(p.home_km), 1.0, n)
    )
    foreign = (tourist & (rng.random(n) < 0.8)) | (rng.random(n) < 0.005)
    card_present = np.where(
        merchant == _M["online"], 0.0, (rng.random(n) < np.where(merchant == _M["travel"], 0.6, 0.95))
    ).astype(np.float64)
    velocity = rng.poisson(p.velocity + 1.5 * tourist, n).astype(np.float64)
    account_age = np.maximum(1.0, rng.lognormal(np.log(1500.0), 0.9, n))
    return {
        "merchant": merchant, "amount": amount, "hour": hour, "distance": distance,
        "card_present": card_present, "velocity": velocity, "account_age": account_age,
        "foreign": foreign.astype(np.float64), "ratio": np.log(amount / usual),
    }


def _apply_mode(
    cols: dict[str, np.ndarray], rows: np.ndarray, mode: str, p: BranchSite, rng: np.random.Generator
) -> None:
    """Overwrite the columns of ``rows`` (legitimate-looking draws) with fraud mode ``mode``."""
    k = rows.size
    if k == 0:
        return

    def merchants(*names: str, probs: tuple[float, ...] | None = None) -> np.ndarray:
        return np.array([_M[m] for m in names])[rng.choice(len(names), size=k, p=probs)]

    def amounts(merchant: np.ndarray, log_boost: float, spread: float) -> np.ndarray:
        usual = _TYPICAL_AMOUNT[merchant] * p.amount_scale
        return usual * np.exp(rng.normal(log_boost, spread, k))

    c = {name: v[rows].copy() for name, v in cols.items()}
    if mode == "account_takeover":  # online, night-time, larger than usual, new devices
        c["merchant"] = merchants("online", "electronics", "travel", probs=(0.6, 0.3, 0.1))
        c["card_present"] = np.zeros(k)
        c["amount"] = amounts(c["merchant"], 0.8, 0.7)
        c["hour"] = rng.normal(2.0, 3.5, k) % 24.0
        c["velocity"] = c["velocity"] + rng.poisson(2.5, k)
    elif mode == "stolen_card_spree":  # in person, many purchases quickly, resaleable goods
        c["merchant"] = merchants("electronics", "retail", "atm", "gas", probs=(0.35, 0.3, 0.2, 0.15))
        c["card_present"] = np.ones(k)
        c["amount"] = amounts(c["merchant"], 0.5, 0.6)
        c["velocity"] = rng.poisson(8.0, k).astype(np.float64)
        c["distance"] = rng.lognormal(np.log(25.0), 1.0, k)
    elif mode == "foreign_skimming":  # cloned card used abroad, ATMs at night
        c["merchant"] = merchants("atm", "retail", "restaurant", probs=(0.6, 0.25, 0.15))
        c["card_present"] = np.ones(k)
        c["foreign"] = (rng.random(k) < 0.9).astype(np.float64)
        c["distance"] = rng.lognormal(np.log(2500.0), 0.8, k)
        c["amount"] = amounts(c["merchant"], 0.6, 0.5)
        c["hour"] = rng.normal(1.0, 3.0, k) % 24.0
    elif mode == "synthetic_identity":  # branch A: brand-new accounts max out quickly
        c["account_age"] = np.maximum(1.0, rng.lognormal(np.log(25.0), 0.8, k))
        c["merchant"] = merchants("electronics", "retail", "travel", probs=(0.45, 0.4, 0.15))
        c["amount"] = amounts(c["merchant"], 0.7, 0.6)
        c["velocity"] = c["velocity"] + rng.poisson(1.5, k)
    elif mode == "card_testing":  # branch B: bursts of tiny online payments
        c["merchant"] = np.full(k, _M["online"])
        c["card_present"] = np.zeros(k)
        c["amount"] = np.exp(rng.normal(np.log(2.0), 0.6, k))
        c["velocity"] = rng.poisson(14.0, k).astype(np.float64)
        c["hour"] = rng.uniform(0.0, 24.0, k)
    elif mode == "merchant_collusion":  # branch C: late-night inflated restaurant/travel bills
        c["merchant"] = merchants("restaurant", "travel", probs=(0.7, 0.3))
        c["card_present"] = np.ones(k)
        c["amount"] = amounts(c["merchant"], 0.9, 0.5)
        c["hour"] = rng.normal(23.5, 1.5, k) % 24.0
    else:  # pragma: no cover - FRAUD_MODES is closed
        raise AssertionError(mode)
    usual = _TYPICAL_AMOUNT[c["merchant"]] * p.amount_scale
    c["ratio"] = np.log(c["amount"] / usual) + rng.normal(0.0, 0.3, k)
    for name, v in c.items():
        cols[name][rows] = v


def _site(p: BranchSite, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    n = p.transactions
    y = np.zeros(n, dtype=np.float32)
    fraud_rows = np.sort(rng.choice(n, size=p.frauds, replace=False))
    y[fraud_rows] = 1.0
    cols = _legit(p, rng, n)
    camouflaged = rng.random(p.frauds) < _CAMOUFLAGED
    modes = rng.choice(len(FRAUD_MODES), size=p.frauds, p=np.asarray(p.mode_mix))
    counts: dict[str, int] = {"camouflaged": int(camouflaged.sum())}
    for m, name in enumerate(FRAUD_MODES):
        rows = fraud_rows[~camouflaged & (modes == m)]
        counts[name] = int(rows.size)
        _apply_mode(cols, rows, name, p, rng)

    hour = cols["hour"]
    raw = np.column_stack(
        [
            np.log1p(cols["amount"]),
            np.sin(2 * np.pi * hour / 24.0),
            np.cos(2 * np.pi * hour / 24.0),
            np.eye(len(MERCHANTS))[cols["merchant"].astype(np.int64)],
            np.log1p(cols["distance"]),
            cols["card_present"],
            np.log1p(cols["velocity"]),
            np.log1p(cols["account_age"]),
            cols["foreign"],
            cols["ratio"],
        ]
    )
    return standardize(raw, REFERENCE), y, {k: v for k, v in counts.items() if v or k == "camouflaged"}


def fraud(*, seed: int = 0) -> FederatedDataset:
    """The three branches, each split 80/20 (stratified by label); deterministic in ``seed``."""
    seed = check_seed(seed)
    sites: list[SiteArrays] = []
    per_site: dict[str, dict[str, object]] = {}
    for site, params in SITES.items():
        x, y, modes = _site(params, site_rng(seed, "fraud", site))
        tr, te = split_rows(len(y), site_rng(seed, "fraud", site, "split"), strata=y)
        sites.append(SiteArrays(site, x, y, tr, te))
        per_site[site] = {
            "transactions": int(len(y)),
            "frauds": int(y.sum()),
            "fraud_rate": float(y.mean()),
            "train": int(tr.size),
            "train_frauds": int(y[tr].sum()),
            "test": int(te.size),
            "test_frauds": int(y[te].sum()),
            "fraud_modes": modes,
        }
    info = {
        "scenario": "fraud",
        "seed": seed,
        "sites": per_site,
        "feature_scaling": "fixed reference (center, scale); flags, one-hot and hour sin/cos as is",
    }
    return assemble("fraud", TASK, sites, info, y_dtype=torch.float32)
