"""Checkpointable state: stop after k rounds, save, reload, continue == an uninterrupted run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedloom.compress import TopK
from fedloom.core.config import parse_config
from fedloom.core.params import ParamSpec
from fedloom.federation import Federation
from fedloom.pipeline import Pipeline, Stage, StageState
from fedloom.store import Store
from fedloom.run import build_run
from fedloom.strategies.base import ServerState


def _cfg(strategy: dict) -> dict:
    return {
        "run": {"rounds": 4, "seed": 7},
        "data": {"name": "equipment"},
        "model": {"name": "linear"},
        "strategy": {"fraction": 0.67, **strategy},
        "client": {"epochs": 1, "batch_size": 128, "lr": 0.05, "max_steps": 20},
    }


@pytest.mark.parametrize("strategy", [{"name": "fedadam"}, {"name": "scaffold"}, {"name": "fedavgm"}])
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path: Path, strategy: dict) -> None:
    full = build_run(parse_config(_cfg(strategy)))
    full.federation.run(4)

    first = build_run(parse_config(_cfg(strategy)))
    first.federation.run(2)
    save_file(first.federation.state.to_tensors(), str(tmp_path / "server.safetensors"))
    clients = first.engine.client_states.to_tensors()
    if clients:
        save_file(clients, str(tmp_path / "clients.safetensors"))

    second = build_run(parse_config(_cfg(strategy)))
    second.federation.state = ServerState.from_tensors(load_file(str(tmp_path / "server.safetensors")))
    if clients:
        second.engine.client_states.load_tensors(load_file(str(tmp_path / "clients.safetensors")))
    assert second.federation.state.round == 2
    second.federation.run(4)
    assert [r.round for r in second.federation.history] == [3, 4]
    assert [r.clients for r in second.federation.history] == [r.clients for r in full.federation.history[2:]]
    assert torch.equal(second.federation.state.params, full.federation.state.params)
    for k, v in full.federation.state.tensors.items():
        assert torch.equal(second.federation.state.tensors[k], v), k


@dataclass(frozen=True)
class _RoundCounter(Stage):
    """A server-only stage whose state is not a tensor: it counts the rounds it finalized."""

    name: ClassVar[str] = "round_counter"
    runs_on_client: ClassVar[bool] = False

    def init_state(self, spec: ParamSpec) -> StageState:
        return StageState(meta={"rounds": [], "note": "x"})

    def finalize(self, aggregate, ctx, state):  # type: ignore[no-untyped-def]
        return aggregate, StageState(meta={**state.meta, "rounds": [*state.meta["rounds"], ctx.round]}), {}


def _stage_federation(store: Store | None = None, fresh: bool = False) -> Federation:
    run = build_run(parse_config(_cfg({"name": "fedavg"})))
    pipe = Pipeline((TopK(fraction=0.1), _RoundCounter()))
    handle = store.start_or_resume_run("ef", {"test": "error feedback"}, fresh=fresh) if store is not None else None
    return Federation(
        strategy=run.strategy, engine=run.engine, spec=run.spec, initial=run.federation.state.params,
        evaluate=run.federation.evaluate, pipeline=pipe, store=store, run_handle=handle,
    )  # fmt: skip


def test_error_feedback_residual_and_stage_meta_survive_a_checkpoint(tmp_path: Path) -> None:
    full = _stage_federation()
    full.run(4)
    first = _stage_federation(Store.open(tmp_path / "runs.db"), fresh=True)
    first.run(2)
    residuals = {c: first.engine.client_states.get(c)["topk.residual"] for c in first.engine.available_clients()}
    assert all(float(r.abs().sum()) > 0 for r in residuals.values())  # there is a residual to carry

    second = _stage_federation(Store.open(tmp_path / "runs.db"))
    assert second.resumed_from == 2
    for c, r in residuals.items():  # restored from the checkpoint, not recomputed
        assert torch.equal(second.engine.client_states.get(c)["topk.residual"], r)
    assert second.state.meta["stage.2.round_counter"] == {"rounds": [1, 2], "note": "x"}
    second.run(4)
    assert torch.equal(second.state.params, full.state.params)
    assert second.state.meta == full.state.meta and full.state.meta["stage.2.round_counter"]["rounds"] == [1, 2, 3, 4]
    for c in full.engine.available_clients():
        assert torch.equal(second.engine.client_states.get(c)["topk.residual"], full.engine.client_states.get(c)["topk.residual"])
