"""RegionFailover: playbook 4.1 (scripts/failover-to-backup.sh) as a durable runbook.

plan (check everything exists) -> verify the primary region is down ->
replica lag -> approve -> promote the RDS replica -> switch DNS -> scale the
backup region -> verify it -> notify.

Steps from the promotion on run on the backup region's task queue: the primary
region's workers may be gone with the region. Every step is idempotent, so a
re-run after a crash finds the replica promoted or the record switched and
moves on.

Everything that can be checked before the first change is checked in the plan
(the record is in the zone, the replica or standby exists), so those refusals
change nothing. Every change is a recorded step with its timing; a run that
fails after a change fails with the original error type and, in its message and
details (`FailoverHalted`), what was done, what was not, where production is and
the command that goes on (and the one that goes back).
"""

from datetime import timedelta

from pydantic import ValidationError
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

from models.errors import ErrorKind
from models.failover import FenceRequest, LagCheck, PromoteRequest
from models.region import (
    PROCEDURE,
    FailoverHalted,
    LagRequest,
    PrimaryCheck,
    RegionFailoverInput,
    RegionFailoverResult,
    RegionRequest,
)
from workflows import _options as opt
from workflows import database_lock
from workflows._runbook import Runbook

with workflow.unsafe.imports_passed_through():
    from activities.playbook import PlaybookActivities
    from activities.region import RegionActivities
    from activities.replication import ReplicationActivities


# The self-managed path's fence became a recorded step ("fence old primary"): runs started before it
# replay without the step's progress signal.
FENCE_STEP = "region-failover-fence-step"
# The self-managed path took the database lock: runs started before replay without it.
REGION_LOCK = "region-failover-database-lock"


