"""DatabaseLock: at most one runbook changes a given database cluster at a time.

The lock is a workflow whose ID is the cluster's (`db-lock-<cluster>`): Temporal
allows one running workflow per ID, so starting it is the acquisition and a
second runbook's start fails at once with WorkflowAlreadyStartedError. The
holder starts it as a child with parent-close policy TERMINATE, so the lock ends
with its holder however that ends (completed, failed, cancelled, terminated,
timed out) and signals `release` on its own way out. The Web UI shows the
holder in the lock's current details.
"""

from collections.abc import Awaitable, Callable
from typing import TypeVar

from temporalio import workflow
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.workflow import ParentClosePolicy

from models.errors import ErrorKind
from models.locks import LockHolder
from workflows import _options as opt

with workflow.unsafe.imports_passed_through():
    from activities.locks import LockActivities


T = TypeVar("T")


def lock_id(cluster: str) -> str:
    return f"db-lock-{cluster}"


@workflow.defn(name="DatabaseLock")
class DatabaseLock:
    def __init__(self) -> None:
        self.released = False

    @workflow.run
    async def run(self, holder: LockHolder) -> None:
        """Hold the lock for `holder` until it signals `release` or closes (the lock is its child with
        parent-close TERMINATE).
        """
        workflow.set_current_details(
            f"**Held by** {holder.procedure} `{holder.workflow_id}` "
            f"(incident {holder.incident_id}) while it changes {holder.cluster}"
        )
        await workflow.wait_condition(lambda: self.released)

    @workflow.signal
    def release(self) -> None:
        """The holder is done: the lock workflow completes and the next runbook may take it."""
        self.released = True


async def acquire(procedure: str, incident_id: str) -> workflow.ChildWorkflowHandle:
    """Take the lock of the cluster this worker's runbooks change, or fail with DatabaseBusy naming
    the run that holds it (non-retryable: nothing was changed)."""
    cluster = await workflow.execute_activity_method(
        LockActivities.cluster, summary="which database cluster", **opt.quick()
    )
    info = workflow.info()
    holder = LockHolder(
        cluster=cluster, workflow_id=info.workflow_id, run_id=info.run_id, procedure=procedure, incident_id=incident_id
    )
    try:
        return await workflow.start_child_workflow(
            DatabaseLock.run,
            holder,
            id=lock_id(cluster),
            parent_close_policy=ParentClosePolicy.TERMINATE,
            memo={"holder": holder.model_dump()},
            static_summary=f"lock on {cluster} held by {info.workflow_id}",
        )
    except WorkflowAlreadyStartedError:
        held_by = await workflow.execute_activity_method(
            LockActivities.holder, lock_id(cluster), summary="who holds the lock", **opt.quick()
        )
        raise ApplicationError(
            f"database cluster {cluster} is being changed by {held_by}; this run changed nothing. Wait for that "
            f"run to end (or cancel it), then start this one again",
            type=ErrorKind.DatabaseBusy,
            non_retryable=True,
        ) from None


async def release(lock: workflow.ChildWorkflowHandle | None) -> None:
    """Give the lock back (a no-op when it was never taken)."""
    if lock is not None:
        await lock.signal(DatabaseLock.release)
        await lock


async def holding(procedure: str, incident_id: str, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` holding the database cluster's lock, released on every way out. Runs recorded before
    the lock existed replay without it (`workflow.patched("database-lock")`)."""
    lock = await acquire(procedure, incident_id) if workflow.patched("database-lock") else None
    try:
        return await work()
    finally:
        await release(lock)
