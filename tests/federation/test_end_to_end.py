"""End to end: every example scenario runs two rounds; SCAFFOLD keeps client state; MNIST accuracy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedloom.core.config import load_config, parse_config
from fedloom.run import build_run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("scenario", ["hospital", "fraud", "equipment"])
def test_scenario_runs_two_rounds(scenario: str) -> None:
    cfg = load_config(EXAMPLES / f"{scenario}.toml", ["run.rounds=2", "run.federated_eval_every=2"])
    run = build_run(cfg)
    start = run.federation.state.params.clone()
    history = run.federation.run(2)
    assert [r.round for r in history] == [1, 2]
    assert all(sorted(r.clients) == sorted(run.dataset.clients) for r in history)  # fraction 1.0: all 3 sites
    assert len(run.dataset.clients) == 3
    last = history[-1].metrics
    headline = run.dataset.task.metrics[0]
    assert math.isfinite(last[f"test_{headline}"]) and math.isfinite(last[f"fed_{headline}"])
    assert not torch.equal(run.federation.state.params, start)
    n_train = sum(c.num_examples for c in run.dataset.clients.values())
    assert history[-1].num_examples == n_train
    assert history[-1].bytes_up == 3 * run.spec.numel * 4


def test_scaffold_client_state_persists_across_rounds() -> None:
    cfg = parse_config(
        {
            "run": {"rounds": 2, "seed": 1},
            "data": {"name": "equipment"},
            "model": {"name": "linear"},
            "strategy": {"name": "scaffold", "fraction": 1.0},
            "client": {"epochs": 1, "batch_size": 256, "lr": 0.05},
        }
    )
    run = build_run(cfg)
    run.federation.run(1)
    states1 = {cid: run.engine.client_states.get(cid)["control"].clone() for cid in run.dataset.clients}
    c1 = run.federation.state.tensors["control"].clone()
    # The server control is the mean of the clients' controls (all N clients took part).
    torch.testing.assert_close(c1, torch.stack(list(states1.values())).mean(0), rtol=1e-5, atol=1e-7)
    run.federation.run(2)
    for cid, before in states1.items():
        after = run.engine.client_states.get(cid)["control"]
        assert not torch.equal(after, before), f"{cid}'s control variate did not move in round 2"
    c2 = run.federation.state.tensors["control"]
    states2 = torch.stack([run.engine.client_states.get(cid)["control"] for cid in run.dataset.clients])
    torch.testing.assert_close(c2, states2.mean(0), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_mnist_2nn_reaches_95_percent_within_10_rounds() -> None:
    cfg = load_config(EXAMPLES / "mnist_2nn_iid.toml", ["run.rounds=10"])
    assert (cfg.strategy.fraction, cfg.client.epochs, cfg.client.batch_size) == (0.1, 1, 10)
    assert cfg.data.options()["partition"] == "iid"
    run = build_run(cfg)
    history = run.federation.run(10)
    best = max(r.metrics["test_accuracy"] for r in history)
    assert best >= 0.95, [round(r.metrics["test_accuracy"], 4) for r in history]
