"""Run configuration: TOML files validated with pydantic into frozen, typed sections.

A config has five tables (plus the optional update pipeline — ``[[pipeline]]`` entries, the
client stages in order, and a ``[broadcast]`` table, the stage encoding the model sent down
— and ``[deploy]`` for ``fedloom server``): ``[run]`` (seed, rounds, engine, evaluation cadence, and the
optional run store with its checkpoint cadence),
``[data]`` (dataset name and its options), ``[model]`` (model name and options),
``[strategy]`` (name, selection, and the strategy's own hyperparameters) and ``[client]``
(local training), and the optional ``[privacy]`` table (differential privacy: mode, noise or
target ε, clip norm, δ, accountant, budget). Unknown keys in ``[run]`` and ``[client]`` are errors; extra keys in
``[data]``, ``[model]`` and ``[strategy]`` are passed to the named component, which rejects
the ones it does not know. Every error is one :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedloom.core.errors import ConfigError
from fedloom.core.types import TrainConfig

__all__ = [
    "AttackSection",
    "BufferSection",
    "ClientSection",
    "DataSection",
    "DeploySection",
    "HierarchySection",
    "LatencySection",
    "ModelSection",
    "PersonalizationSection",
    "PrivacySection",
    "PruningSection",
    "RunConfig",
    "RunSection",
    "StageSection",
    "TrackingSection",
    "StrategySection",
    "apply_overrides",
    "load_config",
    "parse_config",
]

EngineName = Literal["auto", "sequential", "vectorized", "ray", "remote"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    def options(self) -> dict[str, Any]:
        """The extra keys, passed to the named component."""
        return dict(self.model_extra or {})


class RunSection(_Strict):
    name: str = "run"
    seed: int = Field(0, ge=0)
    rounds: int = Field(10, ge=1)
    engine: EngineName = "auto"
    device: str = "cpu"
    eval_every: int = Field(1, ge=1)
    federated_eval_every: int = Field(0, ge=0)
    min_updates: int = Field(1, ge=1)
    chunk_size: int | None = Field(None, ge=1)  # vectorized engine: clients per lockstep chunk (None: automatic)
    # vectorized engine: the lockstep steps' arithmetic. fp32: IEEE float32; tf32: TF32 tensor-core products on CUDA
    # (float32 on CPU); bf16: forward pass under bfloat16 autocast, float32 master weights, gradients and updates
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    cuda_graphs: bool = False  # vectorized engine on CUDA: replay full lockstep steps from one CUDA-graph capture
    # vectorized engine: chunks trained at once, one worker thread each with single-threaded kernels (same updates
    # for any value); None: torch's intra-op thread count
    threads: int | None = Field(None, ge=1)
    ray_address: str | None = None  # ray engine: cluster to join ("auto", "HOST:6379", "ray://HOST:10001"); None: local
    ray_workers: int | None = Field(None, ge=1)  # ray engine: number of workers (None: one per CPU of the cluster)
    store: str | None = None
    checkpoint_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(3, ge=1)


class DataSection(_Open):
    name: str


class ModelSection(_Open):
    name: str


class StrategySection(_Open):
    name: str = "fedavg"
    fraction: float = Field(0.1, gt=0.0, le=1.0)
    min_clients: int = Field(1, ge=1)
    sampling: Literal["fixed", "poisson"] = "fixed"  # poisson: each client joins with probability `fraction`


class PrivacySection(_Strict):
    """``[privacy]``: differential privacy of the run (see the README's privacy section).

    ``mode``: ``central`` (user-level DP-FedAvg: clients clip, the server adds noise),
    ``local`` (each client clips and noises its own update), ``sample`` (DP-SGD inside
    local training, per record) or ``distributed`` (with ``[secure]``: each client adds its
    share of Skellam noise to its masked or encrypted update). Exactly one of ``noise_multiplier`` (σ: noise std / clip
    norm) and ``target_epsilon`` (σ is then computed for ``run.rounds`` rounds). ``noise``:
    ``auto`` draws seeded (reproducible) noise in simulation and OS-entropy noise in a
    deployment.
    """

    mode: Literal["central", "local", "sample", "distributed"]
    noise_multiplier: float | None = Field(None, gt=0.0)
    target_epsilon: float | None = Field(None, gt=0.0)
    clip_norm: float = Field(1.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    accountant: Literal["rdp", "pld"] = "rdp"
    max_epsilon: float | None = Field(None, gt=0.0)  # stop before a round that would exceed it
    adaptive_clipping: bool = False  # central: Andrew et al. 2021 quantile clipping
    target_quantile: float = Field(0.5, gt=0.0, lt=1.0)
    clip_lr: float = Field(0.2, gt=0.0)
    count_stddev: float | None = Field(None, gt=0.0)  # adaptive: noise std of the clipped count (default: max(expected clients / 20, σ))
    noise: Literal["auto", "seeded", "os"] = "auto"


class PruningSection(_Strict):
    """``[pruning]``: gradual magnitude pruning of the global model (Zhu & Gupta 2017).

    The sparsity of the prunable weights rises from 0 after round ``start`` to ``sparsity``
    at round ``end`` (cubic schedule, the mask updated every ``every`` rounds), over all
    prunable tensors together (``scope = "global"``) or each separately (``"layer"``).
    ``send_sparse``: send only the nonzero entries up and down (the ``sparse`` codec) when
    no other codec is configured.
    """

    sparsity: float = Field(ge=0.0, lt=1.0)
    start: int = Field(1, ge=1)
    end: int = Field(1, ge=1)
    every: int = Field(1, ge=1)
    scope: Literal["global", "layer"] = "global"
    include_bias: bool = False
    send_sparse: bool = True


class TrackingSection(_Strict):
    """``[tracking]``: experiment-tracking loggers (the ``tracking`` extra); none by default.

    ``tensorboard``: a directory; event files go to ``<dir>/<run name>``. ``mlflow_uri``: an
    MLflow tracking URI (``http://HOST:5000``, ``sqlite:///mlflow.db``); one MLflow run per
    fedloom run in experiment ``mlflow_experiment``.
    """

    tensorboard: str | None = None
    mlflow_uri: str | None = None
    mlflow_experiment: str = "fedloom"


class SecureSection(_Strict):
    """``[secure]``: secure aggregation (SecAgg, or SecAgg+ on a sparse graph); the server learns only the sum.

    ``threshold``: shares needed to recover a client's secrets (an int, or a fraction f of
    its neighbours: ⌊f·d⌋ + 1). ``neighbours``: SecAgg+'s even degree k (default
    2⌈1.5·log2 n⌉). ``bits``/``modulus_bits``/``clip``: each entry of the (weighted) delta is
    divided by ``weight_scale`` (set it near the largest client weight, e.g. the largest
    site's example count under FedAvg, so that ``clip`` is in the delta's own units), clipped
    to [−clip, clip] and stochastically rounded to 2^bits levels in Z_{2^modulus_bits}.
    ``dropout``: simulation only, the probability that a client drops before each stage
    (``advertise``, ``share``, ``input``, ``unmask``; under CKKS ``keys``, ``input``, ``decrypt``).

    ``protocol = "ckks"``: homomorphic encryption (TenSEAL, the ``he`` extra) instead of
    masking: the same clipped, quantized levels are encrypted under a key pair that one
    cohort client (the round's key holder) makes; the server adds the ciphertexts and the
    key holder decrypts only the sum. ``poly_modulus_degree``: 8192 (4096 slots per
    ciphertext) or 16384. ``threshold``, ``neighbours`` and ``modulus_bits`` are SecAgg's.
    """

    protocol: Literal["secagg", "secagg+", "ckks"] = "secagg"
    poly_modulus_degree: int | None = None
    threshold: float | int = 0.5
    neighbours: int | None = None
    bits: int = Field(16, ge=1, le=31)
    modulus_bits: int = Field(32, ge=8, le=32)
    clip: float = Field(1.0, gt=0.0)
    weight_scale: float = Field(1.0, gt=0.0)
    dropout: dict[str, float] = {}


class AttackSection(_Open):
    """``[attack]``: a robustness experiment (simulation only): an attack and who carries it out.

    ``name``: ``sign_flip``, ``scale``, ``gaussian``, ``inflate``, ``label_flip``, ``alie`` or
    ``ipm`` (:mod:`fedloom.attacks`); the attackers are ``clients`` (ids) or a share
    ``fraction`` of the population drawn with the run seed. ``knowledge`` (``alie``, ``ipm``):
    ``omniscient`` attackers know the round's benign mean and spread, ``own`` ones estimate
    them from their own updates. Other keys are the attack's options (``factor``, ``sigma``,
    ``z``, ``epsilon``, ``delta_scale``).
    """

    name: str
    fraction: float | None = Field(None, ge=0.0, le=1.0)
    clients: tuple[str, ...] = ()
    knowledge: Literal["omniscient", "own"] = "omniscient"


class BufferSection(_Strict):
    """``[buffer]``: buffered asynchronous rounds (FedBuff, :mod:`fedloom.federation.buffered`).

    ``size`` (K): valid updates per server apply; ``concurrency``: clients kept training at
    once (default 3·K); ``staleness``: the weight s(τ) of an update τ versions old —
    ``polynomial`` (1+τ)^(−``exponent``), ``hinge`` (1 up to ``hinge``, then
    1/(``exponent``·(τ−``hinge``)+1)) or ``constant``; ``max_staleness``: older updates are refused.
    ``run.rounds`` then counts server applies.
    """

    size: int = Field(ge=1)
    concurrency: int | None = Field(None, ge=1)
    staleness: Literal["polynomial", "hinge", "constant"] = "polynomial"
    exponent: float = Field(0.5, ge=0.0)
    hinge: int = Field(10, ge=0)
    max_staleness: int = Field(100, ge=0)


class LatencySection(_Strict):
    """``[latency]``: simulated client latencies (:mod:`fedloom.federation.timing`), simulation only.

    ``kind``: ``fixed`` (every client ``median`` seconds) or ``lognormal`` (a persistent
    per-client duration median·exp(``sigma``·z)); ``jitter``: a per-dispatch log-normal
    factor; ``speeds``: per-client speed factors dividing the duration. Rounds then report the
    simulated ``clock_s``.
    """

    kind: Literal["fixed", "lognormal"] = "lognormal"
    median: float = Field(1.0, gt=0.0)
    sigma: float = Field(1.0, ge=0.0)
    jitter: float = Field(0.0, ge=0.0)
    speeds: dict[str, Annotated[float, Field(gt=0.0)]] = {}


class HierarchySection(_Strict):
    """``[hierarchy]``: hierarchical rounds (HierFAVG, :mod:`fedloom.federation.hierarchy`).

    ``edges``: a number of edges (contiguous groups of the sorted client ids, ``edge-0``, ...;
    simulation) or a table ``{ edge-id = [client ids] }`` (each edge's roster; a deployment
    names them). ``kappa``: edge rounds per root round.
    """

    edges: int | dict[str, list[str]] = 2
    kappa: int = Field(1, ge=1)


class PersonalizationSection(_Strict):
    """``[personalization]``: personal layers and each client's evaluation of its own model.

    ``layers``: parameter-name prefixes (``"fc3"``, ``"2"``) whose values never leave the
    client (FedPer): kept as client state, sent as zeros. ``finetune_steps``: local steps each
    client fine-tunes the model on its training split (at ``finetune_lr``, default
    ``client.lr``) before its personalized evaluation (``pers_*`` metrics, per client).
    ``eval_every``: personalized evaluation every N rounds (0: after the last round only).
    """

    layers: list[str] = []
    ditto_lambda: float | None = Field(None, ge=0.0)
    finetune_steps: int = Field(0, ge=0)
    finetune_lr: float | None = Field(None, gt=0.0)
    eval_every: int = Field(0, ge=0)


class StageSection(_Open):
    """One ``[[pipeline]]`` entry (or the ``[broadcast]`` table): a stage name and its options."""

    name: str


class ClientSection(_Strict):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(10, ge=1)
    lr: float = Field(0.01, gt=0.0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0.0)
    loss: Literal["cross_entropy", "bce", "mse", "l1", "huber"] | None = None
    max_steps: int | None = Field(None, ge=1)

    def train_config(self, default_loss: str) -> TrainConfig:
        """The :class:`TrainConfig` these settings describe (loss defaults to the task's)."""
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=self.optimizer,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
            loss=self.loss or default_loss,  # type: ignore[arg-type]
            max_steps=self.max_steps,
        )


