"""FedDyn: federated learning with dynamic regularization.

Acar, Zhao, Matas Navarro, Mattina, Whatmough, Saligrama. "Federated Learning Based on
Dynamic Regularization." ICLR 2021, Algorithm 1.

In round t each participating client i (the set P_t) approximately minimizes, from the global
model θ^{t−1},

    L_i(θ) − ⟨g_i, θ⟩ + (α/2) · ‖θ − θ^{t−1}‖²

where g_i is the client's own state (zeros before its first round; the paper's
∇L_i(θ_i^{t−1})), and then updates it with the first-order condition of that minimum::

    g_i ← g_i − α · (θ_i^t − θ^{t−1})

The server keeps h (zeros at init) and, with N the number of clients in the population::

    h   ← h − α · (1/N) · Σ_{i∈P_t} (θ_i^t − θ^{t−1})
    θ^t = (1/|P_t|) · Σ_{i∈P_t} θ_i^t − h / α

i.e. ``θ ← θ + η_g · (mean_i Δ_i − h/α)`` through the strategy's server optimizer (plain, with
η_g = ``server_lr`` = 1, is the paper's step). The paper tunes α over {0.1, 0.01, 0.001};
the default here is 0.01.

Where it runs. The local part is the ``feddyn`` gradient transform
(:class:`~fedloom.client.transforms.DynamicRegularization`: ``grad += α (θ − θ^{t−1}) − g_i``
each step, ``g_i`` updated after training), the same code in every engine and in the deployed
agent; g_i is client state (``feddyn.grad``: the engines' client-state store, checkpointed
with the run, or the agent's state file), and nothing besides the delta travels up. The
clients' models are averaged unweighted (``weight_uniform``); the server part is the stage
:class:`FedDynStep`, run on the aggregate after the averaging: it keeps h as its server state
(``ServerState.tensors["stage.0.feddyn.h"]``, checkpointed) and turns the mean delta into
``mean − h/α``. It acts on the trainable entries only: buffers (BatchNorm statistics) are
averaged as in FedAvg, with no h. Because h needs only the sum of the deltas, FedDyn runs
under secure aggregation.

N is by default the aggregate's ``num_available`` (the round loop sets it to the number of
distinct clients the cohort was selected from, so an elastic population is followed); pass
``num_clients`` to fix it. The round fails with :class:`~fedloom.core.errors.StrategyError`
when N is unknown or smaller than the number of updates.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from fedloom.core.errors import StrategyError
from fedloom.core.keys import FEDDYN
from fedloom.core.params import ParamSpec
from fedloom.core.types import Aggregate, ClientInstruction, ComponentSpec
from fedloom.pipeline import Stage, StageContext, StageState, UniformWeighting
from fedloom.strategies._checks import check_int, check_real, population, set_fields
from fedloom.strategies.base import ServerState, Strategy

__all__ = ["FedDyn", "FedDynStep"]


@dataclass(frozen=True)
class FedDynStep(Stage):
    """FedDyn's server step on the averaged delta: update h, subtract h/α (trainable entries).

    ``num_clients`` fixes N; None takes the aggregate's ``num_available``.
    """

    name: ClassVar[str] = "feddyn"
    runs_on_client: ClassVar[bool] = False
    alpha: float = 0.01
    num_clients: int | None = None

    def __post_init__(self) -> None:
        check_real(self.alpha, key="alpha", low=0.0, low_open=True)

    def init_state(self, spec: ParamSpec) -> StageState:
        return StageState(tensors={"h": torch.zeros(spec.numel, dtype=spec.dtype)})

    def finalize(
        self, aggregate: Aggregate, ctx: StageContext, state: StageState
    ) -> tuple[Aggregate, StageState, dict[str, float]]:
        who = f"stage {self.name!r}"
        if aggregate.weight is not None:
            raise StrategyError(f"{who} must see the averaged delta (after the weighting's finalize)")
        n_total = population(self.num_clients, aggregate.num_available, aggregate.num_clients, who=who)
        h = state.tensors.get("h")
        mean = aggregate.delta
        if not isinstance(h, torch.Tensor) or h.shape != mean.shape:
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else None
            raise StrategyError(f"{who}: server state 'h' is {got}, expected shape {tuple(mean.shape)}")
        mean64 = mean.to(torch.float64)
        trainable = ctx.trainable.to(mean.device)
        step = torch.where(trainable, mean64, torch.zeros_like(mean64))
        h_new = h.to(device=mean.device, dtype=torch.float64) - (self.alpha * aggregate.num_clients / n_total) * step
        delta = mean64 - h_new / self.alpha
        h_out = h_new.to(ctx.dtype)
        return replace(aggregate, delta=delta.to(ctx.dtype)), replace(state, tensors={**state.tensors, "h": h_out}), {}


@dataclass(frozen=True, kw_only=True)
class FedDyn(Strategy):
    """FedDyn (Acar et al. 2021) with coefficient ``alpha`` > 0; ``num_clients`` fixes N (default: the population)."""

    name = "feddyn"
    synchronous_only = "its server state h accumulates each round's mean drift over the whole population"

    alpha: float = 0.01
    num_clients: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        set_fields(self, alpha=check_real(self.alpha, key="alpha", low=0.0, low_open=True))
        if self.num_clients is not None:
            set_fields(self, num_clients=check_int(self.num_clients, key="num_clients", low=1))

    def client_config(self, state: ServerState, rnd: int, client_id: str) -> ClientInstruction:
        instr = super().client_config(state, rnd, client_id)
        return replace(instr, transforms=(*instr.transforms, ComponentSpec.of(FEDDYN, alpha=self.alpha)))

    def stages(self) -> tuple[Stage, ...]:
        # Finalize runs in reverse order: the uniform average first, then FedDyn's step on it.
        return (FedDynStep(alpha=self.alpha, num_clients=self.num_clients), UniformWeighting())

