"""The privacy accountant: ledgers of Gaussian (and Skellam) mechanisms, and ε(δ) from Google's dp-accounting.

No Gaussian privacy math is written here. A :class:`Ledger` is the JSON-able list of what was
released: entries ``(noise_multiplier, sample_rate, count)``, each ``count`` compositions of
a Gaussian mechanism with noise multiplier σ (noise std / L2 sensitivity), Poisson-subsampled
with rate q (q = 1: no sampling). It lives in the server state (a stage's ``meta``), so it is
checkpointed with the model and a resumed run reports exactly the ε an uninterrupted one
would. :func:`epsilon` turns a ledger into ε at δ with the ``rdp`` (Rényi DP, Mironov 2017;
the fast default) or ``pld`` (privacy loss distributions, tighter and about 10-50x slower)
accountant of the ``dp-accounting`` library, and :func:`calibrate` finds the noise
multiplier that reaches a target ε after a given number of compositions (Brent's method in
``dp_accounting.calibrate_dp_mechanism``).

Distributed DP's Skellam noise (an integer mechanism, not a Gaussian) is accounted with its
own ledger: Agarwal, Kairouz and Liu's (2021) RDP bound, composed over rounds by adding RDP,
and converted to (ε, δ) by dp-accounting's RDP conversion (:func:`skellam_epsilon`).

``dp-accounting`` is an optional extra (``pip install fedloom[privacy]``), imported on first use.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

from fedloom.core.errors import ConfigError

__all__ = [
    "ACCOUNTANTS",
    "AccountantName",
    "Ledger",
    "MAX_NOISE_MULTIPLIER",
    "add",
    "calibrate",
    "check_delta",
    "epsilon",
    "ledger_from_json",
    "skellam_add",
    "skellam_calibrate",
    "skellam_epsilon",
    "skellam_ledger_from_json",
    "skellam_rdp",
]

AccountantName = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
MAX_NOISE_MULTIPLIER = 1000.0
"""The largest noise multiplier :func:`calibrate` searches: beyond it the noise drowns any model."""

Entry = tuple[float, float, int]
Ledger = tuple[Entry, ...]
"""``((noise_multiplier, sample_rate, count), ...)`` in release order."""


def _dpa() -> Any:
    try:
        import dp_accounting
    except ImportError:  # pragma: no cover - the privacy extra is installed by make
        raise ConfigError(
            "differential privacy needs the privacy extra: pip install 'fedloom[privacy]' (dp-accounting)", key="privacy"
        ) from None
    logging.getLogger("absl").setLevel(logging.ERROR)  # RDP orders that do not converge are skipped, with a warning each
    return dp_accounting


def check_delta(delta: float, *, key: str = "privacy.delta") -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0.0 < delta < 1.0):
        raise ConfigError(f"must be a number in (0, 1), got {delta!r}", key=key)
    return float(delta)


def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {name!r}; known: {', '.join(ACCOUNTANTS)}", key="privacy.accountant")


def add(ledger: Ledger, noise_multiplier: float, sample_rate: float, count: int = 1) -> Ledger:
    """``ledger`` with ``count`` more releases; merged into the last entry when (σ, q) match."""
    if not (noise_multiplier > 0.0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise multiplier must be finite and > 0, got {noise_multiplier!r}")
    if not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate!r}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count!r}")
    if count == 0:
        return ledger
    if ledger and ledger[-1][0] == noise_multiplier and ledger[-1][1] == sample_rate:
        sigma, q, n = ledger[-1]
        return (*ledger[:-1], (sigma, q, n + count))
    return (*ledger, (float(noise_multiplier), float(sample_rate), int(count)))


def ledger_from_json(data: object) -> Ledger:
    """A ledger from its JSON form (a list of ``[σ, q, count]``); raises ValueError if malformed."""
    if not isinstance(data, (list, tuple)):
        raise ValueError(f"a privacy ledger is a list, got {type(data).__name__}")
    out: Ledger = ()
    for item in data:
        if not (isinstance(item, (list, tuple)) and len(item) == 3):
            raise ValueError(f"a ledger entry is [noise_multiplier, sample_rate, count], got {item!r}")
        sigma, q, n = item
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"a ledger count must be an integer, got {n!r}")
        out = add(out, float(sigma), float(q), n)
    return out


def _event(dpa: Any, ledger: Ledger) -> Any:
    events = []
    for sigma, q, n in ledger:
        gaussian = dpa.GaussianDpEvent(sigma)
        one = gaussian if q >= 1.0 else dpa.PoissonSampledDpEvent(q, gaussian)
        events.append(dpa.SelfComposedDpEvent(one, n))
    return dpa.ComposedDpEvent(events)


def _accountant(dpa: Any, name: str) -> Any:
    if name == "rdp":
        return dpa.rdp.RdpAccountant()
    return dpa.pld.PLDAccountant()


@functools.lru_cache(maxsize=256)
def epsilon(ledger: Ledger, delta: float, accountant: AccountantName = "rdp") -> float:
    """ε at ``delta`` after the releases of ``ledger`` (0.0 for an empty ledger)."""
    _check_accountant(accountant)
    check_delta(delta)
    if not ledger or all(n == 0 for _, _, n in ledger):
        return 0.0
    dpa = _dpa()
    acc = _accountant(dpa, accountant)
    acc.compose(_event(dpa, ledger))
    return float(acc.get_epsilon(delta))


def calibrate(
    target_epsilon: float,
    delta: float,
    *,
    sample_rate: float,
    count: int,
    accountant: AccountantName = "rdp",
    sensitivity: float = 1.0,
    prior: Ledger = (),
) -> float:
    """The noise multiplier σ (noise std / clip norm) whose ``count`` releases reach ``target_epsilon``.

    Each release is a Gaussian mechanism of L2 sensitivity ``sensitivity`` × clip norm
    (2 for local DP, where any two updates in the clip ball are neighbours), Poisson-sampled
    with ``sample_rate``, after the releases already in ``prior``. Raises
    :class:`ConfigError` (key ``privacy.target_epsilon``) when no σ ≤
    :data:`MAX_NOISE_MULTIPLIER` reaches the target.
    """
    _check_accountant(accountant)
    check_delta(delta)
    key = "privacy.target_epsilon"
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not (
        target_epsilon > 0.0 and math.isfinite(target_epsilon)
    ):
        raise ConfigError(f"must be a finite number > 0, got {target_epsilon!r}", key=key)
    if count < 1:
        raise ConfigError(f"needs at least one release to calibrate, got {count}", key=key)

    def ledger_of(sigma: float) -> Ledger:
        return add(prior, sigma / sensitivity, sample_rate, count)

    if epsilon(ledger_of(MAX_NOISE_MULTIPLIER), delta, accountant) > target_epsilon:
        raise ConfigError(
            f"ε = {target_epsilon} at δ = {delta} cannot be reached in {count} releases at sample rate "
            f"{sample_rate} with a noise multiplier ≤ {MAX_NOISE_MULTIPLIER:g}: allow a larger ε, fewer rounds "
            "or a smaller sampling fraction",
            key=key,
        )
    dpa = _dpa()
    sigma = dpa.calibrate_dp_mechanism(
        lambda: _accountant(dpa, accountant),
        lambda s: _event(dpa, ledger_of(s)),
        target_epsilon,
        delta,
        bracket_interval=dpa.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-6,
    )
    sigma = float(sigma)
    # Brent's method stops within tol of the root, on either side: step up until the target holds.
    for _ in range(60):
        if epsilon(ledger_of(sigma), delta, accountant) <= target_epsilon:
            break
        sigma *= 1.0 + 1e-6
    return sigma


def epsilons(ledgers: Sequence[Ledger], delta: float, accountant: AccountantName = "rdp") -> list[float]:
    """ε of each ledger (identical ledgers are computed once)."""
    return [epsilon(led, delta, accountant) for led in ledgers]


# ----------------------------------------------------------------- the Skellam mechanism
SkellamEntry = tuple[float, float, float, int]
SkellamLedger = tuple[SkellamEntry, ...]
"""``((variance, l1_sensitivity, l2_sensitivity, count), ...)``: ``count`` releases of an
integer-valued sum with Skellam noise of that per-entry ``variance`` (the total over the
clients), in the integer units of the sensitivities."""

SKELLAM_ORDERS: tuple[int, ...] = (*range(2, 64), 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024)


def skellam_rdp(order: int, variance: float, l1: float, l2: float) -> float:
    """RDP of order α (an integer > 1) of one Skellam release.

    Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
    Learning", NeurIPS 2021, Theorem 3.5 (μ: the per-entry variance of the noise)::

        ε(α) ≤ α Δ2² / (2μ) + min( ((2α − 1) Δ2² + 6 Δ1) / (4μ²),  3 Δ1 / (2μ) )
    """
    if order < 2 or int(order) != order:
        raise ValueError(f"the Skellam bound is for integer orders > 1, got {order!r}")
    if not (variance > 0.0 and l1 >= 0.0 and l2 >= 0.0):
        raise ValueError("variance must be > 0 and the sensitivities >= 0")
    a, mu = float(order), float(variance)
    return a * l2 * l2 / (2 * mu) + min(((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu))


def skellam_add(ledger: SkellamLedger, variance: float, l1: float, l2: float, count: int = 1) -> SkellamLedger:
    """``ledger`` with ``count`` more releases (merged into the last entry when it matches)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count!r}")
    if count == 0:
        return ledger
    if ledger and ledger[-1][:3] == (variance, l1, l2):
        v, a, b, n = ledger[-1]
        return (*ledger[:-1], (v, a, b, n + count))
    return (*ledger, (float(variance), float(l1), float(l2), int(count)))


