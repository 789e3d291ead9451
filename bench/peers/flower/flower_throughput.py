"""Flower simulation throughput: FedAvg rounds of the McMahan 2NN/CNN on fedloom's MNIST.

Runs in the Flower venv (``bench/throughput.py --setup-peers``), started by the ``flower``
runner of ``bench/throughput.py``, which also writes the data directory (see
``bench/peers/peer_common.py``) and samples the memory of this process tree.

Flower API (flwr >= 1.21, Message API): a ``ClientApp`` (``@app.train``) and a
``ServerApp`` (``@app.main``) driving ``flwr.serverapp.strategy.FedAvg.start``, run by
``flwr.simulation.run_simulation`` on the Ray backend with ``--num-clients`` virtual
SuperNodes. Flower samples ``--cohort`` of them per round (FedAvg's own sampling; every
client holds 600 IID examples, so any cohort does the same work). No evaluation at all:
``fraction_evaluate=0`` and the ``evaluate_fn`` only takes timestamps.

Timing (``time.perf_counter``):

* ``imports_s``: script start -> flwr, ray and torch imported;
* ``setup_s``: imports done -> round 1 starts (``run_simulation``: Ray start-up, actor pool,
  SuperNodes, ServerApp start);
* per round: ``round_s`` (strategy round: configure, train messages out and back,
  aggregation; no server-side evaluation), ``train_s`` (``grid.send_and_receive`` of the
  TRAIN messages: dispatch -> every update back at the server; the counterpart of a fedloom
  engine's ``run_cohort``) and ``aggregate_s`` (``FedAvg.aggregate_train``).

Ray is started with ``address="local"`` (never attaches to another Ray instance on the
machine) and ``_temp_dir=--ray-temp-dir`` (default ``<data-dir>/ray``: a directory of this run only, so the runner can
find and end every process it left). Prints one ``SUMMARY_JSON {...}`` line.
"""

import time

T0 = time.perf_counter()  # before the heavy imports

import os  # noqa: E402

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)  # never attach to someone else's cluster

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # peer_common (Ray passes sys.path on)

import flwr  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

import peer_common as pc  # noqa: E402

T_IMPORTS = time.perf_counter()
TIMES: dict = {}

# Ray start-up and actor-pool construction, timed by wrapping the RayBackend methods (measurement only).
from flwr.server.superlink.fleet.vce.backend import raybackend as _rb  # noqa: E402

_orig_init_ray, _orig_build = _rb.RayBackend.init_ray, _rb.RayBackend.build


def _timed_init_ray(self, backend_config):
    t = time.perf_counter()
    _orig_init_ray(self, backend_config)
    TIMES["ray_init_s"] = round(time.perf_counter() - t, 3)


def _timed_build(self, app_fn):
    t = time.perf_counter()
    _orig_build(self, app_fn)
    TIMES["actor_pool_build_s"] = round(time.perf_counter() - t, 3)
    TIMES["num_actors"] = self.pool.num_actors if self.pool else None


_rb.RayBackend.init_ray, _rb.RayBackend.build = _timed_init_ray, _timed_build

