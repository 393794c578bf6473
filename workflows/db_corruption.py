"""DatabaseCorruptionRecovery: playbook 3.1, "Database Corruption", as a durable runbook.

assess -> approve -> stop application -> seal primary -> restore base backup
-> replay WAL -> verify -> swap in -> start application -> verify application
-> post-recovery base backup.

What the playbook's shell got wrong is done right here: a physical base
backup is restored (WAL cannot be replayed on top of a logical pg_restore),
recovery is configured with recovery.signal and restore_command (recovery.conf
is gone since PostgreSQL 12), the damaged directory is moved aside rather than
overwritten, and the restore replaces it only after it has been verified.
"""

from datetime import datetime, timedelta

from pydantic import ValidationError
from temporalio import workflow

from models.db_corruption import PROCEDURE, CorruptionRecoveryResult, DatabaseCorruptionInput
from models.platform import StartAppRequest, StopAppRequest
from models.postgres import (
    AssessRequest,
    BackupRequest,
    ReplayRequest,
    RestoreRequest,
    SealRequest,
    SealResult,
    SwapRequest,
    VerifyRequest,
)
from workflows import _options as opt
from workflows._runbook import Runbook

with workflow.unsafe.imports_passed_through():
    from activities.backup import BackupActivities
    from activities.platform import PlatformActivities
    from activities.playbook import PlaybookActivities
    from activities.postgres import PostgresActivities


def workflow_id(incident_id: str) -> str:
    """Business-key ID: one incident never runs this runbook twice at once."""
    return f"db-corruption-{incident_id}"


@workflow.defn(name="DatabaseCorruptionRecovery", failure_exception_types=[ValidationError])
class DatabaseCorruptionRecovery(Runbook):
    STEPS = 11

    @workflow.run
    async def run(self, inp: DatabaseCorruptionInput) -> CorruptionRecoveryResult:
        await self.prepare(inp.incident_id, PROCEDURE, inp.severity)
        incident_started = inp.incident_started_at or workflow.info().start_time
        hb = inp.heartbeat_timeout
        objectives = await workflow.execute_activity_method(
            PlaybookActivities.objectives_for, PROCEDURE, **opt.quick())

        assessment = await self.steps.run("assess", workflow.execute_activity_method(
            PostgresActivities.assess_database, AssessRequest(database=inp.database),
            summary=f"assess {inp.database}", **opt.long_running(hb, timedelta(hours=2))))
        common = {"incident_id": inp.incident_id, "database": inp.database, "rto_target": objectives.rto,
                  "rpo_target": objectives.rpo, "findings": assessment.findings,
                  "corrupted_tables": assessment.corrupted_tables}
        if not assessment.corrupted:
            self.steps.finish("No corruption found: nothing was changed.")
            return CorruptionRecoveryResult(outcome="no_corruption_found", steps=self.steps.completed, **common)

        damage = ", ".join(assessment.corrupted_tables) or "; ".join(assessment.findings[:3])
        approval = await self.steps.run("approve", self.gate.wait(
            "restore", inp.approval_timeout, unchanged="nothing was changed: the database and the application are "
                                                       "as they were. Start a new run to try again"),
                                        detail=f"Waiting for approval. Damage: {damage}. Send the `approve` "
                                               f"update or run `drp approve {inp.incident_id} --by NAME "
                                               "--reason TEXT`.")

        stopped = await self.steps.run("stop application", workflow.execute_activity_method(
            PlatformActivities.stop_application, StopAppRequest(incident_id=inp.incident_id),
            summary="stop the application",
            **opt.long_running(hb, timedelta(minutes=30))))
        sealed = await self.steps.run("seal primary", workflow.execute_activity_method(
            PostgresActivities.seal_primary,
            SealRequest(incident_id=inp.incident_id, database=inp.database,
                        skip_tables=assessment.corrupted_tables),
            summary="archive the last WAL, record counts, stop the primary",
            **opt.long_running(hb, timedelta(minutes=30))))
        restored = await self.steps.run("restore base backup", workflow.execute_activity_method(
            BackupActivities.restore_base_backup, RestoreRequest(incident_id=inp.incident_id),
            summary="restore the newest base backup into a fresh directory",
            **opt.long_running(hb)))
        replayed = await self.steps.run("replay WAL", workflow.execute_activity_method(
            BackupActivities.replay_wal,
            ReplayRequest(incident_id=inp.incident_id, restore_dir=restored.restore_dir,
                          must_reach_segment=sealed.archived_through),
            summary=f"replay WAL to the end of the archive (at least {sealed.archived_through or 'what exists'})",
            **opt.long_running(hb)))
        verified = await self.steps.run("verify restore", workflow.execute_activity_method(
            PostgresActivities.verify_restored,
            VerifyRequest(database=inp.database, port=replayed.port, baseline_row_counts=sealed.row_counts,
                          expected_row_counts=inp.expected_row_counts),
            summary="verify the restore before it replaces production",
            **opt.long_running(hb, timedelta(hours=2))))
        swapped = await self.steps.run("swap in restored data", workflow.execute_activity_method(
            BackupActivities.swap_in_restored,
            SwapRequest(incident_id=inp.incident_id, restore_dir=restored.restore_dir),
            summary="move the damaged directory aside, swap the restore in",
            **opt.long_running(hb, timedelta(minutes=30))))
        await self.steps.run("start application", workflow.execute_activity_method(
            PlatformActivities.start_application,
            StartAppRequest(incident_id=inp.incident_id, replicas=max(stopped.replicas_before, 1)),
            summary=f"start the application ({max(stopped.replicas_before, 1)} replicas)",
            **opt.long_running(hb, timedelta(minutes=30))))
        await self.steps.run("verify application", workflow.execute_activity_method(
            PlatformActivities.check_application, summary="/health and the critical endpoint",
            **opt.until_healthy(inp.app_ready_timeout)))
        service_restored_at = workflow.now()
        backup = await self.steps.run("post-recovery base backup", workflow.execute_activity_method(
            BackupActivities.take_base_backup, BackupRequest(incident_id=inp.incident_id),
            summary="new base backup on the new timeline",
            **opt.long_running(hb)))

        rto = service_restored_at - incident_started
        rpo = _data_loss_window(sealed, incident_started, replayed.last_commit_at)
        self.steps.finish(f"Recovered. RTO {_short(rto)} (target {_short(objectives.rto)}), "
                          f"RPO {_short(rpo)} (target {_short(objectives.rpo)}). New base backup {backup.backup_id}.")
        return CorruptionRecoveryResult(
            outcome="recovered", steps=self.steps.completed, approval=approval, backup_id=restored.backup_id,
            recovered_row_counts=verified.row_counts, newest_recovered_commit_at=replayed.last_commit_at,
            damaged_data_dir=swapped.damaged_dir, rto_actual=rto, rpo_actual=rpo, **common)


def _data_loss_window(sealed: SealResult, incident_started: datetime,
                      newest_recovered: datetime | None) -> timedelta | None:
    """The RPO this recovery actually suffered.

    A sealed primary had its last WAL archived, and replay_wal refused to end
    before that segment: every commit it had was recovered, so nothing was lost.
    Otherwise the loss is bounded by the incident start and the newest commit
    the restore holds (unknown when no commit timestamp survived).
    """
    if sealed.archived_through:
        return timedelta(0)
    if newest_recovered is None:
        return None
    return max(incident_started - newest_recovered, timedelta(0))


def _short(delta: timedelta | None) -> str:
    if delta is None:
        return "n/a"
    seconds = int(delta.total_seconds())
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
