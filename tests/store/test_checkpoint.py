"""The checkpoint file format on its own: bytes in, the same state out."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedloom.core.params import ParamSpec
from fedloom.store.checkpoint import UnusableCheckpoint, decode_checkpoint, encode_checkpoint
from fedloom.strategies.base import ServerState

SPEC = ParamSpec.from_state_dict({"w": torch.zeros(2, 3), "b": torch.zeros(3)})


def _state(**meta: object) -> ServerState:
    params = torch.arange(9, dtype=torch.float32)
    return ServerState(params=params, round=5, tensors={"m": params * 2}, meta=meta)


def test_round_trip_with_meta_and_client_states() -> None:
    state = _state(a=[1, 2], b="x")
    clients = {"c0/control": torch.ones(9)}
    data = encode_checkpoint(state, clients, SPEC, run="r", config_hash="h")
    ckpt, spec = decode_checkpoint(data, config_hash="h")
    assert spec == SPEC and ckpt.state.round == 5 and dict(ckpt.state.meta) == {"a": [1, 2], "b": "x"}
    assert torch.equal(ckpt.state.params, state.params) and torch.equal(ckpt.state.tensors["m"], state.tensors["m"])
    assert ckpt.client_states.keys() == clients.keys() and torch.equal(ckpt.client_states["c0/control"], torch.ones(9))


def test_a_checkpoint_written_without_meta_loads_with_empty_meta() -> None:
    data = encode_checkpoint(_state(), {}, SPEC, run="r", config_hash="h")
    n = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + n])["__metadata__"]
    del metadata["server_meta"]  # the layout before ServerState.meta was persisted
    old = save_safetensors(load_safetensors(data), metadata=metadata)
    ckpt, _ = decode_checkpoint(old, config_hash="h")
    assert dict(ckpt.state.meta) == {} and ckpt.state.round == 5


def test_foreign_or_malformed_bytes_are_unusable() -> None:
    data = encode_checkpoint(_state(), {}, SPEC, run="r", config_hash="h")
    with pytest.raises(UnusableCheckpoint, match="different config"):
        decode_checkpoint(data, config_hash="other")
    with pytest.raises(UnusableCheckpoint, match="malformed"):
        decode_checkpoint(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!", config_hash="h")
    n = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + n])["__metadata__"]
    metadata["server_meta"] = "[1, 2]"  # not an object
    bad = save_safetensors(load_safetensors(data), metadata=metadata)
    with pytest.raises(UnusableCheckpoint, match="meta must be a JSON object"):
        decode_checkpoint(bad, config_hash="h")
