"""AES-GCM payload encryption: what Temporal stores of inputs, results, signals, updates, queries,
heartbeats and (optionally) failure messages is ciphertext.

Each payload is serialised whole (metadata and data) and encrypted with the current key; the new
payload says `encoding: binary/encrypted` and which key (`encryption-key-id`). The key id is also the
AES-GCM associated data, so a payload relabelled with another id fails authentication instead of
decrypting under the wrong name. Decoding accepts every configured key id (rotation) and passes
payloads without that encoding through unchanged (histories from before encryption was turned on).
"""

import os
from collections.abc import Iterable, Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
NONCE_SIZE = 12


class PayloadDecryptionError(ValueError):
    """A payload this process cannot decrypt: the message says which key id and what to do."""


class UnknownEncryptionKey(PayloadDecryptionError):
    pass


class EncryptionCodec(PayloadCodec):
    def __init__(self, keys: Mapping[str, bytes], key_id: str) -> None:
        if key_id not in keys:
            raise ValueError(f"current key id {key_id!r} is not among the keys ({', '.join(sorted(keys))})")
        self.key_id = key_id
        self._ciphers = {kid: AESGCM(key) for kid, key in keys.items()}

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(p) for p in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        nonce = os.urandom(NONCE_SIZE)
        sealed = self._ciphers[self.key_id].encrypt(nonce, payload.SerializeToString(), self.key_id.encode())
        return Payload(metadata={"encoding": ENCODING, KEY_ID: self.key_id.encode()}, data=nonce + sealed)

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # never encrypted: written before encryption was on, or by a process without it
        key_id = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise UnknownEncryptionKey(
                f"payload encrypted with key id {key_id!r}, which this process does not have (it has: "
                f"{', '.join(sorted(self._ciphers))}): add that key to encryption.keys to read it"
            )
        try:
            return Payload.FromString(
                cipher.decrypt(payload.data[:NONCE_SIZE], payload.data[NONCE_SIZE:], key_id.encode())
            )
        except InvalidTag as err:
            raise PayloadDecryptionError(
                f"payload with key id {key_id!r} does not authenticate: the key configured under that id is "
                "not the one it was encrypted with, or the payload was altered"
            ) from err


def key_ids(payloads: Iterable[Payload]) -> set[str]:
    return {p.metadata[KEY_ID].decode() for p in payloads if p.metadata.get("encoding") == ENCODING}
