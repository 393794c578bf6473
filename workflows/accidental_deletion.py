"""AccidentalDeletionRecovery: playbook 3.1, "Accidental Data Deletion", as a durable runbook.

identify -> contain -> restore a side instance -> replay to just before the
deleting transaction -> extract (CSV evidence to S3) -> approve -> re-insert
-> verify -> tear down the side instance -> approve and lift containment.

Production keeps serving throughout and is never rolled back in time: the
past is recovered into a side instance, paused read-only just before the
deletion committed, and only the deleted rows travel back. The playbook's
`recovery.conf` is gone since PostgreSQL 12; the side instance uses
recovery.signal, recovery_target_xid and recovery_target_action = 'pause'.
"""

from datetime import timedelta

from pydantic import ValidationError
from temporalio import workflow
from temporalio.exceptions import ApplicationError

from models.deletion import (
    PROCEDURE,
    AccidentalDeletionInput,
    ContainRequest,
    DeletionQuery,
    DeletionRecoveryResult,
    ExtractRequest,
    ReinsertRequest,
)
from models.errors import ErrorKind
from models.postgres import (
    AssessRequest,
    ReplayRequest,
    RestoreRequest,
    TeardownRequest,
)
from workflows import _options as opt
from workflows import database_lock
from workflows._runbook import Runbook

with workflow.unsafe.imports_passed_through():
    from activities.backup import BackupActivities
    from activities.deletion import DeletionActivities
    from activities.playbook import PlaybookActivities
    from activities.postgres import PostgresActivities


# Runs started before the deletion runbook took the database lock replay without it.
DELETION_LOCK = "deletion-database-lock"


