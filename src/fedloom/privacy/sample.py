"""Sample-level DP: the accounting of DP-SGD (Abadi et al. 2016) run inside local training.

For cross-silo federations (three hospitals), user-level DP over the sites means little; what
must be protected is each patient record. The clients then train with DP-SGD
(``TrainConfig.dp_clip_norm`` / ``dp_noise_multiplier``, :mod:`fedloom.client.dpsgd`): every
step Poisson-samples the client's records with rate q = min(1, B/n), clips each per-sample
gradient to C and adds N(0, (σ·C)²) to their sum. Everything the client then sends is
post-processing of those noised steps, except its training metrics, which this stage keeps
home.

The stage ``dp_sample`` does the accounting on the server: for every client in a round it
adds ``steps`` Poisson-subsampled Gaussian releases (σ, q) to that client's own ledger,
computed from the client's example count and the run's training config (never from what the
client claims; an update whose step count differs from the config's is rejected). A
record's ε is its client's ε, and ``dp_epsilon`` is the largest over the clients seen so far.
:meth:`SampleDP.admit` refuses a round after which any known client would exceed
``max_epsilon``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from fedloom.client.dpsgd import dpsgd_sampling
from fedloom.core.errors import BudgetExhausted, ConfigError, StrategyError
from fedloom.core.types import Aggregate, ClientUpdate, TrainConfig
from fedloom.pipeline.base import ClientBatch, Stage, StageContext, StageState
from fedloom.privacy import accountant as acct
from fedloom.privacy._common import check_positive, stripped

__all__ = ["SampleDP"]


@dataclass(frozen=True)
class SampleDP(Stage):
    """Per-client ledgers of DP-SGD's releases; training metrics stay on the client."""

    name: ClassVar[str] = "dp_sample"

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    batch_size: int = 10
    epochs: int = 1
    max_steps: int | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        check_positive(self.clip_norm, "clip_norm")
        check_positive(self.noise_multiplier, "noise_multiplier")
        acct.check_delta(self.delta, key="delta")
        if self.accountant not in acct.ACCOUNTANTS:
            raise ConfigError(f"must be one of {', '.join(acct.ACCOUNTANTS)}, got {self.accountant!r}", key="accountant")
        if self.max_epsilon is not None:
            check_positive(self.max_epsilon, "max_epsilon")
        _ = self.train_config  # checks batch_size, epochs, max_steps

    @property
    def train_config(self) -> TrainConfig:
        """The DP-SGD settings this stage accounts for, as a TrainConfig."""
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            max_steps=self.max_steps,
            dp_clip_norm=self.clip_norm,
            dp_noise_multiplier=self.noise_multiplier,
        )

    def round_releases(self, num_examples: int) -> tuple[float, int]:
        """(sample rate q, steps) of one round of a client with ``num_examples`` records."""
        return dpsgd_sampling(num_examples, self.train_config)

    def init_state(self, spec: Any) -> StageState:
        return StageState(meta={"clients": {}})

    def _ledgers(self, state: StageState) -> dict[str, acct.Ledger]:
        raw = state.meta.get("clients", {})
        try:
            if not isinstance(raw, dict):
                raise ValueError("not an object")
            return {str(cid): acct.ledger_from_json(led) for cid, led in raw.items()}
        except ValueError as exc:
            raise StrategyError(f"stage {self.name!r}: the privacy ledgers in the server state are corrupt: {exc}") from None

    def _eps(self, ledger: acct.Ledger) -> float:
        return acct.epsilon(ledger, self.delta, self.accountant)  # type: ignore[arg-type]

    def admit(self, state: StageState, rnd: int) -> None:
        if self.max_epsilon is None:
            return
        last = state.meta.get("last", {})
        worst, who = 0.0, ""
        for cid, ledger in self._ledgers(state).items():
            if cid not in last:
                continue
            q, steps = last[cid]  # one more round like this client's last (its example count stays)
            eps = self._eps(acct.add(ledger, self.noise_multiplier, float(q), int(steps)))
            if eps > worst:
                worst, who = eps, cid
        if worst > self.max_epsilon:
            raise BudgetExhausted(
                f"privacy budget: round {rnd} would bring client {who!r}'s sample-level ε to {worst:.4g} > "
                f"max_epsilon {self.max_epsilon:g} (δ = {self.delta:g})"
            )

    def client(self, batch: ClientBatch, ctx: StageContext) -> None:
        batch.updates = [stripped(u) for u in batch.updates]

    def server(self, update: ClientUpdate, ctx: StageContext) -> ClientUpdate:
        _, steps = self.round_releases(update.num_examples)
        if update.num_steps != steps:
            raise self.reject(
                update,
                f"took {update.num_steps} DP-SGD steps; the run's config gives {steps} for {update.num_examples} examples",
            )
        return replace(update, metrics={})

    def finalize(
        self, aggregate: Aggregate, ctx: StageContext, state: StageState
    ) -> tuple[Aggregate, StageState, dict[str, float]]:
        ledgers = self._ledgers(state)
        last = dict(state.meta.get("last", {}))
        if len(aggregate.client_examples) != len(aggregate.client_ids):
            raise StrategyError(f"stage {self.name!r}: the aggregate lacks per-client example counts")
        for cid, n in zip(aggregate.client_ids, aggregate.client_examples, strict=True):
            q, steps = self.round_releases(n)
            ledgers[cid] = acct.add(ledgers.get(cid, ()), self.noise_multiplier, q, steps)
            last[cid] = [q, steps]
        eps = {cid: self._eps(led) for cid, led in ledgers.items()}
        meta = {
            **state.meta,
            "clients": {cid: [list(e) for e in led] for cid, led in ledgers.items()},
            "last": last,
        }
        return aggregate, StageState(state.tensors, meta), {"dp_epsilon": max(eps.values(), default=0.0)}