@workflow.defn(name="RegionFailover", failure_exception_types=[ValidationError])
class RegionFailover(Runbook):
    STEPS = 9

    @workflow.run
    async def run(self, inp: RegionFailoverInput) -> RegionFailoverResult:
        """Fail over to the backup region (module docstring: the steps). PrimaryHealthy/ReplicaLagging refuse
        before anything changes; a failure after a change says what was done (FailoverHalted).
        """
        await self.prepare(inp.incident_id, PROCEDURE, inp.severity)
        started = inp.incident_started_at or workflow.info().start_time
        objectives = await workflow.execute_activity_method(PlaybookActivities.objectives_for, PROCEDURE, **opt.quick())
        plan = await self.steps.run(
            "plan",
            workflow.execute_activity_method(
                RegionActivities.plan_region_failover, inp, summary="everything to change exists", **opt.quick()
            ),
        )
        # The self-managed path fences and promotes this cluster's own servers: it holds the database lock
        # (refused with DatabaseBusy, nothing changed, while a corruption recovery, a deletion recovery or a
        # DatabaseFailover/Failback of the cluster runs). The RDS path changes RDS instances, not this cluster.
        lock = None
        if plan.database != "rds" and workflow.patched(REGION_LOCK):
            lock = await database_lock.acquire(PROCEDURE, inp.incident_id)
        try:
            return await self._fail_over(inp, plan, started, objectives)
        finally:
            await database_lock.release(lock)

    async def _fail_over(self, inp: RegionFailoverInput, plan, started, objectives) -> RegionFailoverResult:
        hb = inp.heartbeat_timeout
        checks = PrimaryCheck(
            url=plan.primary_health_url,
            checks=inp.health_checks,
            spacing_seconds=inp.health_check_spacing.total_seconds(),
        )
        await self.steps.run(
            "verify primary is down",
            workflow.execute_activity_method(
                RegionActivities.verify_primary_down,
                checks,
                summary=f"{checks.checks} checks of {checks.url}",
                **opt.long_running(max(hb, inp.health_check_spacing * 2), timedelta(minutes=30)),
            ),
        )
        lag = await self.steps.run("check replica lag", self._replica_lag(inp, plan))
        approval = await self.steps.run(
            "approve",
            self.gate.wait("fail over", inp.approval_timeout, unchanged="nothing was changed"),
            detail=("" if plan.database == "rds" else "Will fence the old primary. ")
            + f"Will promote {plan.replica_id} in {plan.backup_region} (lag {lag}s), point {plan.record_name} "
            f"at {plan.new_target}, scale {plan.deployment} to {plan.replicas}.",
        )

        backup = {"task_queue": plan.task_queue}
        region = RegionRequest(incident_id=inp.incident_id, region=plan.backup_region)
        promoted = promoted_standby = fenced = None
        rds = plan.database == "rds"
        changes = ([] if rds else ["fence old primary"]) + [
            "promote replica",
            "switch DNS",
            "scale backup region",
            "verify backup region",
            "notify",
        ]
        done: list[tuple[str, str]] = []  # (step, what it changed, with its timing)
        step = changes[0]
        try:
            if rds:
                promoted = await self.steps.run(
                    step,
                    workflow.execute_activity_method(
                        RegionActivities.promote_rds_replica,
                        region,
                        summary=f"promote {plan.replica_id}",
                        **backup,
                        **opt.long_running(hb, timedelta(hours=1)),
                    ),
                )
                done.append(
                    self._timed(
                        step,
                        f"RDS replica {plan.replica_id} in {plan.backup_region} promoted to a "
                        "standalone writable instance",
                    )
                )
            else:  # self-managed: fence what is left of the primary, promote the standby (DatabaseFailover's steps)
                fence = workflow.execute_activity_method(
                    ReplicationActivities.fence_primary,
                    FenceRequest(incident_id=inp.incident_id),
                    **backup,
                    summary="fence the old primary",
                    **opt.long_running(hb, timedelta(minutes=10)),
                )
                if workflow.patched(FENCE_STEP):
                    self.steps.total += 1
                    fenced = await self.steps.run(step, fence, detail="stop it and leave standby.signal")
                else:
                    fenced = await fence
                done.append(
                    self._timed(
                        step,
                        "old primary stopped and fenced (standby.signal: it comes back read-only)"
                        if fenced.was_running
                        else "old primary (already down) fenced with standby.signal",
                    )
                )
                step = "promote replica"
                promoted_standby = await self.steps.run(
                    step,
                    workflow.execute_activity_method(
                        ReplicationActivities.promote_standby,
                        PromoteRequest(final_lsn=fenced.final_lsn),
                        summary="promote the standby",
                        **backup,
                        **opt.long_running(hb, timedelta(minutes=10)),
                    ),
                )
                done.append(
                    self._timed(
                        step, f"{plan.replica_id} promoted: the primary now (timeline {promoted_standby.timeline})"
                    )
                )
            step = "switch DNS"
            dns = await self.steps.run(
                step,
                workflow.execute_activity_method(
                    RegionActivities.switch_dns,
                    region,
                    summary=f"{plan.record_name} -> {plan.new_target}",
                    **backup,
                    **opt.long_running(hb, timedelta(minutes=30)),
                ),
            )
            done.append(self._timed(step, f"{plan.record_name} points at {plan.new_target}"))
            step = "scale backup region"
            await self.steps.run(
                step,
                workflow.execute_activity_method(
                    RegionActivities.scale_region,
                    region,
                    summary=f"{plan.deployment} to {plan.replicas}",
                    **backup,
                    **opt.long_running(hb, timedelta(minutes=30)),
                ),
            )
            done.append(self._timed(step, f"{plan.deployment} in {plan.backup_region} scaled to {plan.replicas}"))
            step = "verify backup region"
            await self.steps.run(
                step,
                workflow.execute_activity_method(
                    RegionActivities.check_region_health,
                    region,
                    summary=plan.health_url,
                    **backup,
                    **opt.until_healthy(inp.ready_timeout),
                ),
            )
            rto = workflow.now() - started
            step = "notify"
            notified = await self.steps.run(
                step,
                workflow.execute_activity_method(
                    RegionActivities.notify_failover, region, summary="SNS", **backup, **opt.quick()
                ),
            )
        except ActivityError as err:
            raise self._halted(inp, plan, step, err, done, changes) from None
        self.steps.finish(f"Serving from {plan.backup_region}; RTO {rto}.")
        return RegionFailoverResult(
            incident_id=inp.incident_id,
            plan=plan,
            replica_lag_seconds=lag,
            promoted=promoted,
            promoted_standby=promoted_standby,
            fenced=fenced,
            dns=dns,
            notified=notified,
            approval=approval,
            steps=self.steps.completed,
            rto_target=objectives.rto,
            rto_actual=rto,
            failback=(
                f"Once the primary region is back: RegionFailback with serving_region={plan.backup_region!r} "
                f"(python -m starters.region_failback --incident {inp.incident_id} --serving-region "
                f"{plan.backup_region})"
                if plan.database == "rds"
                else f"Once the primary region is back: DatabaseFailback (python -m starters.db_failback --incident "
                f"{inp.incident_id}) rewinds the old primary and switches the database back; then point DNS "
                "home."
            ),
        )

    def _timed(self, step: str, what: str) -> tuple[str, str]:
        record = next((r for r in reversed(self.steps.completed) if r.name == step), None)
        return step, (
            what if record is None else f"{what} ({step}, {_hms(record.started_at)}-{_hms(record.ended_at)} UTC)"
        )

    def _halted(
        self,
        inp: RegionFailoverInput,
        plan,
        step: str,
        err: ActivityError,
        done: list[tuple[str, str]],
        changes: list[str],
    ) -> ApplicationError:
        """The run failed after `done`: say what was and was not done, where production is, what next."""
        rds = plan.database == "rds"
        names = {name for name, _ in done}
        fenced, promoted, switched = "fence old primary" in names, "promote replica" in names, "switch DNS" in names
        if rds:
            database = (
                f"RDS instance {plan.replica_id} in {plan.backup_region} is promoted and writable"
                if promoted
                else f"RDS replica {plan.replica_id} is still a replica (if the promotion was "
                "cut off, describe-db-instances shows where it stands)"
            )
        else:
            database = ("the old primary is stopped and fenced; " if fenced else "") + (
                f"{plan.replica_id} is the primary" if promoted else f"{plan.replica_id} is still a standby"
            )
        production = (
            f"{database}; {plan.record_name} "
            + (f"points at {plan.new_target}" if switched else "still points at the primary region")
            + (
                ""
                if "scale backup region" in names
                else f"; {plan.deployment} in {plan.backup_region} is not scaled up"
            )
        )
        next_command = (
            f"fix the cause, then python -m starters.region_failover --incident {inp.incident_id} "
            f"--backup-region {plan.backup_region} (a re-run finds the done steps done and goes on)"
        )
        way_back = None
        if fenced and promoted:
            way_back = (
                f"python -m starters.db_failback --incident {inp.incident_id} rewinds the fenced primary and "
                "makes it the primary again" + (f"; then point {plan.record_name} home" if switched else "")
            )
        elif fenced:  # nothing was promoted: the old primary's data is whole
            way_back = "remove standby.signal from the old primary's data directory and start it"
        return halted_error(
            PROCEDURE,
            inp.incident_id,
            step,
            err,
            [what for _, what in done],
            changes[changes.index(step) :],
            production,
            next_command,
            way_back,
            self.steps.completed,
        )

    async def _replica_lag(self, inp: RegionFailoverInput, plan) -> float | None:
        if plan.database == "rds":
            return await workflow.execute_activity_method(
                RegionActivities.replica_lag,
                LagRequest(
                    region=plan.backup_region,
                    replica_id=plan.replica_id,
                    max_lag_seconds=plan.max_lag_seconds,
                    override=inp.override_lag,
                ),
                summary="CloudWatch ReplicaLag",
                **opt.quick(),
            )
        status = await workflow.execute_activity_method(
            ReplicationActivities.check_standby,
            LagCheck(max_lag_bytes=2**63 - 1, max_lag_seconds=plan.max_lag_seconds, override=inp.override_lag),
            summary="standby replay lag",
            **opt.quick(),
        )
        return status.lag_seconds


