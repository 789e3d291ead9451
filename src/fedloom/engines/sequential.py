"""The sequential engine: clients one after another, in process — the reference semantics.

Same seed, same config → bit-identical updates (on the same machine and torch build).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from fedloom.client.evaluate import evaluate_personal, evaluate_vector
from fedloom.client.training import personal_instruction, train_local
from fedloom.core.errors import EngineError
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, ClientUpdate, Payload, PersonalEval
from fedloom.data.base import FederatedDataset
from fedloom.engines.base import Engine, ModelFn

__all__ = ["SequentialEngine"]


class SequentialEngine(Engine):
    """Trains each client of a cohort in turn on one scratch model."""

    name = "sequential"

    def __init__(self, *, model_fn: ModelFn, dataset: FederatedDataset, spec: ParamSpec, device: str = "cpu") -> None:
        super().__init__(spec=spec)
        self.dataset = dataset
        self.device = torch.device(device)
        self.model = model_fn().to(self.device)

    def available_clients(self) -> list[str]:
        return self.dataset.client_ids

    def _client(self, cid: str):
        try:
            return self.dataset.clients[cid]
        except KeyError:
            raise EngineError(f"unknown client {cid!r}") from None

    def run_cohort(
        self,
        global_vec: torch.Tensor,
        instructions: Sequence[ClientInstruction],
        *,
        broadcast: Payload | None = None,
    ) -> Iterator[ClientUpdate]:
        # ``broadcast`` (an encoded global model for remote clients) is ignored: clients here read global_vec.
        g = global_vec.to(self.device)
        for ins in instructions:
            data = self._client(ins.client_id).train
            result = train_local(
                self.model, self.spec, g, data, ins, client_state=self.client_states.get(ins.client_id)
            )
            state = result.state
            personal = personal_instruction(ins)
            if personal is not None:  # Ditto: the personal run, only its client state kept
                state = train_local(self.model, self.spec, g, data, personal, client_state=state).state
            yield from self.finish_clients([ins], [result.update], [state])

    def evaluate_clients(
        self, global_vec: torch.Tensor, client_ids: Sequence[str], *, personal: PersonalEval | None = None
    ) -> Iterator[tuple[str, int, dict[str, float]]]:
        g = global_vec.to(self.device)
        task = self.dataset.task
        for cid in client_ids:
            data = self._client(cid)
            test = data.test
            if test is None or len(test) == 0:
                continue
            if personal is None:
                yield cid, len(test), evaluate_vector(self.model, self.spec, g, test, task)
            else:
                state = self.client_states.get(cid)
                yield cid, len(test), evaluate_personal(self.model, self.spec, g, data.train, test, task, personal, cid, state)
