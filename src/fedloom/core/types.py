"""The messages of a round: what the server sends a client, and what comes back.

* :class:`TrainConfig` — typed local-training hyperparameters (validated on creation).
* :class:`ClientInstruction` — one client's orders for one round: config, seed, payload.
* :class:`PersonalEval` — how a client evaluates its own (personalized, fine-tuned) model.
* :class:`ClientUpdate` — a client's answer: a dense delta or an encoded :class:`Payload`,
  example count, aggregation weight, metrics, extras.
* :class:`Payload` — named tensors of any dtype plus the codec's JSON metadata: what an
  encoding stage (compression, masking) puts on the wire instead of a dense vector.
* :class:`ComponentSpec` — a named, JSON-able recipe (a gradient transform or a stage with its
  options) that travels in an instruction, so a client process builds the same component.
* :class:`Partial` — a partial sum one aggregator emits and another merges (an edge's, a worker's).
* :class:`Aggregate` — an aggregator's result, consumed by ``Strategy.apply``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch

from fedloom.core.errors import ConfigError, InvalidUpdateError

__all__ = [
    "Aggregate",
    "ClientInstruction",
    "ClientUpdate",
    "ComponentSpec",
    "JSONScalar",
    "LossName",
    "OptimizerName",
    "Partial",
    "Payload",
    "PersonalEval",
    "ProtocolMessage",
    "TrainConfig",
    "tensor_bytes",
]

JSONScalar = bool | int | float | str | None

OptimizerName = Literal["sgd", "adam"]
LossName = Literal["cross_entropy", "bce", "mse", "l1", "huber"]
_OPTIMIZERS = ("sgd", "adam")
_LOSSES = ("cross_entropy", "bce", "mse", "l1", "huber")

_EMPTY: Mapping[str, torch.Tensor] = MappingProxyType({})


def _frozen_map(m: Mapping | None) -> Mapping:
    return MappingProxyType(dict(m)) if m else _EMPTY


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyperparameters, sent by the server each round.

    Algorithms that change the local step (FedProx, SCAFFOLD) are not named here: they are
    gradient transforms the instruction lists (``ClientInstruction.transforms``).
    ``max_steps`` caps the number of local optimizer steps (None: full epochs).

    Sample-level DP-SGD (Abadi et al. 2016, see :mod:`fedloom.client.dpsgd`) is on when
    ``dp_clip_norm`` is set: each per-sample gradient is clipped to L2 norm
    ``dp_clip_norm`` (over all trainable parameters together), Gaussian noise of std
    ``dp_noise_multiplier * dp_clip_norm`` is added to their sum each step, and batches are
    Poisson-sampled instead of shuffled. ``dp_noise`` says where the noise's seed comes
    from: ``seeded`` (from the instruction's seed: reproducible, for simulation; the server
    chose that seed, so it could recompute the noise) or ``os`` (OS entropy on the client:
    what a deployment needs).
    """

    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.01
    optimizer: OptimizerName = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    loss: LossName = "cross_entropy"
    max_steps: int | None = None
    dp_clip_norm: float | None = None
    dp_noise_multiplier: float = 0.0
    dp_noise: Literal["seeded", "os"] = "seeded"

    @property
    def dpsgd(self) -> bool:
        """Whether local training runs DP-SGD (a per-sample clip norm is set)."""
        return self.dp_clip_norm is not None

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(msg, key=f"client.{key}")

        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise bad("epochs", f"must be an integer >= 1, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise bad("batch_size", f"must be an integer >= 1, got {self.batch_size!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", f"must be a finite number > 0, got {self.lr!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise bad("optimizer", f"must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise bad("momentum", f"must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and self.momentum == 0.0:
            raise bad("nesterov", "needs momentum > 0")
        if not (self.weight_decay >= 0.0 and math.isfinite(self.weight_decay)):
            raise bad("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise bad("betas", f"must be two numbers in [0, 1), got {self.betas!r}")
        if not self.eps > 0:
            raise bad("eps", f"must be > 0, got {self.eps!r}")
        if self.loss not in _LOSSES:
            raise bad("loss", f"must be one of {_LOSSES}, got {self.loss!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise bad("max_steps", f"must be an integer >= 1 or unset, got {self.max_steps!r}")
        self._check_dp(bad)

    def _check_dp(self, bad: Callable[[str, str], ConfigError]) -> None:
        """Validate the DP-SGD fields; store them as floats (JSON may deliver integers)."""

        def number(v: object) -> bool:
            return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

        clip, sigma = self.dp_clip_norm, self.dp_noise_multiplier
        if clip is not None:
            if not (number(clip) and clip > 0):
                raise bad("dp_clip_norm", f"must be a finite number > 0 or unset, got {clip!r}")
            object.__setattr__(self, "dp_clip_norm", float(clip))
        if not (number(sigma) and sigma >= 0):
            raise bad("dp_noise_multiplier", f"must be a finite number >= 0, got {sigma!r}")
        if sigma > 0 and clip is None:
            raise bad("dp_noise_multiplier", f"is {sigma!r} but client.dp_clip_norm is unset: noise needs a clip norm")
        object.__setattr__(self, "dp_noise_multiplier", float(sigma))
        if self.dp_noise not in ("seeded", "os"):
            raise bad("dp_noise", f"must be 'seeded' or 'os', got {self.dp_noise!r}")


@dataclass(frozen=True)
class ComponentSpec:
    """A component by registry name with JSON-scalar options, hashable and wire-ready.

    ``ComponentSpec.of("proximal", mu=0.01)``; ``options`` is kept sorted by key so equal
    recipes compare (and group, in the vectorized engine) equal.
    """

    name: str
    options: tuple[tuple[str, JSONScalar], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a component name must be a non-empty string, got {self.name!r}")
        opts = tuple(sorted((str(k), v) for k, v in self.options))
        for k, v in opts:
            if not (v is None or isinstance(v, (bool, int, float, str))):
                raise ConfigError(f"option {k!r} of {self.name!r} must be a JSON scalar, got {type(v).__name__}")
        object.__setattr__(self, "options", opts)

    @classmethod
    def of(cls, name: str, **options: JSONScalar) -> ComponentSpec:
        return cls(name, tuple(options.items()))

    @property
    def kwargs(self) -> dict[str, JSONScalar]:
        return dict(self.options)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "options": dict(self.options)}

    @classmethod
    def from_json(cls, data: object) -> ComponentSpec:
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str):
            raise ConfigError(f"a component must be an object with a name, got {data!r}")
        opts = data.get("options") or {}
        if not isinstance(opts, Mapping):
            raise ConfigError(f"options of {data['name']!r} must be an object")
        return cls(data["name"], tuple(opts.items()))


@dataclass(frozen=True)
class Payload:
    """An encoded update or model: named tensors (any dtype) plus the codec's metadata.

    ``codec`` names the stage that made it (the one that can decode it); ``meta`` holds
    JSON scalars (bit width, bucket size, ...). :attr:`nbytes` is the tensor data's size: the
    bytes the encoding actually costs on the wire, framing aside.
    """

    codec: str
    tensors: Mapping[str, torch.Tensor]
    meta: Mapping[str, JSONScalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", _frozen_map(self.tensors))
        object.__setattr__(self, "meta", _frozen_map(self.meta))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Bytes of a tensor's element data (0 for None)."""
    return 0 if t is None else t.numel() * t.element_size()


@dataclass(frozen=True)
class ProtocolMessage:
    """One message of a multi-exchange round protocol (secure aggregation), either way.

    ``protocol`` and ``stage`` name where it belongs in the protocol's state machine, which
    refuses it out of stage; ``client_id`` is the client it goes to or comes from; ``meta``
    is JSON (ids, counts), ``tensors`` the binary parts (keys, ciphertexts, masked vectors).
    """

    protocol: str
    stage: str
    round: int
    client_id: str
    meta: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", _frozen_map(self.meta))
        object.__setattr__(self, "tensors", _frozen_map(self.tensors))

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.tensors.values())


@dataclass(frozen=True)
class ClientInstruction:
    """One client's orders for one round.

    ``seed`` drives the client's data shuffling and dropout, so a round is reproducible.
    ``payload`` holds strategy tensors the client needs (SCAFFOLD's server control variate).
    ``transforms`` are the gradient transforms local training applies (FedProx's proximal
    term, SCAFFOLD's correction), ``stages`` the client halves of the update pipeline, run in
    order after training; both are recipes, so a client process builds the same components.
    ``model_version`` is the version of the global model the client starts from (the number
    of rounds applied to it; ``round - 1`` in synchronous FL).
    """

    round: int
    client_id: str
    train: TrainConfig
    seed: int
    payload: Mapping[str, torch.Tensor] = field(default_factory=dict)
    transforms: tuple[ComponentSpec, ...] = ()
    stages: tuple[ComponentSpec, ...] = ()
    model_version: int | None = None
    protocol: ProtocolMessage | None = None
    """A round protocol's message delivered with the training task (secure aggregation's masked-input stage)."""
    personal: tuple[ComponentSpec, ...] = ()
    """The transforms of a second, personal local run after the first (Ditto's personal model):
    its update is never sent, only the client state it leaves is kept."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "payload", _frozen_map(self.payload))
        object.__setattr__(self, "transforms", tuple(self.transforms))
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "personal", tuple(self.personal))
        if self.model_version is None:
            object.__setattr__(self, "model_version", self.round - 1)


@dataclass(frozen=True)
class PersonalEval:
    """How each client evaluates its own model in a personalized evaluation.

    The client takes the global vector, puts in its personal layers (``transforms``, the
    personal-layer recipe a run's instructions carry), fine-tunes ``steps`` optimizer steps on
    its training split with ``train`` (0: none) from a generator seeded with ``seed`` and the
    client id, and reports its test-split metrics. Nothing it does here changes its state.
    """

    steps: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    transforms: tuple[ComponentSpec, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"must be an integer >= 0, got {self.steps!r}", key="personalization.finetune_steps")
        object.__setattr__(self, "transforms", tuple(self.transforms))

    def instruction(self, client_id: str, seed: int) -> ClientInstruction | None:
        """The fine-tuning run of ``client_id`` as an instruction (None when ``steps`` is 0)."""
        if self.steps == 0:
            return None
        from dataclasses import replace as _replace

        return ClientInstruction(
            round=0, client_id=client_id, train=_replace(self.train, max_steps=self.steps, epochs=self.steps),  # >= k batches
            seed=seed, transforms=self.transforms,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        train = asdict(self.train)
        train["betas"] = list(train["betas"])
        return {"steps": self.steps, "train": train, "transforms": [t.to_json() for t in self.transforms], "seed": self.seed}

    @classmethod
    def from_json(cls, data: object) -> PersonalEval:
        """The plan :meth:`to_json` wrote; :class:`ConfigError` naming what is malformed."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a personalized evaluation must be a JSON object, got {type(data).__name__}")
        train = data.get("train")
        if not isinstance(train, Mapping) or not isinstance(data.get("transforms", []), list):
            raise ConfigError("a personalized evaluation needs a train object and a transforms list")
        t = dict(train)
        if isinstance(t.get("betas"), list):
            t["betas"] = tuple(t["betas"])
        try:
            cfg = TrainConfig(**t)
        except TypeError as exc:
            raise ConfigError(f"personalized evaluation train: {exc}") from None
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"personalized evaluation seed must be an integer, got {seed!r}")
        return cls(
            steps=data.get("steps", 0),  # type: ignore[arg-type]
            train=cfg,
            transforms=tuple(ComponentSpec.from_json(c) for c in data.get("transforms", [])),
            seed=seed,
        )


@dataclass(frozen=True)
class ClientUpdate:
    """A client's answer for one round.

    Exactly one of ``delta`` (the flat vector ``local - global``, possibly post-processed) and
    ``payload`` (the same, encoded by a stage; the server's half of that stage decodes it) is
    set. ``weight`` is the aggregation weight a weighting stage applied to the delta (None:
    none applied). ``extras`` carries strategy-specific tensors: full-length vectors
    (SCAFFOLD's ``control_delta``) or one-element statistics (adaptive clipping's clipped
    bit). ``metrics`` are the client's training metrics; ``num_steps`` the local
    optimizer steps it took; ``model_version`` the global version it started from.
    """

    client_id: str
    round: int
    delta: torch.Tensor | None
    num_examples: int
    num_steps: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)
    payload: Payload | None = None
    weight: float | None = None
    model_version: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", _frozen_map(self.metrics))
        object.__setattr__(self, "extras", _frozen_map(self.extras))
        if (self.delta is None) == (self.payload is None):
            raise InvalidUpdateError("an update carries exactly one of a dense delta and a payload", client_id=self.client_id)
        if self.model_version is None:
            object.__setattr__(self, "model_version", self.round - 1)

    @property
    def nbytes(self) -> int:
        """The bytes this update's tensors cost as encoded: payload or dense delta, plus extras."""
        body = self.payload.nbytes if self.payload is not None else tensor_bytes(self.delta)
        return body + sum(tensor_bytes(t) for t in self.extras.values())

    def validate(self, *, numel: int, dtype: torch.dtype | None = None, max_examples: int | None = None) -> None:
        """Raise :class:`InvalidUpdateError` unless this update is well-formed for a model of ``numel``.

        Checks the header (:meth:`validate_header`) and the dense delta and extras; an update
        that still carries a payload is refused (its codec's stage must decode it first).
        """
        cid = self.client_id
        if self.delta is None:
            codec = self.payload.codec if self.payload is not None else "?"
            raise InvalidUpdateError(f"payload of codec {codec!r} was not decoded", client_id=cid)

        def check_vec(name: str, t: object) -> None:
            if not isinstance(t, torch.Tensor):
                raise InvalidUpdateError(f"{name} is {type(t).__name__}, not a tensor", client_id=cid)
            if t.dim() != 1 or t.numel() != numel:
                raise InvalidUpdateError(f"{name} has shape {tuple(t.shape)}, expected ({numel},)", client_id=cid)
            if not t.dtype.is_floating_point or (dtype is not None and t.dtype != dtype):
                raise InvalidUpdateError(f"{name} has dtype {t.dtype}, expected {dtype or 'a float dtype'}", client_id=cid)
            # A NaN or Inf makes the sum NaN or Inf; a finite sum (the common case, ~20x cheaper
            # than an elementwise test) proves every entry finite. Only a non-finite sum (or an
            # overflow of finite entries) needs the elementwise test.
            if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
                raise InvalidUpdateError(f"{name} contains NaN or Inf", client_id=cid)

        check_vec("delta", self.delta)
        for k, v in self.extras.items():
            if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == 1 and numel != 1:
                check_vec(f"extras[{k!r}]", v.expand(numel))  # a one-element statistic
            else:
                check_vec(f"extras[{k!r}]", v)
        self.validate_header(max_examples=max_examples)

    def validate_header(self, *, max_examples: int | None = None) -> None:
        """Check what does not depend on the encoding: example count, weight, metrics."""
        cid = self.client_id
        if isinstance(self.num_examples, bool) or not isinstance(self.num_examples, int) or self.num_examples < 1:
            raise InvalidUpdateError(f"num_examples must be an integer >= 1, got {self.num_examples!r}", client_id=cid)
        if max_examples is not None and self.num_examples > max_examples:
            raise InvalidUpdateError(f"num_examples {self.num_examples} exceeds the limit {max_examples}", client_id=cid)
        for k, m in self.metrics.items():
            if not isinstance(m, (int, float)) or not math.isfinite(float(m)):
                raise InvalidUpdateError(f"metric {k!r} is not a finite number: {m!r}", client_id=cid)
        if self.weight is not None and (
            isinstance(self.weight, bool)
            or not isinstance(self.weight, (int, float))
            or not (math.isfinite(self.weight) and self.weight >= 0)
        ):
            raise InvalidUpdateError(f"weight must be a finite number >= 0, got {self.weight!r}", client_id=cid)


@dataclass(frozen=True)
class Partial:
    """A partial aggregate one aggregator emits and another merges (hierarchical FL, per-worker sums).

    ``delta_sum`` is the float64 sum of a group's (weighted) deltas and ``weight`` their total
    weight; ``client_ids`` / ``client_examples`` say who contributed and with how many
    examples; ``metric_sums`` / ``metric_weights`` are the example-weighted sums of their
    training metrics and ``extra_sums`` / ``extra_counts`` the sums of their extras, so that
    merging partials gives exactly what adding every update would. ``source`` is who emitted
    it (an edge, a worker), for ``round`` from model ``model_version``.
    """

    source: str
    round: int
    model_version: int
    delta_sum: torch.Tensor
    weight: float
    client_ids: tuple[str, ...]
    client_examples: tuple[int, ...]
    metric_sums: Mapping[str, float] = field(default_factory=dict)
    metric_weights: Mapping[str, int] = field(default_factory=dict)
    extra_sums: Mapping[str, torch.Tensor] = field(default_factory=dict)
    extra_counts: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("metric_sums", "metric_weights", "extra_sums", "extra_counts"):
            object.__setattr__(self, name, _frozen_map(getattr(self, name)))
        object.__setattr__(self, "client_ids", tuple(self.client_ids))
        object.__setattr__(self, "client_examples", tuple(self.client_examples))

    @property
    def num_examples(self) -> int:
        return sum(self.client_examples)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.delta_sum) + sum(tensor_bytes(t) for t in self.extra_sums.values())

    def validate(self, *, numel: int) -> None:
        """Raise :class:`InvalidUpdateError` (naming ``source``) unless this partial is well-formed for ``numel``."""
        src = self.source

        def bad(msg: str) -> InvalidUpdateError:
            return InvalidUpdateError(f"partial: {msg}", client_id=src)

        t = self.delta_sum
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != numel or t.dtype != torch.float64:
            raise bad(f"delta_sum must be a float64 vector of {numel}, got {getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        if not bool(torch.isfinite(t).all()):
            raise bad("delta_sum contains NaN or Inf")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not (math.isfinite(self.weight) and self.weight >= 0):
            raise bad(f"weight must be a finite number >= 0, got {self.weight!r}")
        if not self.client_ids or len(set(self.client_ids)) != len(self.client_ids):
            raise bad("client_ids must be a non-empty list of distinct ids")
        if len(self.client_examples) != len(self.client_ids) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.client_examples
        ):
            raise bad("client_examples must hold one integer >= 1 per client")
        for k, v in self.metric_sums.items():
            w = self.metric_weights.get(k)
            if not isinstance(v, (int, float)) or not math.isfinite(float(v)) or not isinstance(w, int) or w < 0:
                raise bad(f"metric {k!r} has no finite sum and integer weight")
        for k, e in self.extra_sums.items():
            c = self.extra_counts.get(k)
            if not isinstance(e, torch.Tensor) or not bool(torch.isfinite(e).all()) or not isinstance(c, int) or c < 1:
                raise bad(f"extra {k!r} has no finite sum and positive count")


@dataclass(frozen=True)
class Aggregate:
    """What an aggregator hands to ``Strategy.apply``.

    ``delta`` is the aggregated update (a pseudo-gradient pointing downhill, i.e. to add).
    ``extras`` are aggregated extras (mean over clients, unweighted); ``metrics`` are the
    example-weighted means of the clients' training metrics. ``weight`` is the total
    aggregation weight of a sum (before a weighting stage's finalize divides by it);
    ``num_available`` the number of clients the round could select from (SCAFFOLD's N);
    ``client_examples`` each client's example count, aligned with ``client_ids`` (a
    sample-level privacy accountant needs them per client).
    """

    delta: torch.Tensor
    num_clients: int
    num_examples: int
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    client_ids: tuple[str, ...] = ()
    weight: float | None = None
    num_available: int | None = None
    client_examples: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extras", _frozen_map(self.extras))
        object.__setattr__(self, "metrics", _frozen_map(self.metrics))
