"""Homomorphic aggregation with CKKS (TenSEAL): the server adds ciphertexts it cannot read.

Cheon, Kim, Kim, Song. "Homomorphic Encryption for Arithmetic of Approximate Numbers."
ASIACRYPT 2017 (CKKS), through TenSEAL (Benaissa et al. 2021) on Microsoft SEAL, an
optional extra (``pip install 'fedloom[he]'``) loaded on first use.

One round, three stages (server → client, client → server)::

    keys     server → one cohort client, the round's key holder: the parameters
             key holder → a fresh CKKS public context (public key only, no secret key)
    input    server → each cohort client, with its training task: the public context
             client → Enc(q(x_u)) in ⌈d / slots⌉ ciphertexts
    decrypt  server → the key holder: Σ_u Enc(q(x_u)) (the homomorphic sum)
             key holder → the decrypted sum

The key holder is drawn from the cohort by the round's seed (the next one is asked if it
does not answer, at most :data:`KEY_TRIES`); it generates the key pair for this round only,
and its secret key never leaves it. q(x) is the clipping and stochastic quantization of
:mod:`fedloom.secure.encoding` (the same levels SecAgg sums): each slot carries an integer
level, so the decrypted sum is an integer vector up to CKKS's approximation error (about
1e-5 at the 2^30 scale used here, far below 1/2). The server rounds it, which makes the
result exact and reproducible, and checks it: a value further than :data:`MAX_FRACTION`
from an integer, or outside [0, n(L − 1)], is not the sum of n valid inputs (a ciphertext
under another key decrypts to noise of magnitude ~2^40) and aborts the round, unreadable.

Trust model (honest-but-curious server and key holder): the server sees the public
context, every ciphertext and the final sum; the key holder sees its own update and the
final sum (which the next broadcast reveals to every client anyway); other clients see the
public context only. A server colluding with the key holder — or a malicious server that
sends the key holder one client's ciphertext as if it were the sum — learns that client's
update: the server must be trusted to follow the protocol, as with SecAgg.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedloom.core.errors import ConfigError, ProtocolAbort, ProtocolError
from fedloom.core.types import ClientUpdate, Payload, ProtocolMessage
from fedloom.secure.encoding import EncodingPlan, QuantizationPlan, SkellamPlan, plan_from_meta
from fedloom.secure.host import Exchange

__all__ = ["CKKS_PARAMETERS", "CkksClient", "CkksConfig", "CkksServer", "KEYS", "INPUT", "DECRYPT", "PROTOCOL", "STAGES"]

PROTOCOL = "ckks"
CODEC = "ckks"
KEYS, INPUT, DECRYPT = "keys", "input", "decrypt"
STAGES = (KEYS, INPUT, DECRYPT)
OPENS = (KEYS, INPUT)
"""The stages that begin a client's session of a round (the key holder's, anyone else's)."""
KEY_TRIES = 3
RING_BITS = 30
"""Integers of magnitude below 2^(RING_BITS − 1) = 2^29 are exact after rounding (one 60-bit prime at scale 2^30)."""
MAX_FRACTION = 0.25
MAX_CONTEXT_BYTES = 4 << 20
SIZE_SLACK = 256  # bytes a ciphertext's compressed serialization may differ by (one prime more is ~N·16 bytes)

CKKS_PARAMETERS: Mapping[int, tuple[tuple[int, ...], int]] = {
    8192: ((60, 60), 30),
    16384: ((60, 60), 30),
}
"""poly_modulus_degree → (coefficient modulus bit sizes, log2 scale). N = 8192 with a 120-bit
modulus is within SEAL's 128-bit security bound (218 bits); one 60-bit data prime at scale
2^30 holds integers below 2^29 exactly enough to round."""


def _ts() -> Any:
    try:
        import tenseal
    except ImportError:  # pragma: no cover - the he extra is installed by make
        raise ConfigError("CKKS needs the he extra: pip install 'fedloom[he]' (tenseal)", key="secure.protocol") from None
    return tenseal