# ----------------------------------------------------------------------------- ClientApp
client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    cid = int(context.node_config["partition-id"])
    pc.set_threads(int(cfg["threads"]))
    model = pc.scratch_model(str(cfg["model"]), str(cfg["models-src"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = pc.client_data(str(cfg["data-dir"]), cid)
    max_steps = int(cfg["max-steps"])
    seen, loss = pc.local_train(
        model, x, y,
        epochs=int(cfg["epochs"]), batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]),
        max_steps=max_steps if max_steps > 0 else None,
        seed=pc.round_seed(int(cfg["server-round"]), cid),
    )
    metrics = MetricRecord({
        "num-examples": len(y), "samples-trained": seen, "train-loss": loss,
        "torch-threads": torch.get_num_threads(), "pid": os.getpid(),
    })
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


# ----------------------------------------------------------------------------- ServerApp
ARGS = None
ROUNDS: list[dict] = []
STATE: dict = {"client_pids": set(), "client_threads": set()}
server_app = ServerApp()


class TimedFedAvg(FedAvg):
    def aggregate_train(self, server_round, replies):
        t = time.perf_counter()
        out = super().aggregate_train(server_round, replies)
        STATE["aggregate_s"] = time.perf_counter() - t
        return out


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    args = ARGS
    send_and_receive = grid.send_and_receive

    def timed_send_and_receive(messages, *a, **kw):
        messages = list(messages)
        t = time.perf_counter()
        replies = list(send_and_receive(messages, *a, **kw))
        dt = time.perf_counter() - t
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            samples, loss_sum = 0, 0.0
            for r in replies:
                if r.has_error():
                    raise RuntimeError(f"a ClientApp failed: {r.error}")
                m = r.content["metrics"]
                samples += int(m["samples-trained"])
                loss_sum += float(m["train-loss"]) * int(m["samples-trained"])
                STATE["client_pids"].add(int(m["pid"]))
                STATE["client_threads"].add(int(m["torch-threads"]))
            STATE["train"] = (dt, samples, len(replies), loss_sum / max(samples, 1))
        return replies

    grid.send_and_receive = timed_send_and_receive  # measurement only

    marks: dict = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord):  # timestamps only: no evaluation
        now = time.perf_counter()
        if server_round == 0:
            TIMES["setup_s"] = round(now - T_IMPORTS, 3)
        else:
            train_s, samples, clients, loss = STATE.pop("train")
            ROUNDS.append({
                "round": server_round, "round_s": now - marks["last"], "train_s": train_s,
                "aggregate_s": STATE.pop("aggregate_s", None), "samples": samples, "clients": clients,
                "train_loss": loss,
            })
            print(f"ROUND {server_round} round {now - marks['last']:.3f} s train {train_s:.3f} s "
                  f"samples {samples} clients {clients} train_loss {loss:.4f}", flush=True)
        marks["last"] = now
        return None

    random.seed(args.seed)  # FedAvg's node sampling uses the random module
    strategy = TimedFedAvg(
        fraction_train=args.cohort / args.num_clients,
        fraction_evaluate=0.0,
        min_train_nodes=args.cohort,
        min_evaluate_nodes=0,
        min_available_nodes=args.num_clients,
    )
    init = pc.build_model(args.model, args.models_src)
    init.load_state_dict(pc.init_state(args.data_dir, args.model))
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(init.state_dict()),
        num_rounds=args.rounds,
        train_config=ConfigRecord({
            "model": args.model, "models-src": args.models_src, "data-dir": args.data_dir,
            "epochs": args.epochs, "batch-size": args.batch_size, "lr": args.lr,
            "max-steps": args.max_steps or 0, "threads": args.threads,
        }),
        evaluate_fn=evaluate_fn,
    )
    marks["done"] = time.perf_counter()
    TIMES["_last_round_end"] = marks["done"]


def main() -> None:
    global ARGS
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
    p.add_argument("--client-cpus", type=float, default=1.0, help="Ray num_cpus per ClientApp actor")
    p.add_argument("--threads", type=int, default=0, help="torch threads per actor (0: Ray's = client-cpus)")
    p.add_argument("--ray-temp-dir", default=None, help="Ray's temp dir (default: <data-dir>/ray)")
    p.add_argument("--seed", type=int, default=0)
    ARGS = args = p.parse_args()
    args.num_clients = pc.num_clients(args.data_dir)
    args.ray_temp_dir = os.path.abspath(args.ray_temp_dir or os.path.join(args.data_dir, "ray"))
    backend_config = {
        "client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0},
        "init_args": {"address": "local", "_temp_dir": args.ray_temp_dir, "include_dashboard": False},
    }
    print(f"[flower] flwr {flwr.__version__} ray {ray.__version__} torch {torch.__version__} model={args.model} "
          f"cohort={args.cohort}/{args.num_clients} rounds={args.rounds} client_cpus={args.client_cpus} "
          f"imports={T_IMPORTS - T0:.2f}s", flush=True)
    t_sim = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.num_clients,
                   backend_config=backend_config)
    t_done = time.perf_counter()
    if ray.is_initialized():  # Flower's backend shuts Ray down itself; safety net
        ray.shutdown()
    last = TIMES.pop("_last_round_end", None)
    summary = {
        "rounds": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in ROUNDS],
        "imports_s": round(T_IMPORTS - T0, 3),
        "run_simulation_s": round(t_done - t_sim, 3),
        "teardown_s": round(t_done - last, 3) if last else None,
        **TIMES,
        "client_cpus": args.client_cpus,
        "client_processes": len(STATE["client_pids"]),
        "threads": (sorted(STATE["client_threads"]) if len(STATE["client_threads"]) != 1
                    else next(iter(STATE["client_threads"]))),  # torch threads per ClientApp actor
        "versions": {"flwr": flwr.__version__, "ray": ray.__version__, **pc.versions()},
    }
    print("SUMMARY_JSON " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
