"""pfl-research throughput: FedAvg rounds of the McMahan 2NN/CNN on fedloom's MNIST.

Runs in the pfl venv (``bench/throughput.py --setup-peers``), started by the
``pfl-research`` runner of ``bench/throughput.py``, which writes the data directory (see
``bench/peers/peer_common.py``) and samples this process's memory.

pfl (Apple's pfl-research) as its documentation sets up a PyTorch simulation: a
``PyTorchModel`` (the torch module with ``loss`` / ``metrics``, ``torch.optim.SGD`` as the
local optimizer, SGD with lr 1 as the central one), a ``FederatedDataset`` of the 100
clients with pfl's ``minimize_reuse`` user sampler, ``SimulatedBackend`` and
``FederatedAveraging`` with ``NNAlgorithmParams(train_cohort_size=--cohort)``. One process,
users one after another (pfl parallelizes only across Horovod / torch.distributed workers).

pfl iterates a user's data in order; ``make_dataset_fn`` hands it the user's examples in the
order of fedloom's ``batch_order`` for that round, so the batches are the same kind of work.
Nothing is evaluated: ``val_cohort_size=0`` and ``do_evaluation`` off in every round (pfl
would evaluate each user before and after training in round 0).

Timing (``time.perf_counter``): ``imports_s``, ``setup_s`` (imports done -> round 1 starts:
data, model, backend), and per round ``round_s`` (callback to callback: the cohort's
training, pfl's incremental sum of the updates, the central model update) and ``train_s``
(``SimulatedBackend.async_gather_results``: training + summing the updates). Prints one
``SUMMARY_JSON {...}`` line.
"""

import time

T0 = time.perf_counter()  # before the heavy imports

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # peer_common

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import pfl  # noqa: E402
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.data.dataset import Dataset  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.data.sampling import get_user_sampler  # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.metrics import Metrics, Weighted  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402

import peer_common as pc  # noqa: E402

T_IMPORTS = time.perf_counter()
STATE: dict = {"samples": 0, "loss_sum": 0.0}


class PflNet(nn.Module):
    """fedloom's model with the ``loss`` and ``metrics`` methods pfl's PyTorchModel calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:  # noqa: A002
        self.eval() if eval else self.train()
        loss = F.cross_entropy(self.net(x), y)
        STATE["samples"] += len(y)  # called once per local training step
        STATE["loss_sum"] += loss.detach() * len(y)
        return loss

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> dict:  # noqa: A002
        self.eval() if eval else self.train()
        loss = F.cross_entropy(self.net(x), y, reduction="sum").item()
        return {"loss": Weighted(loss, len(y))}


class NoEvalFedAvg(FederatedAveraging):
    """pfl's FederatedAveraging with per-user evaluation off (pfl turns it on in round 0)."""

    def get_next_central_contexts(self, *a, **kw):
        contexts, model, metrics = super().get_next_central_contexts(*a, **kw)
        if contexts is not None:
            contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
        return contexts, model, metrics


class TimedBackend(SimulatedBackend):
    async def async_gather_results(self, *a, **kw):
        t = time.perf_counter()
        STATE["samples"], STATE["loss_sum"] = 0, 0.0
        out = await super().async_gather_results(*a, **kw)
        STATE["train"] = (time.perf_counter() - t, STATE["samples"], float(STATE["loss_sum"]) / max(STATE["samples"], 1))
        return out


class RoundTimer(TrainingProcessCallback):
    def __init__(self) -> None:
        self.rounds: list[dict] = []
        self.last = 0.0
        self.setup_s = 0.0

    def on_train_begin(self, *, model) -> Metrics:
        self.last = time.perf_counter()
        self.setup_s = self.last - T_IMPORTS
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        now = time.perf_counter()
        train_s, samples, loss = STATE.pop("train")
        self.rounds.append({"round": central_iteration + 1, "round_s": round(now - self.last, 4),
                            "train_s": round(train_s, 4), "samples": samples, "train_loss": round(loss, 4)})
        print(f"ROUND {central_iteration + 1} round {now - self.last:.3f} s train {train_s:.3f} s "
              f"samples {samples} train_loss {loss:.4f}", flush=True)
        self.last = now
        return False, Metrics()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["2nn", "cnn"], required=True)
    p.add_argument("--cohort", type=int, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--max-steps", type=int, default=0, help="0: a full epoch")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--models-src", required=True, help="fedloom's src/fedloom/models/mnist.py")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    pc.set_threads(args.threads)
    n_clients = pc.num_clients(args.data_dir)
    max_steps = args.max_steps or None

    data = [pc.client_data(args.data_dir, c) for c in range(n_clients)]  # in memory, as fedloom's
    calls = [0] * n_clients

    def make_dataset_fn(uid: int) -> Dataset:
        calls[uid] += 1  # the user's round number
        x, y = data[uid]
        order = pc.batch_order(len(y), args.epochs, args.batch_size, None, pc.round_seed(calls[uid], uid))
        perm = torch.cat(order[: len(order) // args.epochs])  # one epoch's order (pfl repeats it)
        return Dataset(raw_data=[x[perm], y[perm]], user_id=uid)

    train_data = FederatedDataset(make_dataset_fn, get_user_sampler("minimize_reuse", list(range(n_clients))))
    net = pc.build_model(args.model, args.models_src)
    net.load_state_dict(pc.init_state(args.data_dir, args.model))
    module = PflNet(net)
    model = PyTorchModel(
        model=module,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
    )
    backend = TimedBackend(training_data=train_data, val_data=train_data, postprocessors=[])
    timer = RoundTimer()
    NoEvalFedAvg().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=args.rounds,
            evaluation_frequency=10**9,
            train_cohort_size=args.cohort,
            val_cohort_size=0,
        ),
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_learning_rate=args.lr,
            local_num_epochs=None if max_steps else args.epochs,  # pfl takes one or the other
            local_batch_size=args.batch_size,
            local_num_steps=max_steps,
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=1000),
        callbacks=[timer],
    )
    import numpy as np

    summary = {
        "rounds": timer.rounds,
        "imports_s": round(T_IMPORTS - T0, 3),
        "setup_s": round(timer.setup_s, 3),
        "threads": torch.get_num_threads(),
        "versions": {"pfl": getattr(pfl, "__version__", None) or _dist_version("pfl"), **pc.versions(),
                     "numpy": np.__version__},
    }
    print("SUMMARY_JSON " + json.dumps(summary), flush=True)


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
