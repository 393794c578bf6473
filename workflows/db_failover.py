"""DatabaseFailover: playbook 4.2, "Database Failover", for a self-managed streaming standby.

check standby -> approve -> stop application -> fence old primary ->
promote standby -> repoint application -> start application -> verify a write.

The approval comes before the fence: stopping a primary that might still be
serving is the point of no return. The invariant throughout is one writable
primary: the old one is stopped and left with a standby.signal before the
standby is promoted.
"""

from datetime import timedelta

from pydantic import ValidationError
from temporalio import workflow
from temporalio.exceptions import ApplicationError

from models.errors import ErrorKind
from models.failover import (
    PROCEDURE,
    DatabaseFailoverInput,
    DatabaseFailoverResult,
    Fenced,
    FenceRequest,
    LagCheck,
    PromoteRequest,
    RepointRequest,
)
from models.platform import StartAppRequest
from workflows import _options as opt
from workflows import database_lock
from workflows._runbook import Runbook

with workflow.unsafe.imports_passed_through():
    from activities.platform import PlatformActivities
    from activities.playbook import PlaybookActivities
    from activities.rds import RdsActivities
    from activities.replication import ReplicationActivities


# Each path's steps, in order: the Web UI's "Step n/N" counts the path the run takes.
SELF_MANAGED_STEPS = (
    "check standby",
    "approve",
    "stop application",
    "fence old primary",
    "promote standby",
    "repoint application",
    "start application",
    "verify a write",
)
RDS_STEPS = tuple(s for s in SELF_MANAGED_STEPS if s != "fence old primary")  # promotion detaches the replica


@workflow.defn(name="DatabaseFailover", failure_exception_types=[ValidationError])
class DatabaseFailover(Runbook):
    STEPS = len(SELF_MANAGED_STEPS)  # until the target is known

    @workflow.run
    async def run(self, inp: DatabaseFailoverInput) -> DatabaseFailoverResult:
        """Promote the standby (self-managed) or the RDS read replica (module docstring: the steps); holds the
        database lock. StandbyLagging/StandbyDiverged refuse before anything changes; the approval comes
        before the old primary is fenced.
        """
        await self.prepare(inp.incident_id, PROCEDURE, inp.severity)
        objectives = await workflow.execute_activity_method(PlaybookActivities.objectives_for, PROCEDURE, **opt.quick())
        return await database_lock.holding(PROCEDURE, inp.incident_id, lambda: self._failover(inp, objectives))

    async def _failover(self, inp: DatabaseFailoverInput, objectives) -> DatabaseFailoverResult:
        started = inp.incident_started_at or workflow.info().start_time
        hb = inp.heartbeat_timeout

        rds = await workflow.execute_activity_method(RdsActivities.database_target, **opt.quick()) == "rds"
        self.steps.total = len(RDS_STEPS if rds else SELF_MANAGED_STEPS)
        lag = LagCheck(
            max_lag_bytes=inp.max_lag_bytes, max_lag_seconds=inp.max_lag.total_seconds(), override=inp.override_lag
        )
        before = await self.steps.run(
            "check standby",
            workflow.execute_activity_method(
                RdsActivities.check_rds_replica if rds else ReplicationActivities.check_standby,
                lag,
                summary="RDS replica and ReplicaLag" if rds else "replaying? lag? timeline?",
                **opt.quick(),
            ),
        )
        approval = await self.steps.run(
            "approve",
            self.gate.wait(
                "promote standby", inp.approval_timeout, unchanged="nothing was changed: the primary was not fenced"
            ),
            detail=f"Standby on timeline {before.timeline}, lag {before.lag_bytes} bytes / {before.lag_seconds}s, "
            f"primary {'reachable' if before.primary_reachable else 'unreachable'}. Approving fences the "
            "primary and promotes the standby.",
        )
        stopped = await self.stop_application(inp.incident_id, hb)
        if rds:  # promotion detaches the replica; the old RDS primary is not stopped by this runbook
            fenced = Fenced(was_running=False)
            promoted = await self.steps.run(
                "promote standby",
                workflow.execute_activity_method(
                    RdsActivities.promote_rds,
                    summary="aws rds promote-read-replica, wait available",
                    **opt.long_running(hb, timedelta(hours=1)),
                ),
            )
        else:
            fenced = await self.steps.run(
                "fence old primary",
                workflow.execute_activity_method(
                    ReplicationActivities.fence_primary,
                    FenceRequest(incident_id=inp.incident_id),
                    summary="stop it and leave standby.signal",
                    **opt.long_running(hb, timedelta(minutes=10)),
                ),
            )
            promoted = await self.steps.run(
                "promote standby",
                workflow.execute_activity_method(
                    ReplicationActivities.promote_standby,
                    PromoteRequest(final_lsn=fenced.final_lsn),
                    summary="catch up with the fenced primary, pg_promote()",
                    **opt.long_running(hb, timedelta(minutes=10)),
                ),
            )
        await self.steps.run(
            "repoint application",
            workflow.execute_activity_method(
                PlatformActivities.repoint_application,
                RepointRequest(incident_id=inp.incident_id, host=before.host, port=before.port),
                summary=f"database is now {before.host}:{before.port}",
                **opt.quick(),
            ),
        )
        await self.steps.run(
            "start application",
            workflow.execute_activity_method(
                PlatformActivities.start_application,
                StartAppRequest(incident_id=inp.incident_id, replicas=max(stopped.replicas_before, 1)),
                summary="start the application",
                **opt.long_running(hb, timedelta(minutes=30)),
            ),
        )
        write = await self.steps.run(
            "verify a write",
            workflow.execute_activity_method(
                PlatformActivities.check_write,
                summary="POST through the application",
                **opt.until_healthy(inp.app_ready_timeout),
            ),
        )
        if write.served_by_port != before.port:
            raise ApplicationError(
                f"the application wrote to the server on port {write.served_by_port}, not to the "
                f"promoted standby on {before.port}",
                type=ErrorKind.WrongServer,
                non_retryable=True,
            )
        rto = workflow.now() - started
        self.steps.finish(
            f"Failed over to {before.host}:{before.port} (timeline {promoted.timeline}); "
            f"lost {promoted.lost_bytes if promoted.lost_bytes is not None else 'unknown'} bytes."
        )
        return DatabaseFailoverResult(
            incident_id=inp.incident_id,
            before=before,
            fenced=fenced,
            promoted=promoted,
            write_check=write,
            approval=approval,
            steps=self.steps.completed,
            rto_target=objectives.rto,
            rpo_target=objectives.rpo,
            rto_actual=rto,
            failback=(
                "The old primary is stopped with a standby.signal. To fail back: rebuild it as a standby of "
                f"{before.host}:{before.port} (pg_rewind, else a fresh pg_basebackup), let it catch up, then "
                "run DatabaseFailover with the roles swapped in the worker settings."
            ),
        )
