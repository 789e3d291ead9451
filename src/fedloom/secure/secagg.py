"""Secure aggregation with dropout recovery: SecAgg and SecAgg+, as explicit state machines.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth. "Practical
Secure Aggregation for Privacy-Preserving Machine Learning." CCS 2017 (SecAgg), and Bell,
Bonawitz, Gascón, Lepoint, Raykova. "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead." CCS 2020 (SecAgg+: the same protocol on a sparse random k-regular graph, see
:mod:`fedloom.secure.graph`). Honest-but-curious server model: the server follows the
protocol and learns only Σ_{u∈U3} x_u, the sum of the surviving clients' quantized inputs.

One round, four stages (server → each client, client → server)::

    advertise  server: your neighbours, threshold t       client: c_pk, s_pk (fresh X25519 keys)
    share      server: neighbours' public keys              client: Enc_{c_uv}(share_s_u(v) ‖ share_b_u(v))
                                                             per neighbour v, and H(b_u)
    input      server: ciphertexts addressed to you        client: y_u = q(x_u) + PRG(b_u)
               (with the training task)                             + Σ_{v∈N(u)} ±PRG(s_uv)  mod 2^k
    unmask     server: which neighbours survived/dropped   client: share of b_v for survivors v,
                                                             share of s_sk_v for dropped v

``c_uv`` and ``s_uv`` come from X25519 + HKDF (:mod:`fedloom.secure.crypto`), the shares
from Shamir t-of-d over the client's d neighbours (:mod:`fedloom.secure.shamir`), q(x) is
clipping and stochastic quantization (:mod:`fedloom.secure.encoding`). The pairwise masks
cancel between survivors; the server removes the self masks PRG(b_u) of the survivors and,
from the reconstructed s_sk_v, the pairwise masks the survivors added for each client v
that dropped after sending its shares. An honest client never reveals both kinds of share
for one neighbour. Reconstructed secrets are checked against what their owner committed
to (its s_pk, and H(b_u)), so a corrupted share aborts the round instead of a wrong sum.

Both sides refuse any message that is out of stage, replayed, for another round or client,
or malformed, with the reason (:class:`~fedloom.core.errors.ProtocolError`). When fewer
than t holders are left for a secret the round aborts (:class:`ProtocolAbort`): the model
is unchanged and nothing is unmasked.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedloom.core.errors import ConfigError, ProtocolAbort, ProtocolError
from fedloom.core.types import ClientUpdate, Payload, ProtocolMessage
from fedloom.secure import host, shamir
from fedloom.secure.crypto import KeyPair, agree, decrypt, encrypt, prg_uint32
from fedloom.secure.encoding import EncodingPlan, QuantizationPlan, SkellamPlan, plan_from_meta
from fedloom.secure.graph import neighbours

__all__ = [
    "ADVERTISE",
    "CODEC",
    "INPUT",
    "PROTOCOL",
    "SHARE",
    "UNMASK",
    "Exchange",
    "SecAggClient",
    "SecAggConfig",
    "SecAggServer",
]

PROTOCOL = "secagg"
CODEC = "secagg"
ADVERTISE, SHARE, INPUT, UNMASK = "advertise", "share", "input", "unmask"
STAGES = (ADVERTISE, SHARE, INPUT, UNMASK)
assert (PROTOCOL, ADVERTISE, STAGES) == (host.PROTOCOL, host.ADVERTISE, host.STAGES)
_CT_BYTES = 12 + 2 * shamir.SHARE_BYTES + 16

Exchange = host.Exchange


@dataclass(frozen=True)
class SecAggConfig:
    """Options of a secure-aggregation round.

    ``graph``: ``complete`` (SecAgg) or ``sparse`` (SecAgg+'s random k-regular graph with
    k = ``neighbours``, an even number; None: k = 2⌈1.5·log2 n⌉ for a cohort of n, below
    n − 1). ``threshold``: shares needed to recover a secret, as an int t, or a fraction f of
    a client's d neighbours (t = ⌊f·d⌋ + 1, at most d). ``bits``, ``modulus_bits``, ``clip``,
    ``weight_scale``: the quantization (:class:`~fedloom.secure.encoding.QuantizationPlan`).
    """

    graph: str = "complete"
    neighbours: int | None = None
    threshold: float | int = 0.5
    bits: int = 16
    modulus_bits: int = 32
    clip: float = 1.0
    weight_scale: float = 1.0
    encoding: SkellamPlan | None = None  # distributed DP's encoding instead of the levels

    def __post_init__(self) -> None:
        if self.graph not in ("complete", "sparse"):
            raise ConfigError(f"must be 'complete' (SecAgg) or 'sparse' (SecAgg+), got {self.graph!r}", key="graph")
        k = self.neighbours
        if k is not None and self.graph == "complete":
            raise ConfigError("only a sparse graph (SecAgg+) has a neighbour count", key="neighbours")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 2 or k % 2):
            raise ConfigError(f"must be an even integer >= 2 (or absent for SecAgg's complete graph), got {k!r}", key="neighbours")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ConfigError(f"must be an int >= 1 or a fraction in (0, 1), got {t!r}", key="threshold")
        if isinstance(t, int) and t < 1 or isinstance(t, float) and not 0.0 < t < 1.0:
            raise ConfigError(f"must be an int >= 1 or a fraction in (0, 1), got {t!r}", key="threshold")
        self.plan  # noqa: B018 - validates bits, modulus_bits, clip

    @property
    def plan(self) -> EncodingPlan:
        if self.encoding is not None:
            return self.encoding
        return QuantizationPlan(bits=self.bits, modulus_bits=self.modulus_bits, clip=self.clip, scale=self.weight_scale)

    @property
    def name(self) -> str:
        return "secagg" if self.graph == "complete" else "secagg+"

    def degree(self, n: int) -> int | None:
        """SecAgg+'s k for a cohort of ``n`` (None: the complete graph)."""
        if self.graph == "complete":
            return None
        if self.neighbours is not None:
            return self.neighbours
        return 2 * math.ceil(1.5 * math.log2(max(n, 2)))

    def threshold_for(self, degree: int) -> int:
        """t for a client with ``degree`` neighbours."""
        if isinstance(self.threshold, int):
            return self.threshold
        return min(degree, math.floor(self.threshold * degree) + 1)

    def wire_bytes(self, numel: int) -> int:
        """The largest protocol message beyond the default limits (0: a masked vector fits them)."""
        return 0

    def server(self, rnd: int, cohort: Sequence[str], seed: int) -> SecAggServer:
        return SecAggServer(self, rnd, cohort, seed)


