"""Models: McMahan et al. 2017 parameter counts, output shapes, the registry and its errors."""

from __future__ import annotations

import pytest
import torch

from fedloom.core.errors import ConfigError
from fedloom.core.metrics import compute_metrics
from fedloom.core.params import ParamSpec
from fedloom.data.base import TaskSpec
from fedloom.models import MLP, Linear, McMahan2NN, McMahanCNN, build_model, list_models

MNIST = TaskSpec(kind="classification", input_shape=(784,), num_outputs=10, loss="cross_entropy", metrics=("accuracy",))
BINARY = TaskSpec(kind="binary", input_shape=(17,), num_outputs=1, loss="bce", metrics=("auprc",))
REGRESSION = TaskSpec(kind="regression", input_shape=(21,), num_outputs=1, loss="mse", metrics=("mae",))


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_mcmahan_parameter_counts() -> None:
    assert count(McMahanCNN()) == 1_663_370
    assert count(McMahan2NN()) == 199_210
    assert count(build_model("cnn", MNIST)) == 1_663_370
    assert count(build_model("mcmahan_2nn", MNIST)) == 199_210


def test_mnist_output_shapes() -> None:
    x = torch.rand(4, 784)
    cnn = McMahanCNN()
    assert cnn(x).shape == (4, 10)
    assert torch.allclose(cnn(x), cnn(x.reshape(4, 1, 28, 28)))
    assert McMahan2NN()(x).shape == (4, 10)


def test_tabular_models() -> None:
    mlp = MLP(17, (64, 32), 1)
    assert count(mlp) == 17 * 64 + 64 + 64 * 32 + 32 + 32 + 1
    assert mlp(torch.randn(5, 17)).shape == (5, 1)
    assert Linear(17)(torch.randn(5, 17)).shape == (5, 1)
    bn = MLP(17, (8,), 1, dropout=0.2, batchnorm=True)
    assert bn(torch.randn(5, 17)).shape == (5, 1)
    spec = ParamSpec.from_module(bn)  # BatchNorm buffers travel in the flat vector
    assert any(not e.trainable for e in spec.entries)
    with pytest.raises(ConfigError, match="model.dropout"):
        MLP(3, (4,), 1, dropout=1.0)
    with pytest.raises(ConfigError, match="model.hidden"):
        MLP(3, (0,), 1)


@pytest.mark.parametrize("name", ["mlp", "linear", "2nn"])
def test_binary_and_regression_models_output_a_column(name: str) -> None:
    for task in (BINARY, REGRESSION):
        model = build_model(name, task)
        out = model(torch.randn(6, *task.input_shape))
        assert out.shape == (6, 1)
        targets = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
        metrics = compute_metrics(task.kind, out.detach(), targets, task.metrics)
        assert set(metrics) == set(task.metrics)


def test_build_model_options_and_seed() -> None:
    m = build_model("mlp", BINARY, hidden=[16], dropout=0.1)
    assert isinstance(m, MLP) and count(m) == 17 * 16 + 16 + 16 + 1
    state = torch.random.get_rng_state()
    a, b = build_model("cnn", MNIST, seed=3), build_model("cnn", MNIST, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG is untouched"
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = build_model("cnn", MNIST, seed=4)
    assert not torch.equal(a.fc2.weight, c.fc2.weight)


def test_build_model_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet'.*cnn.*mlp") as exc:
        build_model("resnet", MNIST)
    assert exc.value.key == "model.name"
    with pytest.raises(ConfigError, match="unknown option 'width' for model 'mlp'") as exc:
        build_model("mlp", BINARY, width=3)
    assert exc.value.key == "model.width"
    with pytest.raises(ConfigError, match="unknown option 'hidden' for model 'linear'"):
        build_model("linear", BINARY, hidden=(3,))
    with pytest.raises(ConfigError, match="784"):
        build_model("cnn", BINARY)


def test_list_models() -> None:
    assert list_models() == sorted(["2nn", "cnn", "linear", "mcmahan_2nn", "mcmahan_cnn", "mlp"])
