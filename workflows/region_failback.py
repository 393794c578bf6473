"""RegionFailback: the paired way home after RegionFailover.

plan -> a read replica of the serving instance in the home region -> approve
-> promote it -> DNS home -> scale the home region -> verify it -> scale the
serving region down -> notify. Home-region steps run on the home region's task
queue, the scale-down on the serving region's; all are idempotent.

It follows an RDS failover; after a self-managed one (the standby was
promoted) the plan refuses at once, changing nothing, and names
DatabaseFailback. A run that fails after a change says, like RegionFailover,
what was done, what not, where production is and the command that goes on.
"""

from datetime import timedelta

from pydantic import ValidationError
from temporalio import workflow
from temporalio.exceptions import ActivityError

from models.region import (
    FAILBACK,
    RegionFailbackInput,
    RegionFailbackResult,
    RegionRequest,
)
from workflows import _options as opt
from workflows._runbook import Runbook
from workflows.region_failover import halted_error

with workflow.unsafe.imports_passed_through():
    from activities.region import RegionActivities


@workflow.defn(name="RegionFailback", failure_exception_types=[ValidationError])
class RegionFailback(Runbook):
    STEPS = 9

    @workflow.run
    async def run(self, inp: RegionFailbackInput) -> RegionFailbackResult:
        """Bring traffic home after RegionFailover (module docstring: the steps). FailbackNotSupported after a
        self-managed failover; a failure after a change says what was done (FailoverHalted).
        """
        await self.prepare(inp.incident_id, FAILBACK, inp.severity)
        hb = inp.heartbeat_timeout
        plan = await self.steps.run(
            "plan", workflow.execute_activity_method(RegionActivities.plan_region_failback, inp, **opt.quick())
        )
        home = {"task_queue": plan.home.task_queue}
        back = RegionRequest(incident_id=inp.incident_id, region=plan.home.backup_region)
        away = RegionRequest(incident_id=inp.incident_id, region=inp.serving_region)
        changes = [
            "create home replica",
            "promote home replica",
            "switch DNS home",
            "scale home region",
            "verify home region",
            "scale serving region down",
            "notify",
        ]
        done: list[str] = []
        step = changes[0]
        try:
            replica = await self.steps.run(
                step,
                workflow.execute_activity_method(
                    RegionActivities.create_home_replica,
                    plan,
                    summary=f"{plan.home.replica_id} in {plan.home.backup_region}",
                    **home,
                    **opt.long_running(hb),
                ),
            )
            if replica.created:
                done.append(
                    f"read replica {replica.replica_id} of {plan.serving_instance} created in {plan.home.backup_region}"
                )
            approval = await self.steps.run(
                "approve",
                self.gate.wait("fail back", inp.approval_timeout, unchanged=f"traffic stays in {inp.serving_region}"),
                detail=f"Will promote {replica.replica_id}, point {plan.home.record_name} at "
                f"{plan.home.new_target}, scale {plan.home.deployment} to {plan.home.replicas} and "
                f"{inp.serving_region} down.",
            )
            step = "promote home replica"
            promoted = await self.steps.run(
                step,
                workflow.execute_activity_method(
                    RegionActivities.promote_rds_replica, back, **home, **opt.long_running(hb, timedelta(hours=1))
                ),
            )
            done.append(f"{replica.replica_id} in {plan.home.backup_region} promoted (writable)")
            step = "switch DNS home"
            dns = await self.steps.run(
                step,
                workflow.execute_activity_method(
                    RegionActivities.switch_dns, back, **home, **opt.long_running(hb, timedelta(minutes=30))
                ),
            )
            done.append(f"{plan.home.record_name} points at {plan.home.new_target}")
            step = "scale home region"
            await self.steps.run(
                step,
                workflow.execute_activity_method(
                    RegionActivities.scale_region, back, **home, **opt.long_running(hb, timedelta(minutes=30))
                ),
            )
            done.append(f"{plan.home.deployment} in {plan.home.backup_region} scaled to {plan.home.replicas}")
            step = "verify home region"
            await self.steps.run(
                step,
                workflow.execute_activity_method(
                    RegionActivities.check_region_health, back, **home, **opt.until_healthy(inp.ready_timeout)
                ),
            )
            step = "scale serving region down"
            await self.steps.run(
                step,
                workflow.execute_activity_method(
                    RegionActivities.scale_down_region,
                    away,
                    task_queue=plan.serving_task_queue,
                    **opt.long_running(hb, timedelta(minutes=30)),
                ),
            )
            done.append(f"{inp.serving_region} scaled down to 0")
            step = "notify"
            await self.steps.run(
                step, workflow.execute_activity_method(RegionActivities.notify_failover, back, **home, **opt.quick())
            )
        except ActivityError as err:
            switched = any(d.startswith(f"{plan.home.record_name} points") for d in done)
            production = (
                f"{plan.home.record_name} points at "
                + (
                    f"{plan.home.new_target} ({plan.home.backup_region})"
                    if switched
                    else f"{inp.serving_region}, which still serves from {plan.serving_instance}"
                )
                + (
                    f"; {plan.home.replica_id} is promoted and writable"
                    if any(" promoted (writable)" in d for d in done)
                    else ""
                )
            )
            raise halted_error(
                FAILBACK,
                inp.incident_id,
                step,
                err,
                done,
                changes[changes.index(step) :],
                production,
                f"fix the cause, then python -m starters.region_failback --incident {inp.incident_id} "
                f"--serving-region {inp.serving_region} (a re-run finds the done steps done and goes "
                "on)",
                None,
                self.steps.completed,
            ) from None
        self.steps.finish(f"Back in {plan.home.backup_region}.")
        return RegionFailbackResult(
            incident_id=inp.incident_id,
            plan=plan,
            replica=replica,
            promoted=promoted,
            dns=dns,
            approval=approval,
            steps=self.steps.completed,
        )
