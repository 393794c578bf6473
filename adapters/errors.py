"""How adapters and activities raise what retrying cannot fix."""

from temporalio.exceptions import ApplicationError

from models.errors import ErrorKind


def refused(kind: ErrorKind, message: str) -> ApplicationError:
    """A non-retryable ApplicationError of `kind` whose message says what the operator can do."""
    return ApplicationError(message, type=kind, non_retryable=True)
