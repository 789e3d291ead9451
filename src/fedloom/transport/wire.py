"""Messages on the wire: tensors and JSON metadata as a checksummed stream of chunks.

A message is ``Header`` (kind, JSON metadata, tensor table, total size), then ``Data``
chunks (each carrying its CRC-32), then ``Trailer`` (SHA-256 of all data bytes followed by
the tensor table, so a corrupted name, dtype or shape is caught like corrupted data; and an
optional signature, which covers the whole header). Sizes are bounded by memory, not by
gRPC's per-message limit.

:class:`Decoder` is the one place that trusts nothing: it is fed chunks one by one and
raises :class:`WireError` naming the problem for anything malformed — chunks out of order,
unknown dtypes, negative or overflowing shapes, a size above the limit, a bad CRC or
digest, a truncated stream, trailing chunks. The decoder is fuzzed in the tests.

Tensor bytes are raw little-endian element data in the order of the tensor table.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedloom.core.errors import FedloomError
from fedloom.transport.proto import fedloom_pb2 as pb

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DTYPES",
    "Body",
    "Decoder",
    "Message",
    "WireError",
    "decode",
    "encode",
    "encode_body",
    "extend_body",
    "signing_bytes",
    "trailer_digest",
]

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's default 4 MiB message limit
MAX_META_BYTES = 1 << 20
MAX_TENSORS = 4096
MAX_NAME = 256
MAX_DIMS = 16

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
# Unsigned and 8-bit float types (what quantizers pack into), where this torch has them.
for _name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2"):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        DTYPES[_name] = getattr(torch, _name)
_NAMES = {v: k for k, v in DTYPES.items()}


class WireError(FedloomError):
    """A malformed, truncated, oversized or corrupted message."""


@dataclass(frozen=True)
class Body:
    """The encoded tensor part of a message, reusable across recipients (the global model is encoded once per round)."""

    metas: tuple[pb.TensorMeta, ...]
    chunks: tuple[pb.Chunk, ...]
    total_bytes: int
    sha256: bytes
    hasher: Any = field(default=None, compare=False, repr=False)
    """The SHA-256 state after this body's data, before its table (:func:`extend_body` continues it)."""


