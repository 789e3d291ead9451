"""The cryptographic primitives of secure aggregation, all from the ``cryptography`` package.

* key agreement: X25519 (RFC 7748); a shared secret is stretched with HKDF-SHA256
  (RFC 5869) under a label naming its purpose, the round and the two parties, so a key
  agreed for one purpose, round or pair is useless for any other;
* authenticated encryption of the secret shares: AES-256-GCM with associated data binding
  the ciphertext to (round, sender, recipient) — a share replayed into another round or
  handed to another recipient fails to decrypt;
* the PRG that expands a 32-byte seed into a mask over Z_{2^32}: AES-256 in CTR mode
  (keystream of 4 bytes per entry, read as little-endian uint32).
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat, NoEncryption

from fedloom.core.errors import ProtocolError

__all__ = [
    "KeyPair",
    "agree",
    "decrypt",
    "encrypt",
    "prg_uint32",
    "public_key_from_bytes",
]

PUBLIC_KEY_BYTES = 32
NONCE_BYTES = 12


class KeyPair:
    """An X25519 key pair; ``public`` is the 32-byte raw public key."""

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self._private = private or X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def private_bytes(self) -> bytes:
        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @classmethod
    def from_private_bytes(cls, data: bytes) -> KeyPair:
        if len(data) != 32:
            raise ProtocolError(f"an X25519 private key is 32 bytes, got {len(data)}")
        return cls(X25519PrivateKey.from_private_bytes(data))

    def exchange(self, peer_public: bytes) -> bytes:
        return self._private.exchange(public_key_from_bytes(peer_public))


def public_key_from_bytes(data: bytes) -> X25519PublicKey:
    if len(data) != PUBLIC_KEY_BYTES:
        raise ProtocolError(f"an X25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(data)}")
    return X25519PublicKey.from_public_bytes(data)


def agree(own: KeyPair, peer_public: bytes, *, label: str) -> bytes:
    """A 32-byte key both parties derive: HKDF-SHA256 of the X25519 secret, under ``label``."""
    try:
        shared = own.exchange(peer_public)
    except ValueError as exc:  # a low-order public key gives the all-zero secret
        raise ProtocolError(f"key agreement failed: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label.encode()).derive(shared)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: random 12-byte nonce ‖ ciphertext ‖ 16-byte tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """The plaintext of :func:`encrypt`'s ``blob``; :class:`ProtocolError` if forged, replayed or misdirected."""
    if len(blob) < NONCE_BYTES + 16:
        raise ProtocolError("ciphertext too short")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise ProtocolError("ciphertext does not authenticate (wrong key, round or recipient)") from None


def prg_uint32(seed: bytes, n: int) -> np.ndarray:
    """``n`` pseudo-random uint32 values from a 32-byte ``seed`` (AES-256-CTR keystream)."""
    if len(seed) != 32:
        raise ValueError("PRG seeds are 32 bytes")
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    stream = enc.update(bytes(4 * n)) + enc.finalize()
    return np.frombuffer(stream, dtype="<u4").copy()
