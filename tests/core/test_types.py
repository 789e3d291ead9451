"""Round messages: TrainConfig validation and ClientUpdate validation."""

from __future__ import annotations

import pytest
import torch

from fedloom.core.errors import ConfigError, InvalidUpdateError
from fedloom.core.types import ClientInstruction, ClientUpdate, TrainConfig


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"epochs": 0}, "client.epochs"),
        ({"batch_size": -1}, "client.batch_size"),
        ({"lr": 0.0}, "client.lr"),
        ({"lr": float("nan")}, "client.lr"),
        ({"optimizer": "rmsprop"}, "client.optimizer"),
        ({"momentum": 1.0}, "client.momentum"),
        ({"nesterov": True}, "client.nesterov"),
        ({"loss": "hinge"}, "client.loss"),
        ({"max_steps": 0}, "client.max_steps"),
    ],
)
def test_train_config_errors_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig(**kwargs)
    assert info.value.key == key
    assert str(info.value).startswith(key)


def _update(delta: torch.Tensor, n: int = 5, **kw) -> ClientUpdate:
    return ClientUpdate(client_id="c1", round=1, delta=delta, num_examples=n, **kw)


def test_update_validation() -> None:
    _update(torch.zeros(4)).validate(numel=4, dtype=torch.float32)
    cases = [
        (_update(torch.zeros(3)), "shape"),
        (_update(torch.zeros(2, 2)), "shape"),
        (_update(torch.zeros(4, dtype=torch.float64)), "dtype"),
        (_update(torch.zeros(4, dtype=torch.int64)), "dtype"),
        (_update(torch.tensor([0.0, float("nan"), 0.0, 0.0])), "NaN"),
        (_update(torch.tensor([0.0, float("inf"), 0.0, 0.0])), "NaN or Inf"),
        (_update(torch.tensor([float("inf"), float("-inf"), 0.0, 0.0])), "NaN or Inf"),  # the sum is NaN
        (_update(torch.tensor([3e38, 3e38, float("nan"), 0.0])), "NaN or Inf"),  # the sum overflows, the NaN is found
        (_update(torch.zeros(4), n=0), "num_examples"),
        (_update(torch.zeros(4), n=10**9), "exceeds"),
        (_update(torch.zeros(4), extras={"c": torch.zeros(3)}), "extras"),
        (_update(torch.zeros(4), metrics={"loss": float("nan")}), "metric"),
    ]
    for upd, match in cases:
        with pytest.raises(InvalidUpdateError, match=match) as info:
            upd.validate(numel=4, dtype=torch.float32, max_examples=1000)
        assert info.value.client_id == "c1"


def test_finite_entries_whose_sum_overflows_are_accepted() -> None:
    """The finiteness check sums first; an overflowing sum of finite entries falls back to the exact test."""
    big = torch.tensor([3e38, 3e38, -1.0, 0.0])
    assert torch.isinf(big.sum())
    _update(big).validate(numel=4, dtype=torch.float32)
    _update(torch.zeros(4), extras={"c": big}).validate(numel=4, dtype=torch.float32)


def test_messages_are_frozen() -> None:
    ins = ClientInstruction(round=1, client_id="a", train=TrainConfig(), seed=3, payload={"x": torch.zeros(1)})
    with pytest.raises(AttributeError):
        ins.round = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        ins.payload["y"] = torch.zeros(1)  # type: ignore[index]
