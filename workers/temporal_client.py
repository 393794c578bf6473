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
"""

from collections.abc import Sequence
from typing import Any

import temporalio.api.common.v1
import temporalio.api.failure.v1
from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from temporalio.client import Client
from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.converter import DataConverter, DefaultFailureConverter, PayloadConverter
from temporalio.exceptions import ApplicationError, FailureError

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


data_converter = DataConverter(
    payload_converter_class=StrictPydanticPayloadConverter, failure_converter_class=FailureConverter
)


async def connect(address: str, namespace: str = "default") -> Client:
    return await Client.connect(address, namespace=namespace, data_converter=data_converter)
