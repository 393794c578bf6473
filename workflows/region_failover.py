"""RegionFailover: playbook 4.1 (scripts/failover-to-backup.sh) as a durable runbook.

plan (check everything exists) -> verify the primary region is down ->
replica lag -> approve -> promote the RDS replica -> switch DNS -> scale the
backup region -> verify it -> notify.

Steps from the promotion on run on the backup region's task queue: the primary
region's workers may be gone with the region. Every step is idempotent, so a
re-run after a crash finds the replica promoted or the record switched and
moves on.
"""

from datetime import timedelta

from pydantic import ValidationError
from temporalio import workflow

from models.failover import FenceRequest, LagCheck, PromoteRequest
from models.region import (
    PROCEDURE,
    LagRequest,
    PrimaryCheck,
    RegionFailoverInput,
    RegionFailoverResult,
    RegionRequest,
)
from workflows import _options as opt
from workflows._runbook import Runbook

with workflow.unsafe.imports_passed_through():
    from activities.playbook import PlaybookActivities
    from activities.region import RegionActivities
    from activities.replication import ReplicationActivities


def workflow_id(incident_id: str) -> str:
    return f"region-failover-{incident_id}"


@workflow.defn(name="RegionFailover", failure_exception_types=[ValidationError])
class RegionFailover(Runbook):
    STEPS = 9

    @workflow.run
    async def run(self, inp: RegionFailoverInput) -> RegionFailoverResult:
        await self.prepare(inp.incident_id, PROCEDURE, inp.severity)
        started = inp.incident_started_at or workflow.info().start_time
        hb = inp.heartbeat_timeout
        objectives = await workflow.execute_activity_method(
            PlaybookActivities.objectives_for, PROCEDURE, **opt.quick())
        plan = await self.steps.run("plan", workflow.execute_activity_method(
            RegionActivities.plan_region_failover, inp, summary="everything to change exists", **opt.quick()))
        checks = PrimaryCheck(url=plan.primary_health_url, checks=inp.health_checks,
                              spacing_seconds=inp.health_check_spacing.total_seconds())
        await self.steps.run("verify primary is down", workflow.execute_activity_method(
            RegionActivities.verify_primary_down, checks, summary=f"{checks.checks} checks of {checks.url}",
            **opt.long_running(max(hb, inp.health_check_spacing * 2), timedelta(minutes=30))))
        lag = await self.steps.run("check replica lag", self._replica_lag(inp, plan))
        approval = await self.steps.run("approve", self.gate.wait(
            "fail over", inp.approval_timeout, unchanged="nothing was changed"),
            detail=f"Will promote {plan.replica_id} in {plan.backup_region} (lag {lag}s), point {plan.record_name} "
                   f"at {plan.new_target}, scale {plan.deployment} to {plan.replicas}.")

        backup = {"task_queue": plan.task_queue}
        region = RegionRequest(incident_id=inp.incident_id, region=plan.backup_region)
        promoted = promoted_standby = None
        if plan.database == "rds":
            promoted = await self.steps.run("promote replica", workflow.execute_activity_method(
                RegionActivities.promote_rds_replica, region, summary=f"promote {plan.replica_id}",
                **backup, **opt.long_running(hb, timedelta(hours=1))))
        else:  # self-managed: fence what is left of the primary, promote the standby (DatabaseFailover's steps)
            fenced = await workflow.execute_activity_method(
                ReplicationActivities.fence_primary, FenceRequest(incident_id=inp.incident_id), **backup,
                summary="fence the old primary", **opt.long_running(hb, timedelta(minutes=10)))
            promoted_standby = await self.steps.run("promote replica", workflow.execute_activity_method(
                ReplicationActivities.promote_standby, PromoteRequest(final_lsn=fenced.final_lsn),
                summary="promote the standby", **backup, **opt.long_running(hb, timedelta(minutes=10))))
        dns = await self.steps.run("switch DNS", workflow.execute_activity_method(
            RegionActivities.switch_dns, region, summary=f"{plan.record_name} -> {plan.new_target}",
            **backup, **opt.long_running(hb, timedelta(minutes=30))))
        await self.steps.run("scale backup region", workflow.execute_activity_method(
            RegionActivities.scale_region, region, summary=f"{plan.deployment} to {plan.replicas}",
            **backup, **opt.long_running(hb, timedelta(minutes=30))))
        await self.steps.run("verify backup region", workflow.execute_activity_method(
            RegionActivities.check_region_health, region, summary=plan.health_url,
            **backup, **opt.until_healthy(inp.ready_timeout)))
        rto = workflow.now() - started
        notified = await self.steps.run("notify", workflow.execute_activity_method(
            RegionActivities.notify_failover, region, summary="SNS", **backup, **opt.quick()))
        self.steps.finish(f"Serving from {plan.backup_region}; RTO {rto}.")
        return RegionFailoverResult(
            incident_id=inp.incident_id, plan=plan, replica_lag_seconds=lag, promoted=promoted,
            promoted_standby=promoted_standby, dns=dns,
            notified=notified, approval=approval, steps=self.steps.completed, rto_target=objectives.rto,
            rto_actual=rto,
            failback=(f"Once the primary region is back: RegionFailback with serving_region={plan.backup_region!r} "
                      f"(python -m starters.region_failback --incident {inp.incident_id} --serving-region "
                      f"{plan.backup_region})" if plan.database == "rds" else
                      f"Once the primary region is back: DatabaseFailback (python -m starters.db_failback --incident "
                      f"{inp.incident_id}) rewinds the old primary and switches the database back; then point DNS "
                      "home."))

    async def _replica_lag(self, inp: RegionFailoverInput, plan) -> float | None:
        if plan.database == "rds":
            return await workflow.execute_activity_method(
                RegionActivities.replica_lag,
                LagRequest(region=plan.backup_region, replica_id=plan.replica_id,
                           max_lag_seconds=plan.max_lag_seconds, override=inp.override_lag),
                summary="CloudWatch ReplicaLag", **opt.quick())
        status = await workflow.execute_activity_method(
            ReplicationActivities.check_standby,
            LagCheck(max_lag_bytes=2**63 - 1, max_lag_seconds=plan.max_lag_seconds, override=inp.override_lag),
            summary="standby replay lag", **opt.quick())
        return status.lag_seconds

