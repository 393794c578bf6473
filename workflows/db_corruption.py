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

from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import ValidationError
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

from models.db_corruption import (
    PROCEDURE,
    CorruptionRecoveryResult,
    DatabaseCorruptionInput,
)
from models.errors import ErrorKind
from models.failover import RejoinRequest
from models.platform import StartAppRequest
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
from workflows import database_lock
from workflows._runbook import Runbook

with workflow.unsafe.imports_passed_through():
    from activities.backup import BackupActivities
    from activities.platform import PlatformActivities
    from activities.playbook import PlaybookActivities
    from activities.postgres import PostgresActivities
    from activities.replication import ReplicationActivities


@workflow.defn(name="DatabaseCorruptionRecovery", failure_exception_types=[ValidationError])
class DatabaseCorruptionRecovery(Runbook):
    STEPS = 12

    @workflow.run
    async def run(self, inp: DatabaseCorruptionInput) -> CorruptionRecoveryResult:
        """Recover a corrupted database from a base backup and the WAL archive (module docstring: the
        steps). Returns the measured RTO/RPO against the playbook's targets; `no_corruption_found` changes
        nothing. A failure after a change says what state it left (`| State left: ...`); DatabaseBusy when
        another runbook holds the database lock; ApprovalTimeout/ApprovalRejected change nothing.
        """
        await self.prepare(inp.incident_id, PROCEDURE, inp.severity)
        objectives = await workflow.execute_activity_method(PlaybookActivities.objectives_for, PROCEDURE, **opt.quick())
        return await database_lock.holding(PROCEDURE, inp.incident_id, lambda: self._recover(inp, objectives))

    async def _recover(self, inp: DatabaseCorruptionInput, objectives) -> CorruptionRecoveryResult:
        incident_started = inp.incident_started_at or workflow.info().start_time
        hb = inp.heartbeat_timeout
        assessment = await self.steps.run(
            "assess",
            workflow.execute_activity_method(
                PostgresActivities.assess_database,
                AssessRequest(database=inp.database),
                summary=f"assess {inp.database}",
                **opt.long_running(hb, timedelta(hours=2)),
            ),
        )
        common = {
            "incident_id": inp.incident_id,
            "database": inp.database,
            "rto_target": objectives.rto,
            "rpo_target": objectives.rpo,
            "findings": assessment.findings,
            "corrupted_tables": assessment.corrupted_tables,
            "unlogged_tables": assessment.unlogged_tables,
        }
        if not assessment.corrupted:
            self.steps.finish("No corruption found: nothing was changed.")
            return CorruptionRecoveryResult(outcome="no_corruption_found", steps=self.steps.completed, **common)

        damage = ", ".join(assessment.corrupted_tables) or "; ".join(assessment.findings[:3])
        unlogged = (
            f" UNLOGGED tables come back empty from any restore (PostgreSQL does not WAL-log them): "
            f"{', '.join(assessment.unlogged_tables)}."
            if assessment.unlogged_tables
            else ""
        )
        approval = await self.steps.run(
            "approve",
            self.gate.wait(
                "restore",
                inp.approval_timeout,
                unchanged="nothing was changed: the database and the application are "
                "as they were. Start a new run to try again",
            ),
            detail=f"Waiting for approval. Damage: {damage}.{unlogged} Send the `approve` "
            f"update or run `drp approve {inp.incident_id} --by NAME "
            "--reason TEXT`.",
        )
        state = _State()
        try:
            return await self._restore(inp, objectives, incident_started, approval, common, state)
        except Exception as err:
            if not workflow.patched("failure-report"):
                raise
            raise await self._report_failure(inp, state, err) from err

    async def _restore(
        self, inp: DatabaseCorruptionInput, objectives, incident_started, approval, common, state: "_State"
    ) -> CorruptionRecoveryResult:
        hb = inp.heartbeat_timeout
        stopped = await self.stop_application(inp.incident_id, hb)
        state.app_replicas = max(stopped.replicas_before, 1)
        state.sealing = True
        sealed = await self.steps.run(
            "seal primary",
            workflow.execute_activity_method(
                PostgresActivities.seal_primary,
                SealRequest(incident_id=inp.incident_id, database=inp.database, skip_tables=common["corrupted_tables"]),
                summary="fence writers, record counts, archive the last WAL, stop the primary",
                **opt.long_running(hb, timedelta(minutes=30)),
            ),
        )
        state.sealed = sealed
        restored = await self.steps.run(
            "restore base backup",
            workflow.execute_activity_method(
                BackupActivities.restore_base_backup,
                RestoreRequest(incident_id=inp.incident_id, timeline=sealed.timeline, backup_id=inp.backup_id),
                summary=f"restore the newest base backup on timeline {sealed.timeline or 'latest'} "
                "into a fresh directory",
                **opt.long_running(hb),
            ),
        )
        state.restore_dir = restored.restore_dir
        replayed = await self.steps.run(
            "replay WAL",
            workflow.execute_activity_method(
                BackupActivities.replay_wal,
                ReplayRequest(
                    incident_id=inp.incident_id,
                    restore_dir=restored.restore_dir,
                    must_reach_segment=sealed.archived_through,
                    must_reach_lsn=sealed.end_lsn,
                    timeline=restored.timeline,
                    reopen_databases=sealed.fenced_databases,
                    local_wal_dir=sealed.local_wal_dir,
                ),
                summary=f"replay WAL along timeline {restored.timeline or 'latest'} to the end of the archive "
                f"(at least {sealed.archived_through or 'what exists'}); archive nothing",
                **opt.long_running(hb),
            ),
        )
        verified = await self.steps.run(
            "verify restore",
            workflow.execute_activity_method(
                PostgresActivities.verify_restored,
                VerifyRequest(
                    database=inp.database,
                    port=replayed.port,
                    baseline_row_counts=sealed.row_counts,
                    expected_row_counts=inp.expected_row_counts,
                ),
                summary="verify the restore before it replaces production",
                **opt.long_running(hb, timedelta(hours=2)),
            ),
        )
        swapped = await self.steps.run(
            "swap in restored data",
            workflow.execute_activity_method(
                BackupActivities.swap_in_restored,
                SwapRequest(
                    incident_id=inp.incident_id,
                    restore_dir=restored.restore_dir,
                    tablespaces=restored.tablespaces,
                    enable_subscriptions=sealed.disabled_subscriptions,
                ),
                summary="move the damaged directory aside, swap the restore in, archive its WAL",
                **opt.long_running(hb, timedelta(minutes=30)),
            ),
        )
        state.swapped = True
        await self.steps.run(
            "start application",
            workflow.execute_activity_method(
                PlatformActivities.start_application,
                StartAppRequest(incident_id=inp.incident_id, replicas=state.app_replicas),
                summary=f"start the application ({state.app_replicas} replicas)",
                **opt.long_running(hb, timedelta(minutes=30)),
            ),
        )
        state.app_started = True
        await self.steps.run(
            "verify application",
            workflow.execute_activity_method(
                PlatformActivities.check_application,
                summary="/health and the critical endpoint",
                **opt.until_healthy(inp.app_ready_timeout),
            ),
        )
        service_restored_at = workflow.now()
        standby = await self._rebuild_standby(inp) if workflow.patched("standby-rebuild") else None
        backup = await self.steps.run(
            "post-recovery base backup",
            workflow.execute_activity_method(
                BackupActivities.take_base_backup,
                BackupRequest(incident_id=inp.incident_id),
                summary="new base backup on the new timeline",
                **opt.long_running(hb),
            ),
        )

        rto = service_restored_at - incident_started
        rpo = _data_loss_window(sealed, incident_started, replayed.last_commit_at)
        loss = _possible_loss(sealed, replayed.last_commit_at)
        kept = (
            f" {len(sealed.unarchived_wal)} WAL segment(s) the stopped primary never archived were archived and "
            "replayed from its pg_wal."
            if sealed.unarchived_wal
            else ""
        )
        subs = (
            f" Subscriptions disabled at the seal and enabled again: {', '.join(sealed.disabled_subscriptions)}."
            if sealed.disabled_subscriptions
            else ""
        )
        self.steps.finish(
            ("Recovered" if loss is None else f"Recovered WITH POSSIBLE DATA LOSS: {loss}")
            + f". RTO {_short(rto)} (target {_short(objectives.rto)}), "
            f"RPO {_short(rpo)} (target {_short(objectives.rpo)}). New base backup {backup.backup_id}."
            + kept
            + subs
            + (f" Standby: {standby}." if standby else "")
        )
        return CorruptionRecoveryResult(
            outcome="recovered" if loss is None else "recovered_with_possible_loss",
            steps=self.steps.completed,
            unarchived_wal=sealed.unarchived_wal,
            data_loss=loss,
            subscriptions=sealed.disabled_subscriptions,
            approval=approval,
            backup_id=restored.backup_id,
            recovered_row_counts=verified.row_counts,
            newest_recovered_commit_at=replayed.last_commit_at,
            damaged_data_dir=swapped.damaged_dir,
            rto_actual=rto,
            rpo_actual=rpo,
            standby=standby,
            timeline=replayed.timeline,
            followed_timeline=replayed.followed_timeline,
            **common,
        )

    async def _rebuild_standby(self, inp: DatabaseCorruptionInput) -> str:
        """The standby received WAL past the point the restore forked from: it can never follow the new
        primary until rewound (pg_rewind) or rebuilt (pg_basebackup, its directory moved aside). A failure
        here does not undo the recovery: it is reported as "diverged: needs rebuild"."""
        try:
            rejoined = await self.steps.run(
                "rebuild standby",
                workflow.execute_activity_method(
                    ReplicationActivities.rejoin_as_standby,
                    RejoinRequest(incident_id=inp.incident_id, server="standby", source="primary", method="basebackup"),
                    summary="a fresh base backup of the new primary for the standby; its old directory kept aside",
                    **opt.bounded(inp.heartbeat_timeout, timedelta(hours=1)),
                ),
            )
        except ActivityError as err:
            cause = err.cause
            kind = cause.type if isinstance(cause, ApplicationError) else None
            if kind == ErrorKind.NoStandby:
                return "none configured"
            if kind == ErrorKind.StandbyPromoted:
                return f"promoted by someone during the recovery, not touched: {cause}"
            return f"diverged: needs rebuild ({cause if cause else err})"
        moved = f", its old directory kept at {rejoined.moved_aside}" if rejoined.moved_aside else ""
        return f"streaming from the new primary ({rejoined.method}{moved})"

    async def _report_failure(self, inp: DatabaseCorruptionInput, state: "_State", err: Exception) -> ApplicationError:
        """Put production back where the run can (fencing undone while it still runs, the application
        restarted on it, an unswapped restore stopped) and say exactly what state everything is in."""
        hb = inp.heartbeat_timeout
        notes: list[str] = []
        if state.sealing and not state.swapped:
            production = await workflow.execute_activity_method(
                PostgresActivities.reopen_production,
                SealRequest(incident_id=inp.incident_id, database=inp.database),
                summary="undo the fence if production still runs",
                **opt.quick(),
            )
            notes.append(production.detail)
            if production.running:
                await workflow.execute_activity_method(
                    PlatformActivities.start_application,
                    StartAppRequest(incident_id=inp.incident_id, replicas=state.app_replicas),
                    summary="start the application again on production",
                    **opt.long_running(hb, timedelta(minutes=30)),
                )
                notes.append("the application was started again on it")
        if state.restore_dir and not state.swapped:
            notes.append(
                await workflow.execute_activity_method(
                    BackupActivities.stop_restore,
                    SwapRequest(incident_id=inp.incident_id, restore_dir=state.restore_dir),
                    summary="stop the restore that will not be swapped in",
                    **opt.quick(),
                )
            )
        if state.sealed is not None and not state.swapped:
            notes.append(
                "the application stays stopped; a new db-corruption run reuses the seal "
                "(`drp start db-corruption --incident NEW --database " + inp.database + "`), or "
                "`drp unseal` brings the damaged primary back as it was"
            )
        if state.swapped:
            notes.append(
                "production runs on the restored data, the damaged directory kept beside it"
                + ("" if state.app_started else "; the application is not started yet")
                + "; the standby may still need a rebuild (see `drp stack status`)"
            )
        cause = err.cause if isinstance(err, ActivityError) and err.cause else err
        kind = cause.type if isinstance(cause, ApplicationError) and cause.type else type(cause).__name__
        message = cause.message if isinstance(cause, ApplicationError) else str(cause)
        state_line = "; ".join(notes) or "nothing was changed"
        self.steps.finish(f"**Failed**: {message}\n\nState left: {state_line}")
        return ApplicationError(f"{message} | State left: {state_line}", state_line, type=kind, non_retryable=True)


