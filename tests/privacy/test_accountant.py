"""The accountant: ε equals the libraries' own value, ledgers merge and round-trip, calibration hits its target."""

from __future__ import annotations

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp

from fedloom.core.errors import ConfigError
from fedloom.privacy import accountant as acct


def _direct(sigma: float, q: float, steps: int, delta: float, kind: str) -> float:
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    a = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
    a.compose(event)
    return a.get_epsilon(delta)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.1, 0.01, 300), (0.8, 0.1, 20), (2.0, 0.5, 7)])
def test_epsilon_equals_dp_accounting_computed_directly(kind: str, sigma: float, q: float, steps: int) -> None:
    ledger = acct.add((), sigma, q, steps)
    assert acct.epsilon(ledger, 1e-5, kind) == _direct(sigma, q, steps, 1e-5, kind)  # type: ignore[arg-type]


def test_rdp_epsilon_matches_opacus_rdp_accountant() -> None:
    from opacus.accountants import RDPAccountant

    ours = acct.epsilon(acct.add((), 1.1, 0.01, 1000), 1e-5, "rdp")
    theirs = RDPAccountant()
    theirs.history = [(1.1, 0.01, 1000)]
    assert ours == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-6)


def test_unsampled_gaussian_and_composition_of_different_entries() -> None:
    ledger = acct.add(acct.add((), 2.0, 1.0, 3), 1.5, 0.2, 10)
    event = dpa.ComposedDpEvent(
        [
            dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(2.0), 3),
            dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.2, dpa.GaussianDpEvent(1.5)), 10),
        ]
    )
    a = rdp.RdpAccountant()
    a.compose(event)
    assert acct.epsilon(ledger, 1e-6) == a.get_epsilon(1e-6)


def test_ledger_merges_equal_entries_and_round_trips_through_json() -> None:
    led = acct.add(acct.add(acct.add((), 1.0, 0.1), 1.0, 0.1, 2), 0.5, 0.1)
    assert led == ((1.0, 0.1, 3), (0.5, 0.1, 1))
    assert acct.ledger_from_json([list(e) for e in led]) == led
    assert acct.epsilon((), 1e-5) == 0.0
    for bad in ("x", [[1.0, 0.1]], [[1.0, 0.1, 1.5]], [[-1.0, 0.1, 1]], [[1.0, 1.5, 1]]):
        with pytest.raises(ValueError):
            acct.ledger_from_json(bad)


@pytest.mark.parametrize(("q", "count", "sens"), [(0.1, 100, 1.0), (1.0, 20, 2.0)])
def test_calibrate_reaches_the_target_from_below(q: float, count: int, sens: float) -> None:
    sigma = acct.calibrate(2.0, 1e-5, sample_rate=q, count=count, sensitivity=sens)
    eps = acct.epsilon(acct.add((), sigma / sens, q, count), 1e-5)
    assert eps <= 2.0
    assert eps == pytest.approx(2.0, rel=1e-3)
    # a slightly smaller sigma overshoots: the calibration is tight
    assert acct.epsilon(acct.add((), sigma * 0.99 / sens, q, count), 1e-5) > 2.0


def test_bad_inputs_are_config_errors_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="privacy.delta"):
        acct.epsilon(acct.add((), 1.0, 0.1), 1.0)
    with pytest.raises(ConfigError, match="privacy.accountant"):
        acct.epsilon(acct.add((), 1.0, 0.1), 1e-5, "moments")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="privacy.target_epsilon.*cannot be reached"):
        acct.calibrate(1e-4, 1e-5, sample_rate=1.0, count=100000)
    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        acct.calibrate(-1.0, 1e-5, sample_rate=0.1, count=10)