class DeploySection(_Strict):
    """``[deploy]``: the server side of a deployment over gRPC (``fedloom server``)."""

    address: str = "0.0.0.0:8765"
    insecure: bool = False  # plaintext, clients unauthenticated: loopback development only
    credentials: str | None = None  # directory with server.pem, server.key, ca.pem (fedloom certs)
    revoked: str | None = None  # revocation list (fedloom certs revoke), re-read when it changes
    round_timeout: float = Field(600.0, gt=0.0)  # seconds a round waits for updates
    min_clients: int = Field(1, ge=1)  # live clients needed before a round is selected
    wait_timeout: float = Field(3600.0, gt=0.0)  # how long to wait for them
    heartbeat_interval: float = Field(5.0, gt=0.0)
    heartbeat_timeout: float = Field(30.0, gt=0.0)  # a client silent this long is not live
    over_selection: float = Field(0.0, ge=0.0, le=10.0)  # extra fraction of clients asked each round
    round_retries: int = Field(2, ge=0)  # retries of a round with too few updates
    # Threads of the server's pool for the blocking work of calls (decoding, signature checks, validating and handing
    # over results; at most max_decoding busy at once, started as needed). The calls themselves, long polls included,
    # wait on one asyncio event loop and hold no thread: this no longer bounds the number of clients.
    max_workers: int = Field(256, ge=4)
    max_pull_wait: float = Field(10.0, gt=0.0)
    # Control calls per second (heartbeats + idle long polls) of all clients together: heartbeat_interval and
    # max_pull_wait are the shortest intervals advertised, scaled up with the connected clients to stay within
    # this rate (fedloom.server.control); 0 = never scaled.
    max_control_rate: float = Field(500.0, ge=0.0)
    # Per-participant limits (fedloom.server.limits): what one client may hold at once.
    max_streams_per_client: int = Field(4, ge=2)  # open task pulls + result pushes per identity
    stream_idle_timeout: float = Field(60.0, gt=0.0)  # a stream moving no data this long is cut off
    max_long_polls: int | None = Field(None, ge=0)  # pulls waiting at once (a few kB each, no thread); default 16384
    register_rate: float = Field(1.0, gt=0.0)  # registrations per second per identity (sustained)
    register_burst: int = Field(10, ge=1)
    pull_rate: float = Field(10.0, gt=0.0)  # task pulls per second per identity (sustained)
    pull_burst: int = Field(20, ge=1)
    min_upload_rate: float = Field(8192.0, gt=0.0)  # bytes/s an upload holding a decoder slot must average
    max_task_downloads: int = Field(3, ge=1)  # times one task may be downloaded
    max_decoding: int = Field(4, ge=1)  # results decoded at once (each holds a model-sized buffer)
    log_every: float = Field(10.0, ge=0.0)  # s between two logged refusals of one kind for one client
    # Example caps: a registration declaring more training examples is refused (an authenticated client could
    # otherwise claim any count and dominate an example-weighted mean); a client certificate may carry its own cap.
    max_examples: int | None = Field(None, ge=1)  # every client
    client_max_examples: dict[str, Annotated[int, Field(ge=1)]] = {}  # per client id