def new_context(poly_modulus_degree: int) -> Any:
    """A fresh CKKS context with a secret key (the key holder's), single-threaded."""
    ts = _ts()
    bits, scale = CKKS_PARAMETERS[poly_modulus_degree]
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=poly_modulus_degree, coeff_mod_bit_sizes=list(bits), n_threads=1)
    ctx.global_scale = float(2**scale)
    return ctx


def public_bytes(ctx: Any) -> bytes:
    return bytes(ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False))


def load_public(data: bytes, poly_modulus_degree: int) -> Any:
    """A public context from its bytes, or ProtocolError if it is not one with these parameters."""
    if not 0 < len(data) <= MAX_CONTEXT_BYTES:
        raise ProtocolError(f"a public context of {len(data)} bytes (at most {MAX_CONTEXT_BYTES})")
    ts = _ts()
    try:
        ctx = ts.context_from(data, n_threads=1)
    except Exception as exc:  # noqa: BLE001 - hostile bytes: SEAL raises ValueError/RuntimeError
        raise ProtocolError(f"not a CKKS context: {type(exc).__name__}: {exc}") from None
    if ctx.has_secret_key() or not ctx.has_public_key():
        raise ProtocolError("the context must hold a public key and no secret key")
    _, scale = CKKS_PARAMETERS[poly_modulus_degree]
    if ctx.global_scale != float(2**scale):
        raise ProtocolError(f"the context's scale is {ctx.global_scale}, not 2^{scale}")
    try:
        parms = ctx.seal_context().data.key_context_data().parms()
        degree = parms.poly_modulus_degree()
    except Exception as exc:  # noqa: BLE001
        raise ProtocolError(f"unreadable context parameters: {exc}") from None
    probe = ts.ckks_vector(ctx, [0.0]).serialize()
    if degree != poly_modulus_degree or abs(len(probe) - ciphertext_bytes(poly_modulus_degree)) > SIZE_SLACK:
        raise ProtocolError("the context's parameters are not the round's (ring degree or modulus differ)")
    return ctx


@functools.cache
def ciphertext_bytes(poly_modulus_degree: int) -> int:
    """The serialized size of one ciphertext with these parameters (measured once; ± :data:`SIZE_SLACK`)."""
    ts = _ts()
    return len(ts.ckks_vector(new_context(poly_modulus_degree), [0.0]).serialize())


def fingerprint(context: bytes) -> str:
    return hashlib.sha256(context).hexdigest()


def _cts(vectors: Sequence[Any]) -> dict[str, torch.Tensor]:
    blobs = [bytes(v.serialize()) for v in vectors]
    return {
        "ct": torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8),
        "lengths": torch.tensor([len(b) for b in blobs], dtype=torch.int64),
    }


def _blobs(tensors: Mapping[str, torch.Tensor], chunks: int, max_len: int) -> list[bytes]:
    """The ciphertext bytes a message holds, checked: exactly ``chunks`` of at most ``max_len`` bytes."""
    if set(tensors) != {"ct", "lengths"}:
        raise ProtocolError(f"ciphertexts travel as 'ct' and 'lengths', got {sorted(tensors)}")
    ct, lengths = tensors["ct"], tensors["lengths"]
    if ct.dtype != torch.uint8 or ct.dim() != 1 or lengths.dtype != torch.int64 or lengths.dim() != 1:
        raise ProtocolError("'ct' must be 1-D uint8 and 'lengths' 1-D int64")
    if lengths.numel() != chunks:
        raise ProtocolError(f"{lengths.numel()} ciphertexts, the model needs {chunks}")
    ls = lengths.tolist()
    if any(not 0 < n <= max_len for n in ls) or sum(ls) != ct.numel():
        raise ProtocolError(f"ciphertext lengths must be in [1, {max_len}] and add up to the bytes sent")
    raw = ct.contiguous().numpy().tobytes()
    out, pos = [], 0
    for n in ls:
        out.append(raw[pos : pos + n])
        pos += n
    return out