@dataclass(frozen=True)
class Message:
    """A decoded message. ``signed`` is what a signature covers (see :func:`signing_bytes`)."""

    kind: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    signature: bytes = b""
    signed: bytes = b""


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def encode_body(tensors: Mapping[str, torch.Tensor], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Body:
    """Encode ``tensors`` into data chunks with CRC-32s, and their table and digest."""
    return _encode(tensors, chunk_bytes=chunk_bytes, digest=hashlib.sha256())


def extend_body(base: Body, tensors: Mapping[str, torch.Tensor], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Body:
    """``base`` followed by ``tensors``, without encoding or hashing ``base`` again.

    The result carries the same tensors, bytes and digest as encoding them all at once (only
    where the chunks break differs, which the decoder does not see): a task shares the
    global model's encoding across clients and adds each client's own protocol message.
    """
    if base.hasher is None:
        raise ValueError("this body cannot be extended (it was not made by encode_body)")
    more = _encode(
        tensors, chunk_bytes=chunk_bytes, digest=base.hasher.copy(), names={m.name for m in base.metas}, prior=base.metas
    )
    return Body(base.metas + more.metas, base.chunks + more.chunks, base.total_bytes + more.total_bytes, more.sha256, more.hasher)


def _table_bytes(metas: Iterable[pb.TensorMeta]) -> bytes:
    """The tensor table as the trailer's digest covers it (after the data): canonical JSON."""
    return json.dumps([[m.name, m.dtype, [int(d) for d in m.shape]] for m in metas], separators=(",", ":")).encode()


def trailer_digest(data_hasher: Any, metas: Iterable[pb.TensorMeta]) -> bytes:
    """The trailer's digest: SHA-256 of the data bytes (``data_hasher``, a ``hashlib.sha256`` fed
    with them, left as it is) followed by the tensor table ``metas``."""
    h = data_hasher.copy()
    h.update(_table_bytes(metas))
    return h.digest()


def _encode(
    tensors: Mapping[str, torch.Tensor], *, chunk_bytes: int, digest: Any, names: set[str] | None = None,
    prior: tuple[pb.TensorMeta, ...] = (),
) -> Body:
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be >= 1")
    for name in tensors:
        if names is not None and name in names:
            raise WireError(f"tensor {name!r} is already in the body")
    metas = []
    chunks = []
    total = 0
    pending = bytearray()
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise WireError(f"tensor {name!r} has dtype {t.dtype}, which the wire format does not carry")
        metas.append(pb.TensorMeta(name=name, dtype=_NAMES[t.dtype], shape=list(t.shape)))
        raw = _tensor_bytes(t)
        total += len(raw)
        digest.update(raw)
        pos = 0
        while pos < len(raw):
            take = min(chunk_bytes - len(pending), len(raw) - pos)
            pending += raw[pos : pos + take]
            pos += take
            if len(pending) == chunk_bytes:
                chunks.append(pb.Chunk(data=pb.Data(payload=bytes(pending), crc32=zlib.crc32(pending))))
                pending = bytearray()
    if pending:
        chunks.append(pb.Chunk(data=pb.Data(payload=bytes(pending), crc32=zlib.crc32(pending))))
    return Body(tuple(metas), tuple(chunks), total, trailer_digest(digest, (*prior, *metas)), digest)


def signing_bytes(header: pb.Header, data_sha256: bytes) -> bytes:
    """What a signature covers: SHA-256 of the serialized header, then the data digest."""
    return hashlib.sha256(header.SerializeToString(deterministic=True)).digest() + data_sha256


def encode(
    kind: str,
    meta: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor] | Body | None = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    sign: Callable[[bytes], bytes] | None = None,
) -> Iterator[pb.Chunk]:
    """The chunks of one message; ``sign`` (e.g. an ECDSA signer) signs :func:`signing_bytes`."""
    body = tensors if isinstance(tensors, Body) else encode_body(tensors or {}, chunk_bytes=chunk_bytes)
    header = pb.Header(kind=kind, meta_json=json.dumps(dict(meta)), tensors=list(body.metas), total_bytes=body.total_bytes)
    yield pb.Chunk(header=header)
    yield from body.chunks
    signature = sign(signing_bytes(header, body.sha256)) if sign is not None else b""
    yield pb.Chunk(trailer=pb.Trailer(sha256=body.sha256, signature=signature))


class Decoder:
    """Incremental, defensive decoder: :meth:`feed` every chunk, then :meth:`finish`.

    ``max_bytes`` bounds the tensor data a message may announce (memory is allocated only
    after that check); ``kinds`` restricts the message kinds accepted.
    """

    def __init__(self, *, max_bytes: int, kinds: Collection[str] | None = None) -> None:
        self.max_bytes = max_bytes
        self.kinds = kinds
        self._header: pb.Header | None = None
        self._meta: dict[str, Any] = {}
        self._layout: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        self._buf = bytearray()
        self._total = 0  # announced data bytes; the buffer is allocated at the first data chunk
        self._filled = 0
        self._digest = hashlib.sha256()
        self._trailer: pb.Trailer | None = None

    @property
    def header(self) -> pb.Header | None:
        return self._header

    def feed(self, chunk: pb.Chunk) -> None:
        if self._trailer is not None:
            raise WireError("chunk after the trailer")
        which = chunk.WhichOneof("body")
        if which is None:
            raise WireError("empty chunk")
        if which == "header":
            if self._header is not None:
                raise WireError("second header in one message")
            self._read_header(chunk.header)
        elif self._header is None:
            raise WireError(f"{which} chunk before the header")
        elif which == "data":
            self._read_data(chunk.data)
        else:
            if self._filled != self._total:
                raise WireError(f"truncated: {self._filled} of {self._total} data bytes before the trailer")
            if chunk.trailer.sha256 != trailer_digest(self._digest, self._header.tensors):
                raise WireError("digest mismatch (SHA-256 of the data and the tensor table)")
            self._trailer = chunk.trailer

    def _read_header(self, h: pb.Header) -> None:
        if self.kinds is not None and h.kind not in self.kinds:
            raise WireError(f"unexpected message kind {h.kind!r}; expected one of {sorted(self.kinds)}")
        if len(h.meta_json) > MAX_META_BYTES:
            raise WireError(f"metadata of {len(h.meta_json)} bytes exceeds {MAX_META_BYTES}")
        try:
            meta = json.loads(h.meta_json) if h.meta_json else {}
        except ValueError as exc:
            raise WireError(f"metadata is not valid JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise WireError("metadata must be a JSON object")
        if len(h.tensors) > MAX_TENSORS:
            raise WireError(f"{len(h.tensors)} tensors exceed the limit {MAX_TENSORS}")
        total = 0
        names = set()
        for tm in h.tensors:
            if not tm.name or len(tm.name) > MAX_NAME:
                raise WireError(f"bad tensor name {tm.name[:40]!r}")
            if tm.name in names:
                raise WireError(f"duplicate tensor {tm.name!r}")
            names.add(tm.name)
            dtype = DTYPES.get(tm.dtype)
            if dtype is None:
                raise WireError(f"tensor {tm.name!r}: unknown dtype {tm.dtype[:40]!r}")
            if len(tm.shape) > MAX_DIMS or any(d < 0 for d in tm.shape):
                raise WireError(f"tensor {tm.name!r}: bad shape {list(tm.shape)[:MAX_DIMS + 1]}")
            shape = tuple(int(d) for d in tm.shape)
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            total += nbytes
            if total > self.max_bytes:
                raise WireError(f"message announces more than {self.max_bytes} bytes of tensors (oversized)")
            self._layout.append((tm.name, dtype, shape, nbytes))
        if total != h.total_bytes:
            raise WireError(f"header total_bytes {h.total_bytes} != {total} from the tensor table")
        self._header = h
        self._meta = meta
        self._total = total

    def _read_data(self, d: pb.Data) -> None:
        payload = d.payload
        if zlib.crc32(payload) != d.crc32:
            raise WireError(f"chunk at byte {self._filled}: CRC-32 mismatch")
        end = self._filled + len(payload)
        if end > self._total:
            raise WireError(f"more data than announced ({end} > {self._total} bytes)")
        if not self._buf:
            self._buf = bytearray(self._total)
        self._buf[self._filled : end] = payload
        self._filled = end
        self._digest.update(payload)

    def finish(self) -> Message:
        """The decoded message; raises :class:`WireError` if the stream was incomplete."""
        if self._header is None:
            raise WireError("empty stream: no header")
        if self._trailer is None:
            raise WireError(f"truncated: stream ended after {self._filled} of {self._total} data bytes, no trailer")
        tensors: dict[str, torch.Tensor] = {}
        flat = torch.frombuffer(self._buf, dtype=torch.uint8) if self._buf else torch.empty(0, dtype=torch.uint8)
        off = 0
        for name, dtype, shape, nbytes in self._layout:
            seg = flat[off : off + nbytes]
            if off % torch.empty((), dtype=dtype).element_size():
                seg = seg.clone()  # a view needs an offset aligned to the element size
            tensors[name] = seg.view(dtype).reshape(shape)
            off += nbytes
        signed = signing_bytes(self._header, self._trailer.sha256)
        return Message(self._header.kind, self._meta, tensors, bytes(self._trailer.signature), signed)


def decode(chunks: Iterable[pb.Chunk], *, max_bytes: int, kinds: Collection[str] | None = None) -> Message:
    """Decode a whole chunk stream (see :class:`Decoder`)."""
    dec = Decoder(max_bytes=max_bytes, kinds=kinds)
    for chunk in chunks:
        dec.feed(chunk)
    return dec.finish()