# ----------------------------------------------------------------- helpers
def _label(kind: str, rnd: int, a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"fedloom/secagg/{kind}/{rnd}/{len(lo)}:{lo}/{hi}"


def _aad(rnd: int, sender: str, recipient: str) -> bytes:
    return f"fedloom/secagg/share/{rnd}/{len(sender)}:{sender}/{recipient}".encode()


def _row_tensor(rows: Sequence[bytes], width: int) -> torch.Tensor:
    if not rows:
        return torch.zeros((0, width), dtype=torch.uint8)
    return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).reshape(len(rows), width).clone()


def _rows(msg: ProtocolMessage, name: str, count: int, width: int) -> list[bytes]:
    t = msg.tensors.get(name)
    if t is None:
        raise ProtocolError(f"stage {msg.stage!r}: missing {name!r}")
    if t.dtype != torch.uint8 or tuple(t.shape) != (count, width):
        raise ProtocolError(f"stage {msg.stage!r}: {name!r} must be uint8 of shape ({count}, {width}), got {t.dtype} {tuple(t.shape)}")
    data = t.contiguous().numpy().tobytes()
    return [data[i * width : (i + 1) * width] for i in range(count)]


def _ids(msg: ProtocolMessage, name: str) -> list[str]:
    v = msg.meta.get(name)
    if not isinstance(v, (list, tuple)) or not all(isinstance(c, str) for c in v) or len(set(v)) != len(v):
        raise ProtocolError(f"stage {msg.stage!r}: {name!r} must be a list of distinct client ids")
    return list(v)


def _sign(u: str, v: str) -> int:
    return 1 if u < v else -1


def _add_mask(acc: np.ndarray, seed: bytes, sign: int) -> None:
    m = prg_uint32(seed, acc.shape[0])
    if sign > 0:
        np.add(acc, m, out=acc)
    else:
        np.subtract(acc, m, out=acc)


