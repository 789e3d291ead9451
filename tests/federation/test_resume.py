"""Checkpointable state: stop after k rounds, save, reload, continue == an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedloom.core.config import parse_config
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