def skellam_ledger_from_json(data: object) -> SkellamLedger:
    """A Skellam ledger from its JSON form (a list of ``[variance, l1, l2, count]``); ValueError if malformed."""
    if not isinstance(data, (list, tuple)):
        raise ValueError(f"a Skellam ledger is a list, got {type(data).__name__}")
    out: SkellamLedger = ()
    for item in data:
        if not (isinstance(item, (list, tuple)) and len(item) == 4) or isinstance(item[3], bool) or not isinstance(item[3], int):
            raise ValueError(f"a Skellam ledger entry is [variance, l1, l2, count], got {item!r}")
        out = skellam_add(out, float(item[0]), float(item[1]), float(item[2]), item[3])
    return out


@functools.lru_cache(maxsize=256)
def skellam_epsilon(ledger: SkellamLedger, delta: float) -> float:
    """ε at ``delta`` of the composed Skellam releases: RDP adds up; dp-accounting converts it to (ε, δ)."""
    check_delta(delta)
    if not ledger or all(n == 0 for *_, n in ledger):
        return 0.0
    dpa = _dpa()
    rdp = [sum(n * skellam_rdp(a, v, l1, l2) for v, l1, l2, n in ledger) for a in SKELLAM_ORDERS]
    eps, _ = dpa.rdp.rdp_privacy_accountant.compute_epsilon(SKELLAM_ORDERS, rdp, delta)
    return float(eps)