def halted_error(
    procedure: str,
    incident_id: str,
    step: str,
    err: ActivityError,
    done: list[str],
    not_done: list[str],
    production: str,
    next_command: str,
    way_back: str | None,
    steps: list,
) -> ApplicationError:
    """The error a runbook fails with after it changed something: the original error's type, and a
    message and details (FailoverHalted) that say what was done and what not, production's state, and
    the command that goes on. Raised without a cause, so the incident's timeline shows this message."""
    cause: BaseException = err.cause or err  # the activity's own error (its causes are the client's details)
    kind = cause.type if isinstance(cause, ApplicationError) else type(cause).__name__
    halted = FailoverHalted(
        procedure=procedure,
        incident_id=incident_id,
        failed_step=step,
        error_type=kind,
        error=str(cause),
        done=done,
        not_done=not_done,
        production=production,
        next_command=next_command,
        way_back=way_back,
        steps=steps,
    )
    message = (
        f"{kind} at step {step!r}: {cause}. DONE: {'; '.join(done) or 'nothing'}. NOT DONE: "
        f"{', '.join(not_done)}. PRODUCTION NOW: {production}. NEXT: {next_command}."
        + (f" WAY BACK: {way_back}." if way_back else "")
    )
    return ApplicationError(
        message, halted.model_dump(mode="json"), type=kind or ErrorKind.FailoverHalted, non_retryable=True
    )


def _hms(moment) -> str:
    return moment.strftime("%H:%M:%S")
