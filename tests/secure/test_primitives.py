"""Shamir sharing, the crypto helpers, quantization bounds and the SecAgg+ graph, by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.core.errors import ConfigError, ProtocolError
from fedloom.secure import shamir
from fedloom.secure.crypto import KeyPair, agree, decrypt, encrypt, prg_uint32
from fedloom.secure.encoding import QuantizationPlan
from fedloom.secure.graph import neighbours


def test_shamir_any_t_of_n_shares_recover_the_secret_and_fewer_are_refused() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    for subset in itertools.combinations(shares, 3):
        assert shamir.reconstruct({x: shares[x] for x in subset}, 3) == secret
    with pytest.raises(ProtocolError, match="2 shares < threshold 3"):
        shamir.reconstruct({1: shares[1], 2: shares[2]}, 3)


def test_shamir_by_hand_degree_one() -> None:
    # f(x) = s + a x: the shares at 1 and 2 are s + a and s + 2a, so s = 2 f(1) - f(2).
    s = int.from_bytes(b"\x07" * 32, "big")
    shares = {1: (s + 11) % shamir.PRIME, 2: (s + 22) % shamir.PRIME}
    assert shamir.reconstruct(shares, 2) == b"\x07" * 32


def test_a_corrupted_share_gives_a_different_secret_or_a_refusal() -> None:
    secret = b"\x01" * 32
    shares = shamir.split(secret, [1, 2, 3], 3)
    shares[2] = (shares[2] + 1) % shamir.PRIME
    try:
        assert shamir.reconstruct(shares, 3) != secret
    except ProtocolError:
        pass
    with pytest.raises(ProtocolError, match="66 bytes"):
        shamir.share_from_bytes(b"\0" * 65)
    with pytest.raises(ProtocolError, match="outside the field"):
        shamir.share_from_bytes(b"\xff" * 66)


def test_both_parties_agree_on_the_key_and_labels_separate_purposes() -> None:
    a, b = KeyPair(), KeyPair()
    assert agree(a, b.public, label="x") == agree(b, a.public, label="x")
    assert agree(a, b.public, label="x") != agree(a, b.public, label="y")
    assert KeyPair.from_private_bytes(a.private_bytes()).public == a.public


def test_aes_gcm_refuses_another_key_round_or_recipient() -> None:
    k1, k2 = b"\x01" * 32, b"\x02" * 32
    blob = encrypt(k1, b"share", b"round 1 a->b")
    assert decrypt(k1, blob, b"round 1 a->b") == b"share"
    for key, aad in ((k2, b"round 1 a->b"), (k1, b"round 2 a->b"), (k1, b"round 1 a->c")):
        with pytest.raises(ProtocolError, match="does not authenticate"):
            decrypt(key, blob, aad)
    with pytest.raises(ProtocolError, match="too short"):
        decrypt(k1, b"abc", b"")


def test_prg_is_a_deterministic_function_of_the_seed() -> None:
    a = prg_uint32(b"\x05" * 32, 1000)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    assert np.array_equal(a, prg_uint32(b"\x05" * 32, 1000))
    assert np.array_equal(a[:10], prg_uint32(b"\x05" * 32, 10))  # a stream: prefixes agree
    assert not np.array_equal(a, prg_uint32(b"\x06" * 32, 1000))


def test_quantization_levels_by_hand() -> None:
    plan = QuantizationPlan(bits=2, modulus_bits=8, clip=1.0)  # 4 levels: -1, -1/3, 1/3, 1
    assert plan.step == pytest.approx(2 / 3)
    assert plan.max_clients == 255 // 3
    x = torch.tensor([-5.0, -1.0, 1.0, 5.0, 1 / 3])
    q = plan.quantize(x, torch.Generator().manual_seed(0))
    assert q.tolist() == [0, 0, 3, 3, 2]  # clipped ends and an exact level never round
    assert plan.decode_sum(q, 1).tolist() == pytest.approx([-1, -1, 1, 1, 1 / 3])


def test_stochastic_rounding_is_unbiased() -> None:
    plan = QuantizationPlan(bits=1, modulus_bits=8, clip=1.0)  # levels -1 and 1
    x = torch.full((200_000,), 0.5)
    q = plan.quantize(x, torch.Generator().manual_seed(1))
    mean = float(plan.decode_sum(q, 1).mean())
    # each entry is ±1 with P(1) = 0.75: sd 0.866, so the mean's sd is 0.866 / sqrt(200000) = 0.0019
    assert abs(mean - 0.5) < 6 * 0.866 / math.sqrt(200_000)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), bits=st.integers(2, 20), seed=st.integers(0, 1000), scale=st.sampled_from([1.0, 7.0, 1000.0]))
def test_sum_of_quantized_inputs_is_within_the_stated_bound(n: int, bits: int, seed: int, scale: float) -> None:
    plan = QuantizationPlan(bits=bits, modulus_bits=32, clip=0.5, scale=scale)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(64, generator=g, dtype=torch.float64) * scale * 0.4 for _ in range(n)]
    total = np.zeros(64, dtype=np.int64)
    for x in xs:
        total += plan.quantize(x, g)
    plain = sum((x / scale).clamp(-0.5, 0.5) * scale for x in xs)
    err = (plan.decode_sum(total, n) - plain).abs().max().item()
    assert err <= plan.sum_error_bound(n) + 1e-9 * scale


def test_plan_refuses_bad_options() -> None:
    with pytest.raises(ConfigError, match="modulus_bits"):
        QuantizationPlan(modulus_bits=40)
    with pytest.raises(ConfigError, match="bits"):
        QuantizationPlan(bits=32, modulus_bits=32)
    with pytest.raises(ConfigError, match="clip"):
        QuantizationPlan(clip=0.0)


def test_wire_round_trip_keeps_the_bits() -> None:
    for k in (12, 16, 24, 32):
        plan = QuantizationPlan(bits=4, modulus_bits=k)
        y = prg_uint32(b"\x09" * 32, 100)
        t = plan.to_wire(y)
        assert t.dtype == (torch.int16 if k <= 16 else torch.int32)
        assert np.array_equal(plan.from_wire(t), y & np.uint32((1 << k) - 1))


def test_harary_graph_is_k_regular_symmetric_and_complete_when_k_is_large() -> None:
    clients = [f"c{i:02d}" for i in range(20)]
    g = neighbours(clients, 6, seed=3)
    assert all(len(v) == 6 and c not in v for c, v in g.items())
    assert all(c in g[v] for c, nb in g.items() for v in nb)
    assert g == neighbours(list(reversed(clients)), 6, seed=3)  # the order of the cohort does not matter
    assert g != neighbours(clients, 6, seed=4)
    full = neighbours(clients, None, seed=0)
    assert all(len(v) == 19 for v in full.values())
    assert neighbours(clients, 19, seed=0) == full
    with pytest.raises(ValueError, match="even"):
        neighbours(clients, 5, seed=0)