def skellam_calibrate(target_epsilon: float, delta: float, *, l1: float, l2: float, count: int) -> float:
    """The smallest noise multiplier σ (total noise std / L2 sensitivity) whose ``count`` Skellam releases reach ``target_epsilon``.

    Bisection on σ in [1e-3, :data:`MAX_NOISE_MULTIPLIER`] (ε falls as σ grows); the
    variance of the noise is (σ·Δ2)². ConfigError (key ``privacy.target_epsilon``) if
    the target cannot be reached.
    """
    key = "privacy.target_epsilon"
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not (
        target_epsilon > 0.0 and math.isfinite(target_epsilon)
    ):
        raise ConfigError(f"must be a finite number > 0, got {target_epsilon!r}", key=key)
    if count < 1:
        raise ConfigError(f"needs at least one release to calibrate, got {count}", key=key)

    def eps(sigma: float) -> float:
        return skellam_epsilon(((sigma * sigma * l2 * l2, l1, l2, count),), delta)

    lo, hi = 1e-3, MAX_NOISE_MULTIPLIER
    if eps(hi) > target_epsilon:
        raise ConfigError(
            f"ε = {target_epsilon} at δ = {delta} cannot be reached in {count} releases with a noise multiplier "
            f"≤ {MAX_NOISE_MULTIPLIER:g}: allow a larger ε or fewer rounds",
            key=key,
        )
    for _ in range(200):
        if hi - lo <= 1e-7 * hi:
            break
        mid = math.sqrt(lo * hi) if hi / lo > 4 else (lo + hi) / 2
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