def _load(ctx: Any, blob: bytes, size: int) -> Any:
    ts = _ts()
    try:
        v = ts.ckks_vector_from(ctx, blob)
        n = v.size()
    except Exception as exc:  # noqa: BLE001 - hostile bytes
        raise ProtocolError(f"not a ciphertext of this round: {type(exc).__name__}: {exc}") from None
    if n != size:
        raise ProtocolError(f"a ciphertext of {n} slots where {size} were expected")
    return v


@dataclass(frozen=True)
class CkksConfig:
    """Options of a CKKS round: ring degree (slots = degree / 2), and the quantization of SecAgg."""

    poly_modulus_degree: int = 8192
    bits: int = 16
    clip: float = 1.0
    weight_scale: float = 1.0
    encoding: SkellamPlan | None = None  # distributed DP's encoding (built with RING_BITS) instead of the levels

    def __post_init__(self) -> None:
        if self.encoding is not None and self.encoding.modulus_bits > RING_BITS:
            raise ConfigError(f"CKKS sums integers below 2^{RING_BITS - 1} exactly; the encoding needs {self.encoding.modulus_bits} bits", key="modulus_bits")
        if self.poly_modulus_degree not in CKKS_PARAMETERS:
            raise ConfigError(f"must be one of {sorted(CKKS_PARAMETERS)}, got {self.poly_modulus_degree!r}", key="poly_modulus_degree")
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 24:
            raise ConfigError(f"must be an integer in [1, 24] under CKKS, got {self.bits!r}", key="bits")
        self.plan  # noqa: B018 - validates clip, weight_scale

    @property
    def plan(self) -> EncodingPlan:
        if self.encoding is not None:
            return self.encoding
        return QuantizationPlan(bits=self.bits, modulus_bits=32, clip=self.clip, scale=self.weight_scale)

    @property
    def name(self) -> str:
        return "ckks"

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def max_clients(self) -> int:
        """The most inputs whose sum stays below 2^29 in magnitude (exactly recoverable)."""
        plan = self.plan
        if isinstance(plan, SkellamPlan):
            return plan.max_clients
        return ((1 << (RING_BITS - 1)) - 1) // (plan.levels - 1)

    def chunks(self, numel: int) -> int:
        return math.ceil(numel / self.slots)

    def wire_bytes(self, numel: int) -> int:
        """The largest protocol message: a model's worth of ciphertexts (the decrypt stage's down, every input up)."""
        return self.chunks(numel) * (ciphertext_bytes(self.poly_modulus_degree) + SIZE_SLACK) + MAX_CONTEXT_BYTES + (1 << 16)

    def server(self, rnd: int, cohort: Sequence[str], seed: int) -> CkksServer:
        return CkksServer(self, rnd, cohort, seed)