class RunConfig(_Strict):
    run: RunSection = RunSection()
    data: DataSection
    model: ModelSection
    strategy: StrategySection = StrategySection()
    client: ClientSection = ClientSection()
    pipeline: tuple[StageSection, ...] = ()
    broadcast: StageSection | None = None
    deploy: DeploySection = DeploySection()
    privacy: PrivacySection | None = None
    pruning: PruningSection | None = None
    tracking: TrackingSection = TrackingSection()
    secure: SecureSection | None = None
    attack: AttackSection | None = None
    buffer: BufferSection | None = None
    latency: LatencySection | None = None
    hierarchy: HierarchySection | None = None
    personalization: PersonalizationSection | None = None

    def identity(self) -> dict[str, Any]:
        """The settings that determine the run's results, as JSON-able data.

        The whole config minus where and how often it is persisted (``run.store``,
        ``run.checkpoint_every``, ``run.keep_checkpoints``), the privacy budget
        (``privacy.max_epsilon``), the number of rounds (rounds
        1..k do not depend on it, so a finished run can be extended by raising it), where
        the ray engine runs (``run.ray_address``, ``run.ray_workers``) and the ``[deploy]``
        settings (network, credentials, timeouts) and the ``[tracking]`` loggers: a store
        resumes a run only if this is unchanged.
        """
        data = self.model_dump(mode="json")
        data.pop("deploy")
        data.pop("tracking")
        for key in ("store", "checkpoint_every", "keep_checkpoints", "rounds", "ray_address", "ray_workers"):
            data["run"].pop(key)
        data["run"].pop("cuda_graphs")  # a replayed step computes what the eager one does
        data["run"].pop("threads")  # chunks on more threads compute the same updates, bit for bit
        if data["run"]["precision"] == "fp32":  # added later: fp32 runs keep their identity
            data["run"].pop("precision")
        for table in ("attack", "buffer", "latency", "hierarchy", "personalization"):  # tables added later: runs without one keep their identity
            if data.get(table) is None:
                data.pop(table)
        if data.get("privacy"):
            data["privacy"].pop("max_epsilon")  # a budget stops a run; raising it lets the run go on
        return data


def _format(err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    more = len(err.errors()) - 1
    if more:
        msg += f" (and {more} more error{'s' if more > 1 else ''})"
    return ConfigError(msg, key=key)


def parse_config(data: Mapping[str, Any]) -> RunConfig:
    """Validate a config mapping; raise one :class:`ConfigError` naming the bad key."""
    try:
        return RunConfig.model_validate(dict(data))
    except ValidationError as err:
        raise _format(err) from None


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as TOML, else taken as strings)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value", key=key or None)
        parts = key.split(".")
        node: dict[str, Any] = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError("is not a table", key=key)
            node = child
        node[parts[-1]] = _parse_value(raw.strip())
    return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate a TOML config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return parse_config(apply_overrides(data, overrides))
