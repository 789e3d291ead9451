"""The privacy accountant: a ledger of Gaussian mechanisms, and ε(δ) from Google's dp-accounting.

No privacy math is written here. A :class:`Ledger` is the JSON-able list of what was
released: entries ``(noise_multiplier, sample_rate, count)``, each ``count`` compositions of
a Gaussian mechanism with noise multiplier σ (noise std / L2 sensitivity), Poisson-subsampled
with rate q (q = 1: no sampling). It lives in the server state (a stage's ``meta``), so it is
checkpointed with the model and a resumed run reports exactly the ε an uninterrupted one
would. :func:`epsilon` turns a ledger into ε at δ with the ``rdp`` (Rényi DP, Mironov 2017;
the fast default) or ``pld`` (privacy loss distributions, tighter and about 10-50x slower)
accountant of the ``dp-accounting`` library, and :func:`calibrate` finds the noise
multiplier that reaches a target ε after a given number of compositions (Brent's method in
``dp_accounting.calibrate_dp_mechanism``).

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