@dataclass
class _State:
    """What the run has changed so far, for the failure report."""

    app_replicas: int = 0
    sealing: bool = False
    sealed: SealResult | None = None
    restore_dir: str | None = None
    swapped: bool = False
    app_started: bool = False


def _data_loss_window(
    sealed: SealResult, incident_started: datetime, newest_recovered: datetime | None
) -> timedelta | None:
    """The RPO this recovery actually suffered.

    A sealed primary had its last WAL archived, and replay_wal refused to end
    before that segment: every commit it had was recovered, so nothing was lost.
    Otherwise the loss is bounded by the incident start and the newest commit
    the restore holds (unknown when no commit timestamp survived).
    """
    if sealed.archived_through or sealed.end_lsn:  # end_lsn: the replay was refused unless it reached it
        return timedelta(0)
    if newest_recovered is None:
        return None
    return max(incident_started - newest_recovered, timedelta(0))


def _possible_loss(sealed: SealResult, newest_recovered: datetime | None) -> str | None:
    """Why commits may be missing, or None when the replay was required to reach the primary's last WAL."""
    if sealed.archived_through or sealed.end_lsn:
        return None
    why = sealed.wal_end_unknown or "the primary's own pg_wal could not be read"
    return (
        f"the damaged primary was found stopped and the end of its WAL is unknown ({why}); commits after "
        f"{newest_recovered.isoformat() if newest_recovered else 'the end of the archive'} may be lost. Its "
        "moved-aside data directory is kept"
    )


def _short(delta: timedelta | None) -> str:
    if delta is None:
        return "n/a"
    seconds = int(delta.total_seconds())
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
