"""Prometheus metrics: the Temporal SDK's (the worker's Runtime), runbook outcomes and RTO, and the
alert receiver's requests.

Runbook outcomes come from a workflow interceptor, not from the workflows' code: it records through
`workflow.metric_meter()`, which records nothing while a history replays and issues no command, so
it changes no workflow's history (nothing to patch). Every workflow type gets
`drp_workflow_outcomes{workflow_type, outcome, error_type, rto_met}`; a result that carries
`rto_actual` also feeds `drp_runbook_rto_seconds{workflow_type}`.
"""

import asyncio
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from temporalio import workflow
from temporalio.exceptions import ApplicationError, CancelledError, FailureError
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import (
    ExecuteWorkflowInput,
    Interceptor,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

OUTCOMES = "drp_workflow_outcomes"
RTO = "drp_runbook_rto_seconds"
_runtimes: dict[str, Runtime] = {}


def prometheus_runtime(bind_address: str) -> Runtime:
    """One SDK Runtime per process and address, serving GET /metrics on `bind_address`."""
    if bind_address not in _runtimes:
        _runtimes[bind_address] = Runtime(
            telemetry=TelemetryConfig(
                metrics=PrometheusConfig(
                    bind_address=bind_address, counters_total_suffix=True, durations_as_seconds=True
                )
            )
        )
    return _runtimes[bind_address]


class _RecordOutcome(WorkflowInboundInterceptor):
    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        try:
            result = await self.next.execute_workflow(input)
        except workflow.ContinueAsNewError:
            _record("continued_as_new")
            raise
        except (CancelledError, asyncio.CancelledError):
            _record("cancelled")
            raise
        except ApplicationError as err:
            _record("failed", err.type or "ApplicationError")
            raise
        except (FailureError, ValidationError) as err:  # a failed child/activity, a refused input
            _record("failed", type(err).__name__)
            raise
        # Anything else fails the workflow task (retried), not the run: no outcome yet.
        _record(str(getattr(result, "outcome", None) or "completed"), "", result)
        return result


def _record(outcome: str, error_type: str = "", result: Any = None) -> None:
    meter = workflow.metric_meter()
    rto, target = getattr(result, "rto_actual", None), getattr(result, "rto_target", None)
    met = (
        "unknown" if not isinstance(rto, timedelta) or not isinstance(target, timedelta) else str(rto <= target).lower()
    )
    meter.create_counter(OUTCOMES, "runs that ended, by workflow type and outcome").add(
        1, {"outcome": outcome, "error_type": error_type, "rto_met": met}
    )
    if isinstance(rto, timedelta):
        meter.create_histogram_float(RTO, "measured RTO of runbooks that recovered", "s").record(rto.total_seconds())


class RunbookMetricsInterceptor(Interceptor):
    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> type[WorkflowInboundInterceptor]:
        return _RecordOutcome