@workflow.defn(name="AccidentalDeletionRecovery", failure_exception_types=[ValidationError])
class AccidentalDeletionRecovery(Runbook):
    STEPS = 12

    @workflow.run
    async def run(self, inp: AccidentalDeletionInput) -> DeletionRecoveryResult:
        """Recover deleted rows into production (see the module docstring for the steps).

        Fails, having changed nothing past the last completed step, with ApprovalTimeout/ApprovalRejected at a
        gate, NoDeletionsFound/NoAuditLog/UnknownTable and other input errors, or DatabaseBusy when another
        runbook holds the database lock.
        """
        await self.prepare(inp.incident_id, PROCEDURE, inp.severity)
        started = inp.incident_started_at or workflow.info().start_time
        query = DeletionQuery(
            database=inp.database,
            window_start=inp.window_start,
            window_end=inp.window_end or workflow.info().start_time,
            table=inp.table,
            role=inp.role,
        )
        objectives = await workflow.execute_activity_method(PlaybookActivities.objectives_for, PROCEDURE, **opt.quick())
        # The database lock from the first step to the side instance's teardown: a corruption recovery or a
        # failover of the same cluster would seal, restore or promote under the containment, the side restore
        # and the re-insert (and a second deletion run would contain and re-insert the same rows). It is given
        # back before the lift-containment approval, which may wait for days: the lift only gives back the
        # grants and unblocks the key, idempotently, and must not keep a corruption recovery waiting.
        lock = await database_lock.acquire(PROCEDURE, inp.incident_id) if workflow.patched(DELETION_LOCK) else None
        try:
            findings, containment, contain, extracted, reinserted, approval, recovered_at = await self._recover(
                inp, query
            )
        finally:
            await database_lock.release(lock)

        lifted = False
        if containment.role or containment.api_key_sha256:
            try:
                await self.steps.run(
                    "approve lifting containment",
                    self.gate.wait(
                        "lift containment", inp.lift_approval_timeout, unchanged="containment stays in place"
                    ),
                    detail="Rows are back. Approve to restore the role's privileges and unblock the API key.",
                )
                await self.steps.run(
                    "lift containment",
                    workflow.execute_activity_method(
                        DeletionActivities.lift_containment,
                        contain,
                        summary="give back what was revoked",
                        **opt.quick(),
                    ),
                )
                lifted = True
            except ApplicationError as err:
                if err.type not in (ErrorKind.ApprovalTimeout, ErrorKind.ApprovalRejected):
                    raise
                workflow.logger.info("containment left in place: %s", err.message)

        complete = reinserted.missing_after_insert == 0 and extracted.not_in_side_instance == 0
        self.steps.finish(
            f"{sum(reinserted.inserted_by_table.values())} rows re-inserted, "
            f"{sum(len(c) for c in reinserted.conflicts_by_table.values())} conflicts; containment "
            f"{'lifted' if lifted else 'in place'}."
        )
        return DeletionRecoveryResult(
            incident_id=inp.incident_id,
            database=inp.database,
            findings=findings,
            containment=containment,
            containment_lifted=lifted,
            extracted=extracted,
            reinserted=reinserted,
            approvals=[approval, *[d for s, d in self.gate.decisions.items() if s != "re-insert"]],
            steps=self.steps.completed,
            rto_target=objectives.rto,
            rpo_target=objectives.rpo,
            rto_actual=recovered_at - started,
            rpo_actual=timedelta(0) if complete else None,
        )

    async def _recover(self, inp: AccidentalDeletionInput, query: DeletionQuery):
        """identify ... tear down the side instance: the part that holds the database lock."""
        hb = inp.heartbeat_timeout
        # Read-only and validating: wrong input stops here having changed nothing.
        findings = await self.steps.run(
            "identify",
            workflow.execute_activity_method(
                DeletionActivities.identify_deletions, query, summary="read the audit log", **opt.quick()
            ),
        )
        contain = ContainRequest(
            incident_id=inp.incident_id, database=inp.database, role=inp.role, api_key_sha256=inp.api_key_sha256
        )
        containment = await self.steps.run(
            "contain",
            workflow.execute_activity_method(
                DeletionActivities.contain, contain, summary="revoke writes / block the API key", **opt.quick()
            ),
        )
        try:
            await self.steps.run(
                "archive current WAL",
                workflow.execute_activity_method(
                    PostgresActivities.archive_current_wal,
                    AssessRequest(database=inp.database),
                    summary="the WAL holding the deletion must be in S3",
                    **opt.long_running(hb, timedelta(minutes=30)),
                ),
            )
            restored = await self.steps.run(
                "restore side instance",
                workflow.execute_activity_method(
                    BackupActivities.restore_base_backup,
                    RestoreRequest(incident_id=inp.incident_id, purpose="side", backup_id=findings.backup_id),
                    summary=f"restore base backup {findings.backup_id} beside production",
                    **opt.long_running(hb),
                ),
            )
            side = await self.steps.run(
                "replay to just before the deletion",
                workflow.execute_activity_method(
                    BackupActivities.replay_wal,
                    ReplayRequest(
                        incident_id=inp.incident_id, restore_dir=restored.restore_dir, target_xid=findings.target_xid
                    ),
                    summary=f"replay WAL, pause before transaction {findings.target_xid}",
                    **opt.long_running(hb),
                ),
            )
            rows = ExtractRequest(incident_id=inp.incident_id, query=query, side_port=side.port)
            extracted = await self.steps.run(
                "extract deleted rows",
                workflow.execute_activity_method(
                    DeletionActivities.extract_deleted_rows,
                    rows,
                    summary="find the rows; CSV evidence to S3",
                    **opt.long_running(hb, timedelta(hours=1)),
                ),
            )
            approval = await self.steps.run(
                "approve re-insert",
                self.gate.wait(
                    "re-insert", inp.approval_timeout, unchanged="nothing was re-inserted; containment stays"
                ),
                detail=_summary(extracted),
            )
            again = ReinsertRequest(incident_id=inp.incident_id, query=query, side_port=side.port)
            reinserted = await self.steps.run(
                "re-insert",
                workflow.execute_activity_method(
                    DeletionActivities.reinsert_rows,
                    again,
                    summary="one transaction, conflicts reported",
                    **opt.long_running(hb, timedelta(hours=1)),
                ),
            )
            await self.steps.run(
                "verify",
                workflow.execute_activity_method(
                    DeletionActivities.verify_reinserted,
                    again,
                    summary="every recovered key is in production",
                    **opt.long_running(hb, timedelta(hours=1)),
                ),
            )
            recovered_at = workflow.now()
        finally:  # compensation: no side instance outlives the run, whatever happened
            await self.steps.run(
                "tear down side instance",
                workflow.execute_activity_method(
                    BackupActivities.remove_side_instance,
                    TeardownRequest(incident_id=inp.incident_id),
                    summary="stop and delete the side instance",
                    **opt.long_running(hb, timedelta(minutes=30)),
                ),
            )
        return findings, containment, contain, extracted, reinserted, approval, recovered_at


def _summary(extracted) -> str:
    tables = ", ".join(f"{t}: {n}" for t, n in extracted.rows_by_table.items())
    dependents = ", ".join(f"{t}: {n}" for t, n in extracted.dependent_rows_by_table.items()) or "none"
    sample = "\n".join(f"    {line}" for lines in extracted.sample.values() for line in lines[:3])
    return (
        f"Deleted rows found: {tables}; dependent rows: {dependents}. Evidence: {extracted.evidence_uri}\n"
        f"Sample:\n{sample}\nApprove the re-insert with the `approve` update or `drp approve`."
    )
