"""From a ``[privacy]`` table to the run's privacy stage: calibration and the soundness checks.

:func:`plan_privacy` turns the user's choice (mode, σ or a target ε, C, δ, accountant, budget)
into one pipeline stage (:class:`~fedloom.privacy.central.CentralDP`,
:class:`~fedloom.privacy.local.LocalDP`, :class:`~fedloom.privacy.sample.SampleDP` or
:class:`~fedloom.privacy.distributed.DistributedDP`, placed
first among the run's stages, so clipping comes before any compression) and, for
sample-level DP, the DP-SGD settings of local training. With ``target_epsilon`` it computes
the noise multiplier that reaches it after ``run.rounds`` rounds and says what it chose.

It refuses, with the reason, the combinations whose privacy would not be what ε says:

* central DP with a strategy that does not average (median, Krum: their sensitivity is not
  the clip norm) or weights updates by data (contribution weighting), with SCAFFOLD (its
  control variates leave unclipped), with ``fixed`` client sampling (the accountant models
  Poisson sampling), with retries, over-selection or ``min_updates`` > 1 (they change who is
  sampled, or whether a round is released, depending on the cohort), or with a stochastic
  encoding after the clip (QSGD, top-k with error feedback) that can raise a clipped
  update's norm above C;
* local DP with a strategy whose clients send extra per-client vectors;
* distributed DP without ``[secure]`` (the noise shares are only private under the masks) or
  with fewer than 2 clients per round;
* any mode with a model that has buffers (BatchNorm statistics come from the data and would
  leave unprotected; Opacus refuses them for the same reason), or with privacy stages written
  into ``[[pipeline]]`` by hand (their accounting would not match the run).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from fedloom.client.dpsgd import dpsgd_sampling
from fedloom.core.config import PrivacySection
from fedloom.core.errors import ConfigError
from fedloom.core.seeding import derive_seed
from fedloom.core.types import TrainConfig
from fedloom.pipeline.base import Stage
from fedloom.pipeline.weighting import WeightingStage
from fedloom.privacy import accountant as acct
from fedloom.privacy.central import CentralDP
from fedloom.privacy.distributed import DistributedDP
from fedloom.privacy.local import LocalDP
from fedloom.privacy.sample import SampleDP
from fedloom.strategies.base import Strategy

__all__ = ["PRIVACY_STAGES", "PrivacyPlan", "plan_privacy"]

log = logging.getLogger("fedloom.privacy")

PRIVACY_STAGES = frozenset({CentralDP.name, LocalDP.name, SampleDP.name, DistributedDP.name})
SAFE_AFTER_CLIP = frozenset({"fp16", "bf16", "sparse"})
"""Encodings allowed after central DP's clip: deterministic casts (within the norm check's slack) and the
lossless sparse codec; any other is refused."""


@dataclass(frozen=True)
class PrivacyPlan:
    """The privacy stage of a run, the local-training settings it needs, and what was chosen."""

    stage: Stage
    train: TrainConfig
    noise_multiplier: float
    calibrated: bool
    summary: str


def _refuse(msg: str, key: str = "privacy.mode") -> ConfigError:
    return ConfigError(msg, key=key)


def _check_common(section: PrivacySection, strategy: Strategy, user_stages: Sequence[Stage], has_buffers: Sequence[str]) -> None:
    by_hand = [st.name for st in user_stages if st.name in PRIVACY_STAGES]
    if by_hand:
        raise ConfigError(f"privacy stage {by_hand[0]!r} is configured by the [privacy] table, not by hand", key="pipeline")
    if has_buffers:
        raise _refuse(
            f"the model has buffers ({', '.join(has_buffers[:3])}{', ...' if len(has_buffers) > 3 else ''}): statistics "
            "such as BatchNorm's are computed from the data and would leave unprotected; use a model without them "
            "(e.g. model.batchnorm = false for the MLP)"
        )
    if (section.noise_multiplier is None) == (section.target_epsilon is None):
        raise ConfigError("give exactly one of privacy.noise_multiplier and privacy.target_epsilon", key="privacy")
    if section.mode != "central" and section.adaptive_clipping:
        raise ConfigError("adaptive clipping is for central DP (mode = 'central')", key="privacy.adaptive_clipping")


def _check_central(
    strategy: Strategy, user_stages: Sequence[Stage], *, min_updates: int, round_retries: int, over_selection: float
) -> None:
    own = strategy.stages()
    if not own or not all(isinstance(st, WeightingStage) and st.runs_on_client for st in own):
        raise _refuse(
            f"central DP needs a strategy that averages the clipped updates; {strategy.name!r} aggregates "
            "differently (a median, Krum or data-dependent weights), so one client's influence is not bounded by the clip norm"
        )
    if strategy.update_extras:
        raise _refuse(f"strategy {strategy.name!r} sends per-client vectors {list(strategy.update_extras)} that central DP does not clip")
    if strategy.sampling != "poisson":
        raise ConfigError(
            "central DP's accountant models Poisson client sampling: set strategy.sampling = \"poisson\" "
            "(each client joins a round with probability strategy.fraction)",
            key="strategy.sampling",
        )
    if min_updates != 1:
        raise ConfigError("must be 1 with central DP: skipping a round because few clients answered depends on the cohort", key="run.min_updates")
    if round_retries or over_selection:
        raise ConfigError(
            "central DP needs deploy.round_retries = 0 and deploy.over_selection = 0: both sample extra clients",
            key="deploy.round_retries" if round_retries else "deploy.over_selection",
        )
    for st in user_stages:
        if getattr(st, "codec", None) is not None and st.name not in SAFE_AFTER_CLIP:
            raise ConfigError(
                f"stage {st.name!r} after central DP's clip can raise an update's norm above the clip norm "
                f"(stochastic rounding or error feedback); encodings allowed with central DP: {', '.join(sorted(SAFE_AFTER_CLIP))}",
                key="pipeline",
            )
        if st.weighting:
            raise ConfigError(f"stage {st.name!r} sets weights; DP-FedAvg weights clients uniformly", key="pipeline")


def plan_privacy(
    section: PrivacySection,
    *,
    strategy: Strategy,
    train: TrainConfig,
    user_stages: Sequence[Stage] = (),
    rounds: int,
    population: int | None,
    client_examples: Sequence[int] | None = None,
    deployed: bool = False,
    run_seed: int = 0,
    min_updates: int = 1,
    round_retries: int = 0,
    over_selection: float = 0.0,
    has_buffers: Sequence[str] = (),
    secure: str | None = None,
    cohort: int | None = None,
    ring_bits: int = 32,
    numel: int = 0,
) -> PrivacyPlan:
    """The privacy stage and training settings for ``section`` (see the module doc).

    ``population`` is the number of clients (simulation: the dataset's; deployment: None);
    ``client_examples`` their example counts (sample-level calibration needs them).
    Distributed DP needs ``secure`` (the ``[secure]`` protocol), ``cohort`` (the clients
    expected per round, whose noise shares add up to σ) and ``ring_bits`` (the modulus of
    the secure sum); ``numel`` the model's size (the grid's sensitivities depend on it).
    """
    _check_common(section, strategy, user_stages, has_buffers)
    delta, accountant = section.delta, section.accountant
    noise = section.noise if section.noise != "auto" else ("os" if deployed else "seeded")
    if population and delta > 1.0 / population:
        log.warning("privacy.delta = %g exceeds 1/N = %g for N = %d clients", delta, 1.0 / population, population)
    sigma = section.noise_multiplier
    calibrated = sigma is None
    target = section.target_epsilon
    if section.mode == "central":
        _check_central(strategy, user_stages, min_updates=min_updates, round_retries=round_retries, over_selection=over_selection)
        q = strategy.fraction
        if sigma is None:
            assert target is not None
            sigma = acct.calibrate(target, delta, sample_rate=q, count=rounds, accountant=accountant)
        count_stddev = None
        if section.adaptive_clipping:
            expected = q * population if population else None
            count_stddev = section.count_stddev
            if count_stddev is None:
                if expected is None:
                    raise ConfigError("set it for a deployment (the paper's choice: expected clients per round / 20)", key="privacy.count_stddev")
                count_stddev = max(expected / 20.0, sigma)
        stage: Stage = CentralDP(
            clip_norm=section.clip_norm,
            noise_multiplier=sigma,
            sample_rate=q,
            delta=delta,
            accountant=accountant,
            max_epsilon=section.max_epsilon,
            target_quantile=section.target_quantile if section.adaptive_clipping else None,
            clip_lr=section.clip_lr,
            count_stddev=count_stddev,
            noise=noise,
            noise_seed=derive_seed(run_seed, "dp-noise"),
        )
        what = f"user-level central DP (DP-FedAvg{', adaptive clipping' if section.adaptive_clipping else ''}), Poisson q = {q:g}"
        new_train = train
    elif section.mode == "local":
        if strategy.update_extras:
            raise _refuse(f"strategy {strategy.name!r} sends per-client vectors {list(strategy.update_extras)} that local DP does not noise")
        if sigma is None:
            assert target is not None
            sigma = acct.calibrate(target, delta, sample_rate=1.0, count=rounds, accountant=accountant, sensitivity=2.0)
        stage = LocalDP(
            clip_norm=section.clip_norm, noise_multiplier=sigma, delta=delta, accountant=accountant,
            max_epsilon=section.max_epsilon, noise=noise,
        )  # fmt: skip
        what = f"local DP on updates, ε per round {stage.epsilon_per_round:.3g}"  # type: ignore[attr-defined]
        new_train = train
    elif section.mode == "distributed":
        if secure is None:
            raise _refuse(
                "distributed DP adds each client's share of the noise under secure aggregation: add a [secure] "
                "section (protocol secagg, secagg+ or ckks)"
            )
        if strategy.update_extras:
            raise _refuse(f"strategy {strategy.name!r} sends per-client vectors {list(strategy.update_extras)} that distributed DP does not noise")
        if not cohort or cohort < 2:
            raise _refuse(f"distributed DP needs at least 2 clients per round, the cohort has {cohort}")
        probe = DistributedDP(clip_norm=section.clip_norm, noise_multiplier=1.0, clients=cohort, modulus_bits=ring_bits)
        if sigma is None:
            assert target is not None
            # Δ1 and Δ2 depend on the grid, which depends on σ only through the headroom for 8σ: calibrate at σ's grid
            sigma = 1.0
            for _ in range(4):
                plan = replace(probe, noise_multiplier=sigma).encoding(numel)
                sigma = acct.skellam_calibrate(target, delta, l1=plan.bound**2, l2=plan.bound, count=rounds)
        stage = DistributedDP(
            clip_norm=section.clip_norm, noise_multiplier=sigma, clients=cohort, delta=delta,
            max_epsilon=section.max_epsilon, noise=noise, modulus_bits=ring_bits,
        )  # fmt: skip
        what = f"distributed DP (Skellam noise shares under {secure}, {cohort} clients per round)"
        accountant = "skellam rdp"  # type: ignore[assignment]
        new_train = train
    else:
        if sigma is None:
            assert target is not None
            if not client_examples:
                raise ConfigError(
                    "sample-level calibration needs the clients' example counts, unknown to a deployed server: "
                    "give privacy.noise_multiplier",
                    key="privacy.target_epsilon",
                )
            probe = TrainConfig(epochs=train.epochs, batch_size=train.batch_size, max_steps=train.max_steps, dp_clip_norm=section.clip_norm)
            sigma = max(
                acct.calibrate(target, delta, sample_rate=q_i, count=rounds * steps, accountant=accountant)
                for q_i, steps in sorted({dpsgd_sampling(n, probe) for n in client_examples})
            )
        stage = SampleDP(
            clip_norm=section.clip_norm, noise_multiplier=sigma, batch_size=train.batch_size, epochs=train.epochs,
            max_steps=train.max_steps, delta=delta, accountant=accountant, max_epsilon=section.max_epsilon,
        )  # fmt: skip
        new_train = TrainConfig(
            **{**train.__dict__, "dp_clip_norm": section.clip_norm, "dp_noise_multiplier": sigma, "dp_noise": noise}
        )
        what = "sample-level DP-SGD in local training"
    assert sigma is not None and math.isfinite(sigma)
    how = f"chosen for ε = {target:g} after {rounds} rounds" if calibrated else "as configured"
    summary = (
        f"privacy: {what}; noise multiplier σ = {sigma:.4g} ({how}), clip norm C = {section.clip_norm:g}, "
        f"δ = {delta:g}, {accountant} accountant, noise {noise}"
        + (f", budget ε ≤ {section.max_epsilon:g}" if section.max_epsilon is not None else "")
    )
    return PrivacyPlan(stage=stage, train=new_train, noise_multiplier=sigma, calibrated=calibrated, summary=summary)
