"""Structured pruning: the smaller dense model computes what the masked model computes; units chosen by norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedloom.core.errors import ConfigError
from fedloom.cutting.structured import cut, links_of
from fedloom.models.mnist import McMahan2NN, McMahanCNN
from fedloom.models.tabular import MLP, Linear


def _trained_like(model: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial statistics so the check means something."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: McMahanCNN(), (6, 1, 28, 28)),
        (lambda: McMahan2NN(), (6, 784)),
        (lambda: MLP(21, hidden=(64, 32)), (6, 21)),
        (lambda: MLP(21, hidden=(16, 8), batchnorm=True, dropout=0.2), (6, 21)),
    ],
)
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.75])
def test_smaller_model_equals_masked_model(make, shape, fraction: float) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = _trained_like(make())
    masked, small, rep = cut(model, fraction)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    for name, (kept, total) in rep.kept.items():
        assert kept == total - int(fraction * total)
    if fraction:
        assert rep.params_after < rep.params_before
        assert sum(p.numel() for p in small.parameters()) == rep.params_after
    else:
        torch.testing.assert_close(small(x), model(x))


def test_units_are_chosen_by_norm_and_dead_units_go_first() -> None:
    model = McMahan2NN(hidden=4).eval()
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([[3.0] * 784, [1.0] * 784, [0.0] * 784, [2.0] * 784]))
        model.fc1.bias.zero_()
        model.fc2.weight.copy_(torch.eye(4) * torch.tensor([1.0, 0.0, 5.0, 2.0]).unsqueeze(1))  # unit 1 of fc2 is dead
        model.fc2.bias.zero_()
    _, small, rep = cut(model, 0.25)
    # fc1: floor(0.25·4) = 1 unit goes: the all-zero one (index 2); fc2: its dead unit (index 1)
    assert rep.kept == {"fc1": (3, 4), "fc2": (3, 4)}
    assert torch.equal(small.fc1.weight[:, 0], torch.tensor([3.0, 1.0, 2.0]))
    assert small.fc2.weight.shape == (3, 3) and small.fc3.weight.shape == (10, 3)


def test_an_unknown_architecture_or_fraction_is_refused() -> None:
    with pytest.raises(ConfigError, match="Linear"):
        links_of(Linear(3))
    with pytest.raises(ConfigError, match="prune"):
        cut(McMahan2NN(), 1.0)
    assert [ln.block for ln in links_of(McMahanCNN())] == [1, 49, 1]


@pytest.mark.parametrize(
    ("make", "shape"),
    [(lambda: McMahanCNN(), (4, 1, 28, 28)), (lambda: McMahan2NN(), (4, 784)), (lambda: MLP(21, hidden=(16, 8), batchnorm=True), (4, 21))],
)
def test_removing_only_free_units_leaves_the_function_unchanged(make, shape) -> None:  # type: ignore[no-untyped-def]
    """Dead units (zero incoming weights, nonzero biases: magnitude pruning's leftovers) are folded away exactly."""
    torch.manual_seed(0)
    model = _trained_like(make())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.bias.uniform_(-0.5, 0.5)  # some constants are ReLU(b) > 0
                m.weight[: m.weight.shape[0] // 3] = 0.0  # a third of every layer's units dead
    masked, small, rep = cut(model, 0.0)
    assert rep.params_after < rep.params_before
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked(x), model(x), rtol=1e-5, atol=1e-5)
