"""The wire format: exact round trips, every malformed stream refused by name, and a fuzzed decoder."""

from __future__ import annotations

import hashlib
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.wire import DTYPES, Decoder, WireError, decode, encode, encode_body, extend_body, signing_bytes

MB = 1 << 20


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "params": torch.randn(1000, generator=g),
        "count": torch.arange(7, dtype=torch.int64),
        "half": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096, MB])
def test_round_trip_is_exact(chunk_bytes: int) -> None:
    t = _tensors()
    msg = decode(encode("update", {"round": 3, "m": [1, 2]}, t, chunk_bytes=chunk_bytes), max_bytes=MB)
    assert msg.kind == "update" and msg.meta == {"round": 3, "m": [1, 2]}
    assert list(msg.tensors) == list(t)
    for k, v in t.items():
        assert msg.tensors[k].dtype == v.dtype and msg.tensors[k].shape == v.shape
        assert torch.equal(msg.tensors[k], v)


@pytest.mark.parametrize("name", ["uint8", "int32", "float16", "bfloat16", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2"])
def test_every_packed_dtype_round_trips(name: str) -> None:
    """What quantizers and sparsifiers emit travels bit for bit (odd sizes: unaligned offsets)."""
    dtype = DTYPES[name]
    raw = torch.arange(21, dtype=torch.uint8).repeat(dtype.itemsize)
    t = {"pad": torch.ones(3, dtype=torch.uint8), "x": raw.view(dtype).reshape(3, 7)}
    msg = decode(encode("update", {}, t, chunk_bytes=5), max_bytes=MB)
    assert msg.tensors["x"].dtype == dtype and msg.tensors["x"].shape == (3, 7)
    assert torch.equal(msg.tensors["x"].view(torch.uint8), t["x"].view(torch.uint8))


def test_chunking_and_digest() -> None:
    body = encode_body({"a": torch.zeros(10)}, chunk_bytes=16)  # 40 bytes -> 16 + 16 + 8
    assert [len(c.data.payload) for c in body.chunks] == [16, 16, 8]
    assert body.total_bytes == 40
    # the trailer's digest: the data bytes, then the tensor table as canonical JSON
    assert body.sha256 == hashlib.sha256(bytes(40) + b'[["a","float32",[10]]]').digest()
    assert all(c.data.crc32 == zlib.crc32(c.data.payload) for c in body.chunks)


def test_signature_covers_header_and_data() -> None:
    chunks = list(encode("update", {"task_id": "t1"}, {"d": torch.ones(3)}, sign=lambda b: b"sig:" + b))
    msg = decode(chunks, max_bytes=MB)
    assert msg.signature == b"sig:" + msg.signed
    digest = hashlib.sha256(torch.ones(3).numpy().tobytes() + b'[["d","float32",[3]]]').digest()
    assert msg.signed == signing_bytes(chunks[0].header, digest)
    other = list(encode("update", {"task_id": "t2"}, {"d": torch.ones(3)}))
    assert decode(other, max_bytes=MB).signed != msg.signed  # a different task id changes what is signed


@pytest.mark.parametrize(
    ("field", "value"), [("name", "y"), ("dtype", "int32"), ("shape", [3, 2])]
)
def test_a_corrupted_tensor_table_fails_the_digest(field: str, value: object) -> None:
    """A bit flip that renames, retypes or reshapes a tensor (sizes unchanged) is caught like corrupted data."""
    good = _valid()
    header = pb.Header()
    header.CopyFrom(good[0].header)
    meta = header.tensors[0]
    if field == "shape":
        del meta.shape[:]
        meta.shape.extend(value)  # type: ignore[arg-type]
    else:
        setattr(meta, field, value)
    with pytest.raises(WireError, match="digest mismatch"):
        decode([pb.Chunk(header=header), *good[1:]], max_bytes=MB)
    assert torch.equal(decode(good, max_bytes=MB).tensors["x"], torch.arange(6, dtype=torch.float32))


def _valid() -> list[pb.Chunk]:
    return list(encode("update", {"a": 1}, {"x": torch.arange(6, dtype=torch.float32)}, chunk_bytes=8))


def _header(**kw) -> pb.Chunk:  # type: ignore[no-untyped-def]
    fields = {"kind": "update", "meta_json": "{}", "total_bytes": 0, **kw}
    return pb.Chunk(header=pb.Header(**fields))


def test_malformed_streams_are_refused_by_name() -> None:
    good = _valid()
    cases: list[tuple[list[pb.Chunk], str]] = [
        ([], "no header"),
        (good[1:], "before the header"),
        ([good[0], good[0], *good[1:]], "second header"),
        (good[:-1], "truncated"),
        ([good[0], good[1], good[-1]], "truncated"),
        ([*good, good[1]], "after the trailer"),
        ([good[0], *good[1:-1], good[1], good[-1]], "more data than announced"),
        ([pb.Chunk()], "empty chunk"),
        ([_header(meta_json="{not json"), good[-1]], "not valid JSON"),
        ([_header(meta_json="[1]"), good[-1]], "JSON object"),
        ([_header(kind="virus"), good[-1]], "unexpected message kind"),
        ([_header(tensors=[pb.TensorMeta(name="x", dtype="complex64", shape=[2])], total_bytes=16)], "unknown dtype"),
        ([_header(tensors=[pb.TensorMeta(name="x", dtype="float32", shape=[-1])], total_bytes=0)], "bad shape"),
        ([_header(tensors=[pb.TensorMeta(name="x", dtype="float32", shape=[2])], total_bytes=9)], "total_bytes"),
        ([_header(tensors=[pb.TensorMeta(name="", dtype="float32", shape=[2])], total_bytes=8)], "bad tensor name"),
        (
            [_header(tensors=[pb.TensorMeta(name="x", dtype="float32", shape=[1]), pb.TensorMeta(name="x", dtype="float32", shape=[1])], total_bytes=8)],
            "duplicate tensor",
        ),
        ([_header(tensors=[pb.TensorMeta(name="x", dtype="float32", shape=[1 << 40, 1 << 40])], total_bytes=0)], "oversized"),
    ]
    for chunks, needle in cases:
        with pytest.raises(WireError, match=needle):
            decode(chunks, max_bytes=MB, kinds={"update"})
    bad_crc = pb.Chunk()
    bad_crc.CopyFrom(good[1])
    bad_crc.data.crc32 ^= 1
    with pytest.raises(WireError, match="CRC-32"):
        decode([good[0], bad_crc, *good[2:]], max_bytes=MB)
    flipped = pb.Chunk()
    flipped.CopyFrom(good[1])
    flipped.data.payload = bytes([flipped.data.payload[0] ^ 1]) + flipped.data.payload[1:]
    flipped.data.crc32 = zlib.crc32(flipped.data.payload)  # a consistent CRC: only the digest can tell
    with pytest.raises(WireError, match="digest"):
        decode([good[0], flipped, *good[2:]], max_bytes=MB)


def test_size_limit_applies_before_allocation() -> None:
    chunks = list(encode("update", {}, {"x": torch.zeros(300)}))  # 1200 bytes
    with pytest.raises(WireError, match="oversized"):
        decode(chunks, max_bytes=1199)
    assert decode(chunks, max_bytes=1200).tensors["x"].shape == (300,)


def test_unaligned_tensors_decode() -> None:
    t = {"b": torch.tensor([True, False, True]), "f": torch.tensor([1.5, -2.0]), "h": torch.tensor([1.0], dtype=torch.float16)}
    msg = decode(encode("update", {}, t, chunk_bytes=3), max_bytes=MB)
    assert all(torch.equal(msg.tensors[k], v) for k, v in t.items())


_chunk = st.one_of(
    st.builds(
        lambda kind, meta, metas, total: pb.Chunk(header=pb.Header(kind=kind, meta_json=meta, tensors=metas, total_bytes=total)),
        st.sampled_from(["update", "task", "x", ""]),
        st.one_of(st.just("{}"), st.text(max_size=20)),
        st.lists(
            st.builds(
                lambda n, d, s: pb.TensorMeta(name=n, dtype=d, shape=s),
                st.text(max_size=5),
                st.sampled_from(["float32", "int8", "bool", "bfloat16", "nope", ""]),
                st.lists(st.integers(min_value=-3, max_value=1 << 62), max_size=4),
            ),
            max_size=3,
        ),
        st.integers(min_value=0, max_value=(1 << 64) - 1),
    ),
    st.builds(lambda b, c: pb.Chunk(data=pb.Data(payload=b, crc32=c)), st.binary(max_size=64), st.integers(0, (1 << 32) - 1)),
    st.builds(lambda b: pb.Chunk(data=pb.Data(payload=b, crc32=zlib.crc32(b))), st.binary(max_size=64)),
    st.builds(lambda h, s: pb.Chunk(trailer=pb.Trailer(sha256=h, signature=s)), st.binary(max_size=40), st.binary(max_size=8)),
    st.just(pb.Chunk()),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_chunk, max_size=6))
def test_fuzz_random_chunk_sequences(chunks: list[pb.Chunk]) -> None:
    try:
        decode(chunks, max_bytes=4096, kinds={"update"})
    except WireError:
        pass  # the only acceptable failure


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_streams(data: st.DataObject) -> None:
    """Bytes of a valid stream's serialized chunks, mutated, parsed back, then decoded: a WireError or a correct message."""
    good = _valid()
    raw = [c.SerializeToString() for c in good]
    i = data.draw(st.integers(0, len(raw) - 1))
    b = bytearray(raw[i])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b:
            b[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del b[pos:]
        else:
            b[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    chunk = pb.Chunk()
    try:
        chunk.ParseFromString(bytes(b))
    except Exception:  # protobuf's own DecodeError: the gRPC layer refuses such a message
        return
    mutated = [*good[:i], chunk, *good[i + 1 :]]
    dec = Decoder(max_bytes=4096, kinds={"update"})
    try:
        for c in mutated:
            dec.feed(c)
        msg = dec.finish()
    except WireError:
        return
    # Accepted: then the data must be exactly the original (a mutation that survives changed only the header's
    # metadata in a way that still parses, or nothing at all).
    assert torch.equal(msg.tensors["x"], torch.arange(6, dtype=torch.float32))


@pytest.mark.parametrize("chunk_bytes", [1, 5, 64, 1 << 20])
def test_an_extended_body_is_the_whole_body(chunk_bytes: int) -> None:
    """The model's encoding shared, a client's own tensors appended: same tensors, bytes and digest."""
    model = {"params": torch.arange(13, dtype=torch.float32)}
    own = {"protocol.masked": torch.arange(7, dtype=torch.int64), "protocol.flag": torch.tensor([True])}
    base = encode_body(model, chunk_bytes=chunk_bytes)
    ext = extend_body(base, own, chunk_bytes=chunk_bytes)
    whole = encode_body({**model, **own}, chunk_bytes=chunk_bytes)
    assert (ext.sha256, ext.total_bytes, ext.metas) == (whole.sha256, whole.total_bytes, whole.metas)
    msg = decode(list(encode("task", {"a": 1}, ext)), max_bytes=1 << 20)
    assert msg.tensors.keys() == {"params", "protocol.masked", "protocol.flag"}
    assert all(torch.equal(msg.tensors[k], v) for k, v in {**model, **own}.items())
    # the shared base is untouched: a second client's extension gives its own digest
    other = extend_body(base, {"protocol.masked": torch.zeros(7, dtype=torch.int64)}, chunk_bytes=chunk_bytes)
    assert other.sha256 != ext.sha256 and base.sha256 == encode_body(model, chunk_bytes=chunk_bytes).sha256
    with pytest.raises(WireError, match="already in the body"):
        extend_body(base, {"params": torch.zeros(1)})