# ----------------------------------------------------------------- client
class SecAggClient:
    """One client's side of one SecAgg round: advertise → share → input → unmask → done."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.round: int | None = None
        self.done: tuple[str, ...] = ()
        self._c = KeyPair()
        self._s = KeyPair()
        self._b = b""
        self._neighbours: list[str] = []
        self._t = 0
        self._points: dict[str, int] = {}
        self._peers: dict[str, tuple[bytes, bytes]] = {}
        self._inputs: list[str] = []
        self._cts: dict[str, bytes] = {}

    @property
    def expecting(self) -> str | None:
        n = len(self.done)
        return STAGES[n] if n < len(STAGES) else None

    def _enter(self, msg: ProtocolMessage, stage: str) -> None:
        if msg.protocol != PROTOCOL:
            raise ProtocolError(f"message of protocol {msg.protocol!r}, not {PROTOCOL!r}")
        if msg.client_id != self.client_id:
            raise ProtocolError(f"message addressed to {msg.client_id!r}, not to this client")
        if self.round is not None and msg.round != self.round:
            raise ProtocolError(f"message for round {msg.round}, this session is round {self.round}")
        if msg.stage in self.done:
            raise ProtocolError(f"stage {msg.stage!r} was already done (a replayed message)")
        if msg.stage != self.expecting or msg.stage != stage:
            raise ProtocolError(f"message for stage {msg.stage!r} while expecting {self.expecting!r}")
        self.round = msg.round

    def handle(self, msg: ProtocolMessage) -> ProtocolMessage:
        """Answer a server message of the advertise, share or unmask stage."""
        stage = msg.stage
        if stage == INPUT:
            raise ProtocolError("the input stage comes with the training task, not as an exchange")
        self._enter(msg, stage)
        tensors = {ADVERTISE: self._advertise, SHARE: self._share, UNMASK: self._unmask}[stage](msg)
        self.done = (*self.done, stage)
        return ProtocolMessage(PROTOCOL, stage, msg.round, self.client_id, tensors=tensors)

    def _advertise(self, msg: ProtocolMessage) -> dict[str, torch.Tensor]:
        nb = _ids(msg, "neighbours")
        t = msg.meta.get("threshold")
        points = msg.meta.get("points")
        if self.client_id in nb:
            raise ProtocolError("advertise: a client cannot be its own neighbour")
        if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= len(nb):
            raise ProtocolError(f"advertise: threshold must be an int in [1, {len(nb)}], got {t!r}")
        if not isinstance(points, Mapping) or set(points) != set(nb):
            raise ProtocolError("advertise: points must give every neighbour its share point")
        xs = list(points.values())
        if any(not isinstance(x, int) or isinstance(x, bool) or not 0 < x < shamir.PRIME for x in xs) or len(set(xs)) != len(xs):
            raise ProtocolError("advertise: share points must be distinct positive integers")
        self._neighbours, self._t, self._points = nb, t, dict(points)
        return {"c_pk": _row_tensor([self._c.public], 32)[0], "s_pk": _row_tensor([self._s.public], 32)[0]}

    def _share(self, msg: ProtocolMessage) -> dict[str, torch.Tensor]:
        live = _ids(msg, "neighbours")
        if not set(live) <= set(self._neighbours):
            raise ProtocolError("share: the key list names clients that are not this client's neighbours")
        if len(live) < self._t:
            raise ProtocolError(f"share: {len(live)} neighbours left < threshold {self._t}")
        c_pks = _rows(msg, "c_pk", len(live), 32)
        s_pks = _rows(msg, "s_pk", len(live), 32)
        keys = [*c_pks, *s_pks, self._c.public, self._s.public]
        if len(set(keys)) != len(keys):
            raise ProtocolError("share: public keys are not all distinct")
        self._peers = {v: (c, s) for v, c, s in zip(live, c_pks, s_pks, strict=True)}
        self._b = os.urandom(32)
        xs = [self._points[v] for v in live]
        s_shares = shamir.split(self._s.private_bytes(), xs, self._t)
        b_shares = shamir.split(self._b, xs, self._t)
        cts = []
        for v, x in zip(live, xs, strict=True):
            key = agree(self._c, self._peers[v][0], label=_label("enc", msg.round, self.client_id, v))
            plain = shamir.share_to_bytes(s_shares[x]) + shamir.share_to_bytes(b_shares[x])
            cts.append(encrypt(key, plain, _aad(msg.round, self.client_id, v)))
        digest = hashlib.sha256(self._b).digest()
        return {"ct": _row_tensor(cts, _CT_BYTES), "b_hash": _row_tensor([digest], 32)[0]}

    def seal(self, update: ClientUpdate, msg: ProtocolMessage, *, seed: int) -> ClientUpdate:
        """The masked input: ``update``'s dense (weighted) delta quantized, then masked (the input stage)."""
        self._enter(msg, INPUT)
        if update.delta is None:
            raise ProtocolError("input: secure aggregation needs the dense delta (no encoding stage before it)")
        if update.extras:
            raise ProtocolError(f"input: extras {sorted(update.extras)} cannot be sent under secure aggregation")
        inputs = _ids(msg, "neighbours")
        if not set(inputs) <= set(self._peers):
            raise ProtocolError("input: the list names clients that sent this client no keys")
        if len(inputs) < self._t:
            raise ProtocolError(f"input: {len(inputs)} neighbours left < threshold {self._t}")
        cts = _rows(msg, "ct", len(inputs), _CT_BYTES)
        try:
            plan = plan_from_meta(msg.meta)
        except ProtocolError as exc:
            raise ProtocolError(f"input: {exc}") from None
        gen = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        y = (plan.quantize(update.delta.reshape(-1), gen) & plan.mask).astype(np.uint32)
        _add_mask(y, self._b, +1)
        for v in inputs:
            s_uv = agree(self._s, self._peers[v][1], label=_label("mask", msg.round, self.client_id, v))
            _add_mask(y, s_uv, _sign(self.client_id, v))
        self._inputs, self._cts = inputs, dict(zip(inputs, cts, strict=True))
        self.done = (*self.done, INPUT)
        payload = Payload(codec=CODEC, tensors={"masked": plan.to_wire(y)}, meta={"round": msg.round})
        return replace(update, delta=None, payload=payload)

    def _unmask(self, msg: ProtocolMessage) -> dict[str, torch.Tensor]:
        survivors = _ids(msg, "survivors")
        dropped = _ids(msg, "dropped")
        if set(survivors) & set(dropped):
            raise ProtocolError("unmask: a client is listed both as survivor and as dropped (would reveal its input)")
        if not set(survivors) | set(dropped) <= set(self._inputs):
            raise ProtocolError("unmask: the lists name clients outside this client's input stage")
        if len(survivors) + 1 < self._t:
            raise ProtocolError(f"unmask: {len(survivors) + 1} survivors < threshold {self._t}")
        b_rows, s_rows = [], []
        for v in survivors:
            b_rows.append(self._open(msg.round, v)[1])
        for v in dropped:
            s_rows.append(self._open(msg.round, v)[0])
        return {"b": _row_tensor(b_rows, shamir.SHARE_BYTES), "s": _row_tensor(s_rows, shamir.SHARE_BYTES)}

    def _open(self, rnd: int, v: str) -> tuple[bytes, bytes]:
        key = agree(self._c, self._peers[v][0], label=_label("enc", rnd, self.client_id, v))
        plain = decrypt(key, self._cts[v], _aad(rnd, v, self.client_id))
        if len(plain) != 2 * shamir.SHARE_BYTES:
            raise ProtocolError(f"unmask: the share from {v!r} has the wrong length")
        return plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]


