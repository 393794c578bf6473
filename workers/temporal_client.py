"""The Temporal client every process uses: one data converter (pydantic) everywhere.

Decoding is strict at the door: whatever goes wrong while turning a payload into
a model (a field pydantic refuses, a validator that raises something other than
ValueError, JSON that does not parse, an unknown encoding) comes out as a
pydantic `ValidationError`. Every workflow lists `ValidationError` in
`failure_exception_types`, so a bad input from the Web UI or `temporal workflow
start` fails the run at once with the reason, instead of failing its workflow
task over and over while the run shows Running with no step taken.

Failures say whether a retry can help: a `ValidationError` (a workflow, update,
signal or activity argument refused) becomes a non-retryable `ApplicationError` of
type `ValidationError`, so `temporal workflow update` and the Web UI do not report a
refused input as `retryable: true` — the same input can never pass.

`connect()` is the one place every process (worker, CLI, starters, alert receiver) gets its client:
namespace, TLS / API key (Temporal Cloud, secured clusters) and, when `encryption.enabled`, the AES-GCM
payload codec of workers/codec.py, all from the DRP_* settings (workers/deploy_settings.py).
"""

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import temporalio.api.common.v1
import temporalio.api.failure.v1
from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from temporalio.client import Client
from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.converter import DataConverter, DefaultFailureConverter, PayloadConverter
from temporalio.exceptions import ApplicationError, FailureError
from temporalio.service import TLSConfig

if TYPE_CHECKING:
    from workers.deploy_settings import EncryptionSettings
    from workers.settings import _DrpSettings

from models.errors import ErrorKind


class StrictPydanticPayloadConverter(PydanticPayloadConverter):
    """pydantic's converter; any decoding error is re-raised as a ValidationError."""

    def from_payloads(
        self, payloads: Sequence[temporalio.api.common.v1.Payload], type_hints: list[type] | None = None
    ) -> list[Any]:
        try:
            values = super().from_payloads(payloads, type_hints)
        except (ValidationError, FailureError):
            raise
        except Exception as err:  # noqa: BLE001 - every other decoding error is a bad input too
            raise as_validation_error(err, type_hints) from err
        for value, hint in zip(values, type_hints or [], strict=False):
            # Another encoding (binary/plain, protobuf) decodes without looking at the hint: hold it to the model.
            if isinstance(hint, type) and issubclass(hint, BaseModel) and not isinstance(value, hint):
                hint.model_validate(value)
        return values


def as_validation_error(err: BaseException, type_hints: list[type] | None = None) -> ValidationError:
    cause = err.__cause__ or err
    title = getattr((type_hints or [None])[0], "__name__", "input")
    return ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(
                type=PydanticCustomError("undecodable", "{reason}", {"reason": f"{type(cause).__name__}: {cause}"}),
                loc=(),
                input="<payload>",
            )
        ],
    )


class FailureConverter(DefaultFailureConverter):
    """Temporal's failure converter, with a pydantic `ValidationError` marked non-retryable."""

    def to_failure(
        self, exception: BaseException, payload_converter: PayloadConverter, failure: temporalio.api.failure.v1.Failure
    ) -> None:
        if isinstance(exception, ValidationError):
            refused = ApplicationError(str(exception), type=ErrorKind.ValidationError, non_retryable=True)
            refused.__traceback__ = exception.__traceback__
            exception = refused
        super().to_failure(exception, payload_converter, failure)


class EncodedFailureConverter(FailureConverter):
    """FailureConverter that moves failure messages and stack traces into an (encrypted) payload."""

    def __init__(self) -> None:
        super().__init__(encode_common_attributes=True)


data_converter = DataConverter(
    payload_converter_class=StrictPydanticPayloadConverter, failure_converter_class=FailureConverter
)


def build_data_converter(encryption: "EncryptionSettings | None" = None) -> DataConverter:
    """The data converter, with the AES-GCM codec when encryption is enabled (workers/codec.py)."""
    if encryption is None or not encryption.enabled:
        return data_converter
    from workers.codec import EncryptionCodec

    assert encryption.key_id is not None  # EncryptionSettings refuses `enabled` without a key_id
    return dataclasses.replace(
        data_converter,
        payload_codec=EncryptionCodec(encryption.key_bytes(), encryption.key_id),
        failure_converter_class=EncodedFailureConverter if encryption.encode_failures else FailureConverter,
    )


def tls_config(settings: "_DrpSettings") -> TLSConfig | bool | None:
    """TLSConfig from `temporal_tls` (files read here, once); None lets the SDK decide (TLS with an API key)."""
    t = settings.temporal_tls
    if t is None:
        return None
    if not t.enabled:
        return False

    def read(name: str, path) -> bytes | None:
        try:
            return path.read_bytes() if path else None
        except OSError as err:
            raise ValueError(f"temporal_tls.{name}: cannot read {path}: {err.strerror}") from err

    return TLSConfig(
        server_root_ca_cert=read("server_ca_cert", t.server_ca_cert),
        domain=t.server_name,
        client_cert=read("client_cert", t.client_cert),
        client_private_key=read("client_key", t.client_key),
    )


def connect_options(settings: "_DrpSettings") -> dict[str, Any]:
    """Client.connect's keyword arguments for these settings (namespace, TLS, API key, data converter)."""
    return {
        "namespace": settings.temporal_namespace,
        "tls": tls_config(settings),
        "api_key": settings.temporal_api_key.get_secret_value() if settings.temporal_api_key else None,
        "data_converter": build_data_converter(settings.encryption),
    }


async def connect(
    address: str | None = None,
    namespace: str | None = None,
    *,
    settings: "_DrpSettings | None" = None,
    metrics: bool = False,
) -> Client:
    """The one way every process connects: namespace, TLS / API key and payload encryption from
    `settings` (default: read from DRP_* / DRP_SETTINGS_FILE). `address`/`namespace` override the
    settings'. `metrics`: serve the SDK's Prometheus metrics on `metrics.worker_bind_address` (the worker)."""
    if settings is None:
        from workers.settings import TemporalSettings

        settings = TemporalSettings()
    options = connect_options(settings)
    if namespace is not None:
        options["namespace"] = namespace
    if metrics and settings.metrics.worker_bind_address:
        from workers.metrics import prometheus_runtime

        options["runtime"] = prometheus_runtime(settings.metrics.worker_bind_address)
    return await Client.connect(address or settings.temporal_address, **options)
