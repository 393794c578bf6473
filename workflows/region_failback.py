"""RegionFailback: the paired way home after RegionFailover.

plan -> a read replica of the serving instance in the home region -> approve
-> promote it -> DNS home -> scale the home region -> verify it -> scale the
serving region down -> notify. Home-region steps run on the home region's task
queue, the scale-down on the serving region's; all are idempotent.
"""

from datetime import timedelta

from pydantic import ValidationError
from temporalio import workflow

from models.region import FAILBACK, RegionFailbackInput, RegionFailbackResult, RegionRequest
from workflows import _options as opt
from workflows._runbook import Runbook

with workflow.unsafe.imports_passed_through():
    from activities.region import RegionActivities


def workflow_id(incident_id: str) -> str:
    return f"region-failback-{incident_id}"


@workflow.defn(name="RegionFailback", failure_exception_types=[ValidationError])
class RegionFailback(Runbook):
    STEPS = 9

    @workflow.run
    async def run(self, inp: RegionFailbackInput) -> RegionFailbackResult:
        await self.prepare(inp.incident_id, FAILBACK, inp.severity)
        hb = inp.heartbeat_timeout
        plan = await self.steps.run("plan", workflow.execute_activity_method(
            RegionActivities.plan_region_failback, inp, **opt.quick()))
        home = {"task_queue": plan.home.task_queue}
        replica = await self.steps.run("create home replica", workflow.execute_activity_method(
            RegionActivities.create_home_replica, plan, summary=f"{plan.home.replica_id} in {plan.home.backup_region}",
            **home, **opt.long_running(hb)))
        approval = await self.steps.run("approve", self.gate.wait(
            "fail back", inp.approval_timeout, unchanged=f"traffic stays in {inp.serving_region}"),
            detail=f"Will promote {replica.replica_id}, point {plan.home.record_name} at {plan.home.new_target}, "
                   f"scale {plan.home.deployment} to {plan.home.replicas} and {inp.serving_region} down.")
        back = RegionRequest(incident_id=inp.incident_id, region=plan.home.backup_region)
        promoted = await self.steps.run("promote home replica", workflow.execute_activity_method(
            RegionActivities.promote_rds_replica, back, **home, **opt.long_running(hb, timedelta(hours=1))))
        dns = await self.steps.run("switch DNS home", workflow.execute_activity_method(
            RegionActivities.switch_dns, back, **home, **opt.long_running(hb, timedelta(minutes=30))))
        await self.steps.run("scale home region", workflow.execute_activity_method(
            RegionActivities.scale_region, back, **home, **opt.long_running(hb, timedelta(minutes=30))))
        await self.steps.run("verify home region", workflow.execute_activity_method(
            RegionActivities.check_region_health, back, **home, **opt.until_healthy(inp.ready_timeout)))
        away = RegionRequest(incident_id=inp.incident_id, region=inp.serving_region)
        await self.steps.run("scale serving region down", workflow.execute_activity_method(
            RegionActivities.scale_down_region, away, task_queue=plan.serving_task_queue,
            **opt.long_running(hb, timedelta(minutes=30))))
        await self.steps.run("notify", workflow.execute_activity_method(
            RegionActivities.notify_failover, back, **home, **opt.quick()))
        self.steps.finish(f"Back in {plan.home.backup_region}.")
        return RegionFailbackResult(incident_id=inp.incident_id, plan=plan, replica=replica, promoted=promoted,
                                    dns=dns, approval=approval, steps=self.steps.completed)