# ----------------------------------------------------------------- server
class SecAggServer:
    """The server's side of one round; the stages run in order, each refusing what is out of place.

    :meth:`setup` runs advertise and share and returns the clients to train (U2); their
    instructions carry :meth:`input_message`; each masked update goes through :meth:`check`
    and :meth:`add`; :meth:`finish` runs unmask and returns the sum of the survivors' clipped
    inputs (float64) and the survivors. ``rejected`` collects refused messages (client ->
    reason); ``bytes_down`` / ``bytes_up`` count the protocol's own messages.
    """

    def __init__(self, config: SecAggConfig, rnd: int, cohort: Sequence[str], seed: int) -> None:
        self.config = config
        self.plan = config.plan
        self.round = rnd
        self.cohort = sorted(cohort)
        if len(set(self.cohort)) != len(self.cohort):
            raise ValueError("duplicate client ids in the cohort")
        self.graph = neighbours(self.cohort, config.degree(len(self.cohort)), seed) if len(self.cohort) > 1 else {c: [] for c in self.cohort}
        degree = len(next(iter(self.graph.values()))) if self.graph else 0
        self.t = config.threshold_for(degree) if degree else 1
        self.points = {c: i + 1 for i, c in enumerate(self.cohort)}
        self.stage = ADVERTISE
        self.rejected: dict[str, str] = {}
        self.bytes_down = 0
        self.bytes_up = 0
        self._keys: dict[str, tuple[bytes, bytes]] = {}
        self._b_hash: dict[str, bytes] = {}
        self._l1: dict[str, list[str]] = {}
        self._l2: dict[str, list[str]] = {}
        self._ct: dict[tuple[str, str], bytes] = {}  # (sender, recipient) -> ciphertext
        self._answered: set[str] = set()
        self._sum: np.ndarray | None = None
        self._masked: list[str] = []
        self._unmask_lists: dict[str, tuple[list[str], list[str]]] = {}
        self._b_shares: dict[str, dict[int, int]] = {}
        self._s_shares: dict[str, dict[int, int]] = {}

    # .......................................................... driving
    def setup(self, exchange: Exchange) -> list[str]:
        """Advertise and share; the clients that may send a masked input (U2), or ProtocolAbort."""
        if len(self.cohort) > self.plan.max_clients:
            self._abort(f"{len(self.cohort)} clients could overflow Z_2^{self.plan.modulus_bits} with this encoding "
                        f"(at most {self.plan.max_clients})")  # fmt: skip
        if len(self.cohort) < 2:
            self._abort(f"secure aggregation needs at least 2 clients, the cohort has {len(self.cohort)}")
        self._run(exchange, self._advertise_requests())
        self._close_advertise()
        self._run(exchange, self._share_requests())
        self._close_share()
        self.stage = INPUT
        self._answered = set()
        return sorted(self._l2)

    def _run(self, exchange: Exchange, requests: list[ProtocolMessage]) -> None:
        self.bytes_down += sum(m.nbytes for m in requests)
        self._answered = set()
        for reply in exchange(requests):
            self.bytes_up += reply.nbytes
            try:
                self.receive(reply)
            except ProtocolError as exc:
                self.rejected[reply.client_id] = f"secagg: {exc}"

    def _abort(self, reason: str) -> None:
        self.stage = "aborted"
        raise ProtocolAbort(f"secure aggregation aborted in round {self.round}: {reason}")

    def _msg(self, stage: str, cid: str, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> ProtocolMessage:
        return ProtocolMessage(PROTOCOL, stage, self.round, cid, meta=meta, tensors=tensors or {})

    # .......................................................... stages
    def _advertise_requests(self) -> list[ProtocolMessage]:
        return [
            self._msg(ADVERTISE, c, {"neighbours": nb, "threshold": self.t, "points": {v: self.points[v] for v in nb}})
            for c, nb in self.graph.items()
        ]

    def receive(self, msg: ProtocolMessage) -> None:
        """Take one client reply of the current stage; ProtocolError with the reason if it is out of place."""
        cid = msg.client_id
        if msg.protocol != PROTOCOL or msg.round != self.round:
            raise ProtocolError(f"reply for {msg.protocol!r} round {msg.round}, this is {PROTOCOL!r} round {self.round}")
        if msg.stage != self.stage:
            raise ProtocolError(f"reply for stage {msg.stage!r} during stage {self.stage!r}")
        expected = {ADVERTISE: self.graph, SHARE: self._l1, UNMASK: self._unmask_lists}.get(self.stage, {})
        if cid not in expected:
            raise ProtocolError(f"client {cid!r} is not part of stage {self.stage!r}")
        if cid in self._answered:
            raise ProtocolError(f"client {cid!r} already answered stage {self.stage!r} (a replayed message)")
        {ADVERTISE: self._take_keys, SHARE: self._take_shares, UNMASK: self._take_unmask}[self.stage](msg)
        self._answered.add(cid)

    def _take_keys(self, msg: ProtocolMessage) -> None:
        c = _rows(replace(msg, tensors={"k": msg.tensors.get("c_pk", torch.empty(0)).reshape(1, -1)}), "k", 1, 32)[0]
        s = _rows(replace(msg, tensors={"k": msg.tensors.get("s_pk", torch.empty(0)).reshape(1, -1)}), "k", 1, 32)[0]
        if c == s or any(c in kp or s in kp for kp in self._keys.values()):
            raise ProtocolError("advertise: public keys must be fresh and distinct")
        self._keys[msg.client_id] = (c, s)

    def _close_advertise(self) -> None:
        live = set(self._keys)
        self._l1 = self._prune({c: [v for v in self.graph[c] if v in live] for c in live})
        if len(self._l1) < 2:
            self._abort(f"{len(self._l1)} clients advertised keys with enough live neighbours (threshold t={self.t})")
        self.stage = SHARE

    def _prune(self, lists: dict[str, list[str]]) -> dict[str, list[str]]:
        """Drop clients with fewer than t live neighbours, until every remaining one has t."""
        while True:
            weak = {c for c, nb in lists.items() if len(nb) < self.t}
            if not weak:
                return lists
            lists = {c: [v for v in nb if v not in weak] for c, nb in lists.items() if c not in weak}

    def _share_requests(self) -> list[ProtocolMessage]:
        out = []
        for c, nb in sorted(self._l1.items()):
            c_pk = _row_tensor([self._keys[v][0] for v in nb], 32)
            s_pk = _row_tensor([self._keys[v][1] for v in nb], 32)
            out.append(self._msg(SHARE, c, {"neighbours": nb}, {"c_pk": c_pk, "s_pk": s_pk}))
        return out

    def _take_shares(self, msg: ProtocolMessage) -> None:
        nb = self._l1[msg.client_id]
        cts = _rows(msg, "ct", len(nb), _CT_BYTES)  # one per listed neighbour: no share for anyone outside the graph
        digest = msg.tensors.get("b_hash")
        if digest is None or digest.dtype != torch.uint8 or tuple(digest.shape) != (32,):
            raise ProtocolError("share: b_hash must be 32 uint8")
        for v, ct in zip(nb, cts, strict=True):
            self._ct[(msg.client_id, v)] = ct
        self._b_hash[msg.client_id] = digest.numpy().tobytes()

    def _close_share(self) -> None:
        sent = self._answered & set(self._l1)
        self._l2 = self._prune({c: [v for v in self._l1[c] if v in sent] for c in sent})
        if len(self._l2) < 2:
            self._abort(f"{len(self._l2)} clients sent their shares with enough live neighbours (threshold t={self.t})")

    def input_message(self, cid: str) -> ProtocolMessage:
        """What client ``cid`` (in U2) receives with its training task: the shares addressed to it."""
        nb = self._l2[cid]
        cts = _row_tensor([self._ct[(v, cid)] for v in nb], _CT_BYTES)
        msg = self._msg(INPUT, cid, {"neighbours": nb, **self.plan.meta()}, {"ct": cts})
        self.bytes_down += msg.nbytes
        return msg

    def check(self, update: ClientUpdate) -> None:
        """Validate a masked input (InvalidUpdateError-compatible ProtocolError with the reason)."""
        if self.stage != INPUT:
            raise ProtocolError(f"masked input during stage {self.stage!r}")
        if update.client_id not in self._l2:
            raise ProtocolError("masked input from a client that is not in this round's input stage")
        if update.client_id in self._answered:
            raise ProtocolError("a second masked input from this client (a replayed message)")
        p = update.payload
        if p is None or p.codec != CODEC:
            raise ProtocolError(f"the update must be a {CODEC!r} masked input, got {None if p is None else p.codec!r}")
        if set(p.tensors) != {"masked"}:
            raise ProtocolError(f"a masked input holds exactly 'masked', got {sorted(p.tensors)}")
        t = p.tensors["masked"]
        want = self.plan.wire_dtype()
        if t.dtype != want or t.dim() != 1:
            raise ProtocolError(f"masked vector must be 1-D {want}, got {t.dtype} of shape {tuple(t.shape)}")
        if update.extras:
            raise ProtocolError("a masked input carries no extras")

    def add(self, update: ClientUpdate, numel: int) -> None:
        """Fold a checked masked input into the sum (mod 2^k)."""
        assert update.payload is not None
        y = self.plan.from_wire(update.payload.tensors["masked"])
        if y.shape[0] != numel:
            raise ProtocolError(f"masked vector has {y.shape[0]} entries, the model {numel}")
        if self._sum is None:
            self._sum = y
        else:
            np.add(self._sum, y, out=self._sum)
        self._answered.add(update.client_id)
        self._masked.append(update.client_id)

    def finish(self, exchange: Exchange) -> tuple[torch.Tensor, list[str]]:
        """Unmask: Σ_{u∈U3} of the clipped inputs (float64, within ``plan.sum_error_bound``) and U3."""
        if self.stage != INPUT:
            raise ProtocolError(f"finish during stage {self.stage!r}")
        u3 = set(self._masked)
        dropped = set(self._l2) - u3
        if not u3 or self._sum is None:
            self._abort("no masked input arrived")
        lists = {w: ([v for v in self._l2[w] if v in u3], [v for v in self._l2[w] if v in dropped]) for w in sorted(u3)}
        self._feasible(lists, u3, dropped, "before unmasking")
        self.stage = UNMASK
        self._unmask_lists = lists
        self._run(exchange, [self._msg(UNMASK, w, {"survivors": s, "dropped": d}) for w, (s, d) in lists.items()])
        u4 = self._answered
        self._feasible({w: lists[w] for w in u4}, u3, dropped, "after unmasking")
        total = self._sum
        for u in sorted(u3):
            b = self._recover(self._b_shares[u], u, "b")
            if hashlib.sha256(b).digest() != self._b_hash[u]:
                self._abort(f"the self-mask seed of {u!r} does not match its commitment (a corrupted share)")
            _add_mask(total, b, -1)
        for v in sorted(dropped):
            s_sk = self._recover(self._s_shares[v], v, "s_sk")
            kp = KeyPair.from_private_bytes(s_sk)
            if kp.public != self._keys[v][1]:
                self._abort(f"the mask key of dropped client {v!r} does not match its public key (a corrupted share)")
            for u in self._l2[v]:
                if u in u3:
                    s_uv = agree(kp, self._keys[u][1], label=_label("mask", self.round, u, v))
                    _add_mask(total, s_uv, -_sign(u, v))
        self.stage = "done"
        total &= np.uint32(self.plan.mask)
        return self.plan.decode_sum(total, len(u3)), sorted(u3)

    def _feasible(self, lists: Mapping[str, tuple[list[str], list[str]]], u3: set[str], dropped: set[str], when: str) -> None:
        holders: dict[str, int] = {}
        for s, d in lists.values():
            for v in (*s, *d):
                holders[v] = holders.get(v, 0) + 1
        short = sorted(v for v in (u3 | dropped) if holders.get(v, 0) < self.t)
        if short:
            self._abort(f"{when}: fewer than t={self.t} live holders of the secrets of {short[:5]}"
                        f"{' ...' if len(short) > 5 else ''}")  # fmt: skip

    def _take_unmask(self, msg: ProtocolMessage) -> None:
        survivors, dropped = self._unmask_lists[msg.client_id]
        b_rows = _rows(msg, "b", len(survivors), shamir.SHARE_BYTES)
        s_rows = _rows(msg, "s", len(dropped), shamir.SHARE_BYTES)
        b_vals = [shamir.share_from_bytes(r) for r in b_rows]
        s_vals = [shamir.share_from_bytes(r) for r in s_rows]
        x = self.points[msg.client_id]
        for v, val in zip(survivors, b_vals, strict=True):
            self._b_shares.setdefault(v, {})[x] = val
        for v, val in zip(dropped, s_vals, strict=True):
            self._s_shares.setdefault(v, {})[x] = val

    def _recover(self, shares: Mapping[int, int], owner: str, what: str) -> bytes:
        try:
            return shamir.reconstruct(shares, self.t)
        except ProtocolError as exc:
            self._abort(f"cannot recover {what} of {owner!r}: {exc}")
            raise  # pragma: no cover


def iter_replies(handle: Callable[[ProtocolMessage], ProtocolMessage | None], requests: Sequence[ProtocolMessage]) -> Iterator[ProtocolMessage]:
    """The replies of in-process clients (a simulation engine's exchange)."""
    for m in requests:
        r = handle(m)
        if r is not None:
            yield r
