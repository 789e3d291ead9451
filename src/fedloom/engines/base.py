"""The Engine interface and the per-client state kept between rounds in simulation.

``Engine.run_cohort(global_vec, instructions)`` yields one :class:`ClientUpdate` per
instruction, as soon as it is ready, so the server aggregates in a stream. Engines differ
only in where the work runs (DESIGN.md): the algorithm code is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn

from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, ClientUpdate, Partial, Payload, PersonalEval, ProtocolMessage
from fedloom.pipeline import Pipeline, StageContext, finish_clients
from fedloom.secure.host import ProtocolClients
from fedloom.strategies.base import Aggregator

__all__ = ["ClientStateStore", "Engine", "ModelFn"]

ModelFn = Callable[[], nn.Module]


class ClientStateStore:
    """Client-side state (SCAFFOLD's c_i, ...) of simulated clients, keyed by client id.

    In deployment each client keeps its own; in simulation the engine keeps them here, and
    :meth:`to_tensors` / :meth:`load_tensors` make them part of a checkpoint.
    """

    def __init__(self) -> None:
        self._states: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, client_id: str) -> Mapping[str, torch.Tensor]:
        return self._states.get(client_id, {})

    def put(self, client_id: str, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            self._states[client_id] = {k: v.detach() for k, v in state.items()}

    def __len__(self) -> int:
        return len(self._states)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``"<client>/<key>" -> tensor`` mapping (client ids must not contain '/')."""
        return {f"{cid}/{k}": v.contiguous() for cid, st in self._states.items() for k, v in st.items()}

    def load_tensors(self, data: Mapping[str, torch.Tensor]) -> None:
        self._states.clear()
        for name, t in data.items():
            cid, _, key = name.rpartition("/")
            self._states.setdefault(cid, {})[key] = t


class Engine(ABC):
    """Runs a cohort's local training and yields the updates one at a time."""

    name: str = "engine"
    partials: ClassVar[bool] = False
    """Whether :meth:`run_partials` sums the cohort where it is trained (the Ray engine's workers,
    the vectorized engine's chunk threads: :func:`~fedloom.engines._partials.sum_checked`)."""
    live: ClassVar[bool] = False
    """Whether the clients are real processes working in real time (the remote engine): buffered
    rounds then take updates as they come instead of running a simulated clock, and
    :meth:`run_cohort` takes a ``cancel`` event that ends its wait."""

    def __init__(self, *, spec: ParamSpec) -> None:
        self.spec = spec
        self.client_states = ClientStateStore()
        self.protocol_clients = ProtocolClients()
        """The client side of round protocols (secure aggregation) for in-process clients."""

    def exchange(self, requests: Sequence[ProtocolMessage]) -> Iterable[ProtocolMessage]:
        """Deliver one protocol message to each addressed client; yield the replies that come back.

        A round may take several exchanges with its cohort (secure aggregation's key setup,
        shares, unmasking); the client sides are state machines that refuse what is out of
        stage. Simulation engines answer from :attr:`protocol_clients`; the remote engine
        sends the messages over gRPC. A client that dropped or refused yields nothing.
        """
        return self.protocol_clients.exchange(requests)

    def seal(self, instructions: Sequence[ClientInstruction], updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
        """The updates after the input stage of their instructions' protocol (masking); dropped ones left out."""
        if all(ins.protocol is None for ins in instructions):
            return list(updates)
        out = []
        for ins, up in zip(instructions, updates, strict=True):
            sealed = up if ins.protocol is None else self.protocol_clients.seal(ins, up)
            if sealed is not None:
                out.append(sealed)
        return out

    @abstractmethod
    def available_clients(self) -> list[str]:
        """Ids of the clients that can take part now."""

    def clients_now(self) -> list[str]:
        """The clients that can take part right now, without waiting for more (default: :meth:`available_clients`).

        Buffered rounds top up with these while others are in flight: a deployment that lost a
        client keeps going with the rest instead of waiting for ``min_clients`` again.
        """
        return self.available_clients()

    @abstractmethod
    def run_cohort(
        self,
        global_vec: torch.Tensor,
        instructions: Sequence[ClientInstruction],
        *,
        broadcast: Payload | None = None,
    ) -> Iterator[ClientUpdate]:
        """Train every instructed client from ``global_vec``; yield each update when ready.

        ``broadcast`` is ``global_vec`` as a broadcast stage encoded it (pruned, quantized):
        an engine whose clients are remote sends it instead of the dense vector; simulation
        engines, whose clients read ``global_vec`` in memory, ignore it.
        """

    def run_partials(
        self,
        global_vec: torch.Tensor,
        instructions: Sequence[ClientInstruction],
        *,
        aggregator: Aggregator,
        pipe: Pipeline,
        ctx: StageContext,
        max_examples: int | None = None,
    ) -> Iterator[tuple[Partial, int]]:
        """Train the cohort and yield partial sums of its checked updates (``partials`` engines only).

        Each item is a :class:`~fedloom.core.types.Partial` of some clients' updates, each checked
        as the round loop would (:meth:`~fedloom.pipeline.Pipeline.check`) and added to a copy of
        the empty ``aggregator``, and the bytes those clients' updates took; refused updates are
        in :meth:`take_rejections`.
        """
        raise NotImplementedError(f"engine {self.name!r} does not sum partials")

    def finish_clients(
        self,
        instructions: Sequence[ClientInstruction],
        updates: Sequence[ClientUpdate],
        states: Sequence[Mapping[str, torch.Tensor]],
        deltas: torch.Tensor | None = None,
    ) -> list[ClientUpdate]:
        """Run the instructions' client stages on trained clients as one batch; keep their states.

        Then the protocol's input stage (:meth:`seal`): under secure aggregation the updates
        leave masked, and a client that drops out here yields none.
        """
        out, new_states = finish_clients(self.spec, instructions, updates, states, deltas)
        for ins, st in zip(instructions, new_states, strict=True):
            self.client_states.put(ins.client_id, st)
        return self.seal(instructions, out)

    @abstractmethod
    def evaluate_clients(
        self, global_vec: torch.Tensor, client_ids: Sequence[str], *, personal: PersonalEval | None = None
    ) -> Iterator[tuple[str, int, dict[str, float]]]:
        """Federated evaluation: (client id, test examples, metrics) on each client's own test split.

        With ``personal``, each client evaluates its own model instead: its personal layers
        and ``personal.steps`` fine-tuning steps (:func:`~fedloom.client.evaluate.evaluate_personal`).
        """

    def take_rejections(self) -> dict[str, str]:
        """Results refused before they became updates during the last cohort (client id -> reason).

        Remote engines refuse malformed or forged results at the door; the round loop records
        them with its own rejections. Simulation engines have none.
        """
        return {}

    def close(self) -> None:
        """Release resources (processes, sockets). The default has none."""
