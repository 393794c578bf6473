"""Settings of a production deployment: how to reach a secured Temporal (mTLS, API key), payload
encryption keys, the codec server, metrics.

Embedded in every process's settings (`workers/settings.py`, `_DrpSettings`), so the worker, the CLI,
the starters, the alert receiver and the codec server read them from the same DRP_* variables or
settings file. Secrets (API key, encryption keys, codec token) are SecretStr and errors never echo an
input (`hide_input_in_errors`): a mistyped key is named by its id, never printed.
"""

import base64
import binascii
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr, field_validator, model_validator

AES_KEY_SIZES = (16, 24, 32)


class _Secretive(BaseModel):
    model_config = ConfigDict(hide_input_in_errors=True, extra="forbid")


class TemporalTlsSettings(_Secretive):
    """TLS to the Temporal frontend (Temporal Cloud, a secured self-hosted cluster).

    `client_cert` + `client_key`: mTLS (both or neither). `server_ca_cert`: a private CA (else the
    system's roots). `server_name`: the name the server's certificate is checked against and sent as SNI
    (when the address is an IP or a load balancer's name)."""

    enabled: bool = True
    client_cert: Path | None = None
    client_key: Path | None = None
    server_ca_cert: Path | None = None
    server_name: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> "TemporalTlsSettings":
        if (self.client_cert is None) != (self.client_key is None):
            have, missing = ("client_cert", "client_key") if self.client_key is None else ("client_key", "client_cert")
            raise ValueError(
                f"temporal_tls.{have} is set but temporal_tls.{missing} is not: mTLS needs the "
                f"certificate and its private key (DRP_TEMPORAL_TLS__{missing.upper()})"
            )
        return self


class EncryptionSettings(_Secretive):
    """AES-GCM payload encryption (workers/codec.py).

    `keys`: key id -> base64 of a 16, 24 or 32-byte AES key. New payloads are encrypted with `key_id`;
    payloads of any id in `keys` decrypt (rotation: add the new key, make it `key_id`, keep the old one
    until no history that needs it is retained). Payloads that were never encrypted still decode, so
    turning this on does not break running workflows. `encode_failures`: failure messages and stack
    traces are encrypted too (Temporal's `encode_common_attributes`)."""

    enabled: bool = False
    key_id: str | None = None
    keys: dict[str, SecretStr] = {}
    encode_failures: bool = True

    @field_validator("keys")
    @classmethod
    def _aes_keys(cls, keys: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for key_id, key in keys.items():
            decode_key(key_id, key)
        return keys

    @model_validator(mode="after")
    def _current_key(self) -> "EncryptionSettings":
        if self.enabled and (self.key_id is None or self.key_id not in self.keys):
            known = ", ".join(sorted(self.keys)) or "none"
            raise ValueError(
                f"encryption.key_id {self.key_id!r} is not in encryption.keys (ids: {known}): "
                "new payloads need a current key"
            )
        return self

    def key_bytes(self) -> dict[str, bytes]:
        return {key_id: decode_key(key_id, key) for key_id, key in self.keys.items()}


def decode_key(key_id: str, key: SecretStr) -> bytes:
    try:
        raw = base64.b64decode(key.get_secret_value(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) not in AES_KEY_SIZES:
        raise ValueError(
            f"encryption.keys[{key_id}] is not the base64 of a 16, 24 or 32-byte AES key "
            "(make one: python -c 'import os,base64; print(base64.b64encode(os.urandom(32)).decode())')"
        )
    return raw


class CodecServerSettings(_Secretive):
    """`drp codec serve`: the Web UI's codec endpoint (POST /encode, /decode).

    Every POST needs `Authorization: Bearer <bearer_token>`. `cors_origins`: the Web UI origins a browser
    may call it from. `namespaces`: the X-Namespace values it serves (empty: `temporal_namespace` only)."""

    host: str = "127.0.0.1"
    port: int = 8888
    bearer_token: SecretStr | None = None  # required by `drp codec serve`
    cors_origins: list[str] = ["http://localhost:8233"]
    namespaces: list[str] = []


class MetricsSettings(BaseModel):
    """Prometheus metrics. `worker_bind_address` (e.g. 0.0.0.0:9464): the worker's Temporal SDK runtime
    serves /metrics there (SDK metrics and the runbook outcome/RTO metrics). The alert receiver serves
    its own /metrics on its port."""

    worker_bind_address: str | None = None
