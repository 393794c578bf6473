"""DatabaseFailback: the paired way home after DatabaseFailover.

rejoin the old primary as a standby of the new one (pg_rewind, else a fresh
base backup) -> wait until it has caught up -> approve -> stop application ->
fence the current primary -> promote the old one -> repoint, start, verify a
write -> rejoin the former standby as a standby again. The original topology
is back at the end, with everything written in between.
"""

from datetime import timedelta

from pydantic import ValidationError
from temporalio import workflow
from temporalio.exceptions import ApplicationError

from models.errors import ErrorKind
from models.failover import (
    FAILBACK,
    DatabaseFailbackInput,
    DatabaseFailbackResult,
    FenceRequest,
    LagCheck,
    PromoteRequest,
    RejoinRequest,
    RepointRequest,
)
from models.platform import StartAppRequest
from workflows import _options as opt
from workflows import database_lock
from workflows._runbook import Runbook

with workflow.unsafe.imports_passed_through():
    from activities.platform import PlatformActivities
    from activities.replication import ReplicationActivities


@workflow.defn(name="DatabaseFailback", failure_exception_types=[ValidationError])
class DatabaseFailback(Runbook):
    STEPS = 9

    @workflow.run
    async def run(self, inp: DatabaseFailbackInput) -> DatabaseFailbackResult:
        """Return to the original primary after DatabaseFailover (module docstring: the steps); holds the
        database lock. ApprovalTimeout/ApprovalRejected before the fence change nothing.
        """
        await self.prepare(inp.incident_id, FAILBACK, inp.severity)
        return await database_lock.holding(FAILBACK, inp.incident_id, lambda: self._failback(inp))

    async def _failback(self, inp: DatabaseFailbackInput) -> DatabaseFailbackResult:
        hb = inp.heartbeat_timeout
        rejoined = await self.steps.run(
            "rejoin old primary as standby",
            workflow.execute_activity_method(
                ReplicationActivities.rejoin_as_standby,
                RejoinRequest(incident_id=inp.incident_id, server="primary", source="standby"),
                summary="pg_rewind, else pg_basebackup",
                **opt.long_running(hb),
            ),
        )
        status = await self.steps.run("wait for catch-up", self._caught_up(inp))
        approval = await self.steps.run(
            "approve",
            self.gate.wait("switch back", inp.approval_timeout, unchanged="the current primary keeps serving"),
            detail=f"The old primary streams from the current one, {status.lag_bytes} bytes behind. Approving "
            "fences the current primary and promotes the old one.",
        )
        stopped = await self.stop_application(inp.incident_id, hb)
        fenced = await self.steps.run(
            "fence current primary",
            workflow.execute_activity_method(
                ReplicationActivities.fence_primary,
                FenceRequest(incident_id=inp.incident_id, server="standby"),
                **opt.long_running(hb, timedelta(minutes=10)),
            ),
        )
        promoted = await self.steps.run(
            "promote old primary",
            workflow.execute_activity_method(
                ReplicationActivities.promote_standby,
                PromoteRequest(
                    server="primary",
                    final_lsn=fenced.final_lsn,
                    synchronous_standby_names=rejoined.synchronous_standby_names,
                ),
                **opt.long_running(hb, timedelta(minutes=10)),
            ),
        )
        await self.steps.run("repoint and start application", self._repoint_and_start(inp, status, stopped))
        write = await self.steps.run(
            "verify a write",
            workflow.execute_activity_method(
                PlatformActivities.check_write, **opt.until_healthy(inp.app_ready_timeout)
            ),
        )
        if write.served_by_port != status.port:
            raise ApplicationError(
                f"the application wrote to port {write.served_by_port}, not to the original primary on {status.port}",
                type=ErrorKind.WrongServer,
                non_retryable=True,
            )
        standby = await self.steps.run(
            "rejoin former standby",
            workflow.execute_activity_method(
                ReplicationActivities.rejoin_as_standby,
                RejoinRequest(
                    incident_id=inp.incident_id,
                    server="standby",
                    source="primary",
                    restore_synchronous_standby_names=promoted.synchronous_paused,
                ),
                **opt.long_running(hb),
            ),
        )
        self.steps.finish(
            "Original topology restored: primary serves, standby streams from it."
            + (f" {standby.synchronous}." if standby.synchronous else "")
        )
        return DatabaseFailbackResult(
            incident_id=inp.incident_id,
            rejoined_old_primary=rejoined,
            fenced=fenced,
            promoted=promoted,
            write_check=write,
            rejoined_standby=standby,
            approval=approval,
            steps=self.steps.completed,
        )

    async def _caught_up(self, inp: DatabaseFailbackInput):
        return await workflow.execute_activity_method(
            ReplicationActivities.await_catch_up,
            LagCheck(max_lag_bytes=inp.max_lag_bytes, max_lag_seconds=3600, replica="primary"),
            summary="the old primary within max_lag_bytes of the current one",
            **opt.long_running(inp.heartbeat_timeout, inp.catch_up_timeout),
        )

    async def _repoint_and_start(self, inp: DatabaseFailbackInput, status, stopped) -> None:
        await workflow.execute_activity_method(
            PlatformActivities.repoint_application,
            RepointRequest(incident_id=inp.incident_id, host=status.host, port=status.port),
            **opt.quick(),
        )
        await workflow.execute_activity_method(
            PlatformActivities.start_application,
            StartAppRequest(incident_id=inp.incident_id, replicas=max(stopped.replicas_before, 1)),
            **opt.long_running(inp.heartbeat_timeout, timedelta(minutes=30)),
        )
