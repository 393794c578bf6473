"""Timeouts and retry policies for every activity the runbooks call.

One place, so a reviewer sees at a glance how long a step may take and what
is retried. Long steps heartbeat: the heartbeat timeout, not the
start-to-close timeout, is what notices a dead worker quickly.
"""

from datetime import timedelta

from temporalio.common import RetryPolicy

from models.errors import NON_RETRYABLE

# Errors that retrying cannot fix are raised as non-retryable ApplicationErrors where they happen; the retry
# policies refuse them again (every ErrorKind but the transient ones), so a mistake at a raise site cannot
# turn an operator error into an endless retry loop.
__all__ = ["NON_RETRYABLE", "RETRY", "bounded", "long_running", "quick", "until_healthy"]

# Long steps: an attempt ends by its heartbeat timeout (a dead worker) or start-to-close limit; ten attempts
# with backoff (about 4 minutes of waiting in all) ride out worker restarts and short outages, and an error
# that keeps coming back fails the run with that error instead of retrying for as long as the limit allows.
RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=10,
    non_retryable_error_types=NON_RETRYABLE,
)


QUICK_LIMIT = timedelta(minutes=2)


def quick(*, heartbeat: timedelta | None = None) -> dict:
    """Reads and small changes: seconds each, a few tries. None of them heartbeats today, so none has a
    heartbeat timeout (a heartbeat timeout on an activity that never heartbeats fails every attempt
    that outlives it). One that heartbeats passes `heartbeat`, shorter than the two-minute limit so it
    notices a dead worker before the limit does."""
    options = {
        "start_to_close_timeout": QUICK_LIMIT,
        "retry_policy": RetryPolicy(
            initial_interval=timedelta(seconds=1), maximum_attempts=5, non_retryable_error_types=NON_RETRYABLE
        ),
    }
    if heartbeat is not None:
        if heartbeat >= QUICK_LIMIT:
            raise ValueError(f"a quick activity's heartbeat timeout must be shorter than {QUICK_LIMIT}")
        options["heartbeat_timeout"] = heartbeat
    return options


def long_running(heartbeat: timedelta, limit: timedelta = timedelta(hours=6)) -> dict:
    """Restores, replays, backups, scans: heartbeat-driven, retried until the limit."""
    return {"start_to_close_timeout": limit, "heartbeat_timeout": heartbeat, "retry_policy": RETRY}


def bounded(heartbeat: timedelta, limit: timedelta) -> dict:
    """A long step that may fail without failing the run: heartbeat-driven, retried for `limit` in all."""
    return {"schedule_to_close_timeout": limit, "heartbeat_timeout": heartbeat, "retry_policy": RETRY}


def until_healthy(deadline: timedelta) -> dict:
    """Polling the application after a start: retried every few seconds until the deadline."""
    return {
        "schedule_to_close_timeout": deadline,
        "start_to_close_timeout": timedelta(seconds=30),
        "retry_policy": RetryPolicy(
            initial_interval=timedelta(seconds=1), backoff_coefficient=1.5, maximum_interval=timedelta(seconds=5)
        ),
    }