class CkksClient:
    """One client's side of one CKKS round: (keys →) input (→ decrypt for the key holder)."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.round: int | None = None
        self.done: tuple[str, ...] = ()
        self._secret: Any = None
        self._degree = 0

    @property
    def expecting(self) -> tuple[str, ...]:
        if not self.done:
            return OPENS
        if self.done == (KEYS,):
            return (INPUT, DECRYPT)
        if self.done == (KEYS, INPUT):
            return (DECRYPT,)
        return ()

    def _enter(self, msg: ProtocolMessage) -> None:
        if msg.protocol != PROTOCOL:
            raise ProtocolError(f"message of protocol {msg.protocol!r}, not {PROTOCOL!r}")
        if msg.client_id != self.client_id:
            raise ProtocolError(f"message addressed to {msg.client_id!r}, not to this client")
        if self.round is not None and msg.round != self.round:
            raise ProtocolError(f"message for round {msg.round}, this session is round {self.round}")
        if msg.stage in self.done:
            raise ProtocolError(f"stage {msg.stage!r} was already done (a replayed message)")
        if msg.stage == DECRYPT and KEYS not in self.done:
            raise ProtocolError("decrypt: this client holds no key of this round")
        if msg.stage not in self.expecting:
            raise ProtocolError(f"message for stage {msg.stage!r} while expecting {' or '.join(self.expecting) or 'nothing'}")
        self.round = msg.round

    def handle(self, msg: ProtocolMessage) -> ProtocolMessage:
        """Answer the keys or decrypt stage (this client is the round's key holder)."""
        if msg.stage == INPUT:
            raise ProtocolError("the input stage comes with the training task, not as an exchange")
        self._enter(msg)
        tensors = self._keys(msg) if msg.stage == KEYS else self._decrypt(msg)
        self.done = (*self.done, msg.stage)
        return ProtocolMessage(PROTOCOL, msg.stage, msg.round, self.client_id, tensors=tensors)

    def _keys(self, msg: ProtocolMessage) -> dict[str, torch.Tensor]:
        degree = msg.meta.get("poly_modulus_degree")
        if degree not in CKKS_PARAMETERS:
            raise ProtocolError(f"keys: parameters {degree!r} refused (allowed ring degrees {sorted(CKKS_PARAMETERS)})")
        self._degree = int(degree)
        self._secret = new_context(self._degree)
        pub = public_bytes(self._secret)
        return {"context": torch.frombuffer(bytearray(pub), dtype=torch.uint8)}

    def _decrypt(self, msg: ProtocolMessage) -> dict[str, torch.Tensor]:
        numel = msg.meta.get("numel")
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 1:
            raise ProtocolError(f"decrypt: bad model size {numel!r}")
        slots = self._degree // 2
        chunks = math.ceil(numel / slots)
        blobs = _blobs(msg.tensors, chunks, ciphertext_bytes(self._degree) + SIZE_SLACK)
        sizes = [min(slots, numel - i * slots) for i in range(chunks)]
        out = np.concatenate([np.asarray(_load(self._secret, b, n).decrypt(), dtype=np.float64) for b, n in zip(blobs, sizes, strict=True)])
        self._secret = None  # one decryption per round
        return {"sum": torch.from_numpy(out)}

    def seal(self, update: ClientUpdate, msg: ProtocolMessage, *, seed: int) -> ClientUpdate:
        """The encrypted input: ``update``'s dense (weighted) delta quantized, then encrypted under the round's key."""
        self._enter(msg)
        if update.delta is None:
            raise ProtocolError("input: CKKS needs the dense delta (no encoding stage before it)")
        if update.extras:
            raise ProtocolError(f"input: extras {sorted(update.extras)} cannot be sent under CKKS")
        try:
            degree = int(msg.meta["poly_modulus_degree"])
            plan = plan_from_meta(msg.meta)
            key = str(msg.meta["fingerprint"])
        except (KeyError, ProtocolError, TypeError, ValueError) as exc:
            raise ProtocolError(f"input: bad parameters: {exc}") from None
        if degree not in CKKS_PARAMETERS:
            raise ProtocolError(f"input: ring degree {degree} refused")
        ctx_t = msg.tensors.get("context")
        if ctx_t is None or ctx_t.dtype != torch.uint8 or ctx_t.dim() != 1:
            raise ProtocolError("input: the public context must come as a 1-D uint8 'context'")
        data = ctx_t.contiguous().numpy().tobytes()
        if fingerprint(data) != key:
            raise ProtocolError("input: the public context does not match its fingerprint")
        ctx = load_public(data, degree)
        gen = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        q = plan.quantize(update.delta.reshape(-1), gen).astype(np.float64)
        ts = _ts()
        slots = degree // 2
        vectors = [ts.ckks_vector(ctx, q[i : i + slots]) for i in range(0, q.shape[0], slots)]
        self.done = (*self.done, INPUT)
        payload = Payload(codec=CODEC, tensors=_cts(vectors), meta={"round": msg.round, "fingerprint": key})
        return replace(update, delta=None, payload=payload)


class CkksServer:
    """The server's side of one CKKS round: :meth:`setup` (keys), :meth:`check`/:meth:`add` (input), :meth:`finish` (decrypt).

    The same interface as :class:`~fedloom.secure.secagg.SecAggServer`, so the round loop
    and :class:`~fedloom.secure.aggregator.SecureSumAggregator` drive either.
    """

    def __init__(self, config: CkksConfig, rnd: int, cohort: Sequence[str], seed: int) -> None:
        self.config = config
        self.plan = config.plan
        self.round = rnd
        self.cohort = sorted(cohort)
        if len(set(self.cohort)) != len(self.cohort):
            raise ValueError("duplicate client ids in the cohort")
        order = np.random.default_rng(seed & 0xFFFF_FFFF_FFFF_FFFF).permutation(len(self.cohort))
        self.candidates = [self.cohort[i] for i in order[:KEY_TRIES]]
        self.key_holder: str | None = None
        self.stage = KEYS
        self.rejected: dict[str, str] = {}
        self.bytes_down = 0
        self.bytes_up = 0
        self._context = b""
        self._public: Any = None
        self._fingerprint = ""
        self._trained: list[str] = []
        self._answered: set[str] = set()
        self._masked: list[str] = []
        self._sum: list[Any] | None = None
        self._numel = 0

    def _msg(self, stage: str, cid: str, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> ProtocolMessage:
        return ProtocolMessage(PROTOCOL, stage, self.round, cid, meta=meta, tensors=tensors or {})

    def _abort(self, reason: str) -> None:
        self.stage = "aborted"
        raise ProtocolAbort(f"CKKS aggregation aborted in round {self.round}: {reason}")

    def _ask(self, exchange: Exchange, msg: ProtocolMessage) -> ProtocolMessage | None:
        self.bytes_down += msg.nbytes
        reply = None
        for r in exchange([msg]):
            self.bytes_up += r.nbytes
            if r.client_id == msg.client_id and r.stage == msg.stage and r.round == self.round and r.protocol == PROTOCOL:
                reply = r
            else:
                self.rejected[r.client_id] = f"ckks: an unexpected {r.stage!r} message"
        return reply

    def setup(self, exchange: Exchange) -> list[str]:
        """Get the round's public key from a key holder; the clients that may send an encrypted input."""
        n = len(self.cohort)
        if n > self.config.max_clients:
            self._abort(f"{n} clients could overflow the exactly decodable range with this encoding "
                        f"(at most {self.config.max_clients})")  # fmt: skip
        if n < 2:
            self._abort(f"secure aggregation needs at least 2 clients, the cohort has {n}")
        degree = self.config.poly_modulus_degree
        failed: list[str] = []
        for cand in self.candidates:
            reply = self._ask(exchange, self._msg(KEYS, cand, {"poly_modulus_degree": degree}))
            if reply is None:
                failed.append(cand)
                continue
            try:
                t = reply.tensors.get("context")
                if set(reply.tensors) != {"context"} or t is None or t.dtype != torch.uint8 or t.dim() != 1:
                    raise ProtocolError("keys: the reply must hold exactly a 1-D uint8 'context'")
                data = t.contiguous().numpy().tobytes()
                self._public = load_public(data, degree)
            except ProtocolError as exc:
                self.rejected[cand] = f"ckks: {exc}"
                failed.append(cand)
                continue
            self.key_holder, self._context, self._fingerprint = cand, data, fingerprint(data)
            break
        if self.key_holder is None:
            self._abort(f"no key holder: {', '.join(self.candidates)} did not send a valid public key")
        self._trained = [c for c in self.cohort if c not in failed]
        self.stage = INPUT
        return list(self._trained)

    def input_message(self, cid: str) -> ProtocolMessage:
        """What client ``cid`` receives with its training task: the round's public context and parameters."""
        p = self.plan
        meta = {
            "poly_modulus_degree": self.config.poly_modulus_degree,
            "fingerprint": self._fingerprint,
            "key_holder": self.key_holder,
            **p.meta(),
        }
        msg = self._msg(INPUT, cid, meta, {"context": torch.frombuffer(bytearray(self._context), dtype=torch.uint8)})
        self.bytes_down += msg.nbytes
        return msg

    def check(self, update: ClientUpdate) -> None:
        """Validate an encrypted input's envelope (ProtocolError with the reason)."""
        if self.stage != INPUT:
            raise ProtocolError(f"encrypted input during stage {self.stage!r}")
        if update.client_id not in self._trained:
            raise ProtocolError("encrypted input from a client that is not in this round's input stage")
        if update.client_id in self._answered:
            raise ProtocolError("a second encrypted input from this client (a replayed message)")
        p = update.payload
        if p is None or p.codec != CODEC:
            raise ProtocolError(f"the update must be a {CODEC!r} encrypted input, got {None if p is None else p.codec!r}")
        if p.meta.get("fingerprint") != self._fingerprint:
            raise ProtocolError("a ciphertext under another key (its key fingerprint is not this round's)")
        if update.extras:
            raise ProtocolError("an encrypted input carries no extras")

    def add(self, update: ClientUpdate, numel: int) -> None:
        """Add a checked input's ciphertexts to the sum (each one loaded and checked first)."""
        assert update.payload is not None
        slots = self.config.slots
        chunks = self.config.chunks(numel)
        blobs = _blobs(update.payload.tensors, chunks, ciphertext_bytes(self.config.poly_modulus_degree) + SIZE_SLACK)
        vectors = [_load(self._public, b, min(slots, numel - i * slots)) for i, b in enumerate(blobs)]
        if self._sum is None:
            self._sum, self._numel = vectors, numel
        else:
            for acc, v in zip(self._sum, vectors, strict=True):
                acc.add_(v)
        self._answered.add(update.client_id)
        self._masked.append(update.client_id)

    def finish(self, exchange: Exchange) -> tuple[torch.Tensor, list[str]]:
        """Decrypt: Σ of the inputs' clipped values (float64, within ``plan.sum_error_bound``) and who sent them."""
        if self.stage != INPUT:
            raise ProtocolError(f"finish during stage {self.stage!r}")
        u3 = sorted(self._masked)
        if not u3 or self._sum is None:
            self._abort("no encrypted input arrived")
        assert self.key_holder is not None
        self.stage = DECRYPT
        msg = self._msg(DECRYPT, self.key_holder, {"numel": self._numel, "count": len(u3)}, _cts(self._sum))
        self._sum = None
        reply = self._ask(exchange, msg)
        if reply is None:
            self._abort(f"the key holder {self.key_holder!r} did not decrypt the sum (it dropped or refused): nothing was decrypted")
        assert reply is not None
        got = reply.tensors.get("sum")
        if set(reply.tensors) != {"sum"} or got is None or got.dtype != torch.float64 or tuple(got.shape) != (self._numel,):
            self._abort(f"the key holder's reply is not a float64 sum of {self._numel} entries")
        assert got is not None
        v = got.numpy()
        lo, hi = self.plan.sum_range(len(u3))
        r = np.rint(v)
        off = np.abs(v - r)
        if not np.isfinite(v).all() or off.max(initial=0.0) > MAX_FRACTION or r.min(initial=0) < lo or r.max(initial=0) > hi:
            self._abort(f"the decrypted sum is not the sum of {len(u3)} valid inputs (values must be integers in [{lo}, {hi}]): "
                        "a ciphertext under another key, or a corrupted one")  # fmt: skip
        self.stage = "done"
        return self.plan.decode_sum(r.astype(np.int64), len(u3)), u3
