"""Incident: one parent workflow per incident (playbook sections 2, 5 and 6).

Opened by an alert, `drp incident open`, a starter or the Web UI, with the
incident ID as workflow ID. It classifies the severity from the playbook's
rules, runs the matching recovery runbook as a child (abandoned, never killed,
if the incident closes first), follows the child's steps through its
`runbook_progress` signal, and keeps people informed on the severity's
cadence: the escalation path pages level 1 at once and the next levels while
the incident stays unresolved, a pending approval nobody decides escalates,
an acknowledgement stops the re-paging of the current level. Every message
goes through the notification port with a key of (incident, tick, channel).

A person resolves it (the runbook succeeded) or closes it (the runbook
failed); then the resolution notices go out, the post-incident report is
written to S3, and a durable timer reminds everyone of the blameless
postmortem.

All timing is `workflow.now()` against the opening time and durable timers,
so a worker crash or a server restart loses no tick and repeats none.

An incident can stay open for days on a one-minute cadence: before its
history grows too long it continues as new, once its runbook has finished and
no handler or message is in flight, carrying its state (`IncidentCarry`) to
the next run. Updates that run activities (`set_severity`) take a lock, so two
re-classifications never interleave.
"""

import asyncio
from datetime import datetime, timedelta

from pydantic import ValidationError
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    WorkflowAlreadyStartedError,
)

from models.errors import ErrorKind
from models.incident import (
    AckRecord,
    AckRequest,
    AlertNotice,
    IncidentCarry,
    IncidentInput,
    IncidentPlan,
    IncidentResult,
    IncidentState,
    IncidentStatus,
    PlanRequest,
    ReportRequest,
    ResolveRequest,
    RunbookProgress,
    SeverityChange,
    TimelineEvent,
)
from models.notify import Notification, StatusPageStatus
from models.runbooks import runbook
from models.steps import StepRecord
from workflows import _options as opt
from workflows import cadence
from workflows.cadence import human
from workflows.search_attributes import INCIDENT_ID, PROCEDURE, SEVERITY, STATUS

with workflow.unsafe.imports_passed_through():
    from activities.notify import NotifyActivities
    from activities.playbook import PlaybookActivities
    from activities.report import ReportActivities

# What the status page says while the incident is in each state.
STATUS_PAGE: dict[IncidentState, StatusPageStatus] = {
    "investigating": "investigating",
    "recovering": "identified",
    "awaiting approval": "identified",
    "recovered": "monitoring",
    "runbook failed": "identified",
    "resolved": "resolved",
    "closed": "resolved",
}
NEXT_STEPS = {
    "investigating": "responders are investigating",
    "recovering": "the recovery runbook is running",
    "awaiting approval": "waiting for an approver to decide the next recovery step",
    "recovered": "service restored; monitoring before we confirm resolution",
    "runbook failed": "the automated recovery stopped; responders are taking over",
    "resolved": "resolved",
    "closed": "closed",
}
# Messages are worth some retrying, not forever: a channel down for longer than this is
# recorded in the timeline as a failed delivery and the incident goes on.
SEND_OPTIONS = {
    "start_to_close_timeout": timedelta(seconds=30),
    "schedule_to_close_timeout": timedelta(minutes=15),
    "retry_policy": RetryPolicy(
        initial_interval=timedelta(seconds=1),
        maximum_interval=timedelta(minutes=1),
        non_retryable_error_types=opt.NON_RETRYABLE,
    ),
}
QUICK = opt.quick()
# Marks runs that may continue as new: an incident started on older code replays its history without it.
CONTINUE_AS_NEW_PATCH = "incident-continue-as-new"


@workflow.defn(name="Incident", failure_exception_types=[ValidationError])
class Incident:
    @workflow.init
    def __init__(self, inp: IncidentInput) -> None:
        self.inp = inp
        self.plan: IncidentPlan | None = None
        self.state: IncidentState = "investigating"
        self.timeline: list[TimelineEvent] = []
        self.level = 0
        self.level_since: datetime | None = None
        self.acked_level = 0
        self.fired: set[str] = set()
        self.alerts: dict[str, str] = {}
        self.progress: RunbookProgress | None = None
        self.steps_recorded = 0
        self.pending_approval: tuple[str, datetime] | None = None
        self.resolution: tuple[ResolveRequest, datetime] | None = None
        self.runbook_result: dict | None = None
        self.runbook_error: str | None = None
        self.report_uri: str | None = None
        self.deliveries: list[asyncio.Task] = []
        self.changed = False  # set by signals and updates: the cadence loop re-plans its next wake-up
        self.opened_at: datetime | None = None
        self.labels: tuple[str, str, str] | None = None  # search attributes as last upserted
        self.truncated_alerts = 0  # alerts of the group the last notice did not list
        self.runbook_id: str | None = None
        self.runbook_task: asyncio.Task | None = None
        self.lock = asyncio.Lock()  # update handlers that run activities, one at a time
        self.run_number = 1
        if inp.carried is not None:
            self._restore(inp.carried)

    @property
    def _plan(self) -> IncidentPlan:
        """The playbook's plan, set by the opening activity (or carried): everything but the validators
        runs after it; they use `_ready()`."""
        assert self.plan is not None, "the incident is not classified yet"
        return self.plan

    @property
    def _opened_at(self) -> datetime:
        assert self.opened_at is not None, "the incident has not opened yet"
        return self.opened_at

    @workflow.run
    async def run(self, inp: IncidentInput) -> IncidentResult:
        """Run the incident until a person resolves it: classify, start the runbook child, keep people
        informed on the severity's cadence, write the report, remind of the postmortem (durations from the
        playbook). WorkflowIdMismatch when not started with the incident ID as workflow ID.
        """
        if workflow.info().workflow_id != inp.incident_id:
            raise ApplicationError(
                f"start the incident with workflow ID {inp.incident_id!r} (the incident ID): "
                "acknowledgements, reports and alerts find it by that ID",
                type=ErrorKind.WorkflowIdMismatch,
                non_retryable=True,
            )
        if inp.carried is None:
            # The escalation clock starts when the incident is declared; an alert's own start is recorded.
            self.opened_at = workflow.info().start_time
            self._event(
                "opened",
                f"{inp.title} - opened by {inp.opened_by}"
                + (f"; began {inp.started_at:%Y-%m-%d %H:%M:%S} UTC" if inp.started_at else "")
                + (f"; {inp.follows}" if inp.follows else ""),
            )
            self.plan = await workflow.execute_activity_method(
                PlaybookActivities.plan_incident,
                PlanRequest(labels=inp.labels, severity=inp.severity, procedure=inp.procedure),
                summary="classify and read the severity's policy",
                **QUICK,
            )
            self._event(
                "severity", f"{self._plan.severity.value} {self._plan.severity_name} ({self._plan.classified_by})"
            )
            self._show()
            if self._plan.workflow:
                self.runbook_task = asyncio.create_task(self._run_runbook())
                # Only a crash wakes the loop: a runbook's normal end changes no schedule (and waking
                # then would add a timer that running incidents' histories do not have).
                self.runbook_task.add_done_callback(
                    lambda t: self._wake() if not t.cancelled() and t.exception() is not None else None
                )
        else:
            self._show()  # a continued run: the state came in the input, the runbook has finished
        opened_at = self._opened_at

        await self._communicate_until_resolved()
        await workflow.wait_condition(workflow.all_handlers_finished)  # a re-classification in flight lands first

        assert self.resolution is not None  # the loop above ends only when it is set
        req, resolved_at = self.resolution
        self.state = "closed" if self.runbook_error else "resolved"
        self._event("resolved", f"{self.state} by {req.by}: {req.reason}")
        self._show()
        self._notify("resolution", self._plan.notify.get("resolution", []), "resolution", by=req.by, reason=req.reason)
        await self._deliveries_done()
        self.report_uri = await workflow.execute_activity_method(
            ReportActivities.write_report,
            ReportRequest(
                incident_id=inp.incident_id,
                title=inp.title,
                plan=self._plan,
                status=self.state,
                opened_at=opened_at,
                resolved_at=resolved_at,
                resolved_by=req.by,
                resolution=req.reason,
                services=inp.services,
                timeline=self.timeline,
                runbook_result=self.runbook_result,
                runbook_error=self.runbook_error,
            ),
            summary="post-incident report to S3",
            **QUICK,
        )
        self._event("report", f"post-incident report: {self.report_uri}")
        self._show()

        # Playbook 6.2: the blameless postmortem within 48 hours. A durable timer: nothing has to stay up.
        await workflow.sleep(self._plan.postmortem_after, summary="blameless postmortem reminder")
        self._notify(
            "postmortem_reminder",
            self._plan.notify.get("postmortem_reminder", self._plan.levels[0].channels),
            "postmortem",
        )
        await self._deliveries_done()
        return IncidentResult(
            incident_id=inp.incident_id,
            severity=self._plan.severity,
            status=self.state,
            opened_at=opened_at,
            resolved_at=resolved_at,
            report_uri=self.report_uri,
            timeline=self.timeline,
        )

    # --- the recovery runbook -------------------------------------------------------------

    async def _run_runbook(self) -> None:
        plan, inp = self._plan, self.inp
        assert plan.procedure is not None  # a plan names a workflow only with its procedure
        spec = runbook(plan.procedure)
        child_id = self.runbook_id = spec.workflow_id(inp.incident_id)
        args = {
            **plan.runbook_input,
            **inp.runbook_input,
            "incident_id": inp.incident_id,
            "severity": plan.severity.value,
        }
        self._set_status("recovering")
        self._event("runbook", f"{plan.workflow} started as {child_id}")
        try:
            self.runbook_result = await workflow.execute_child_workflow(
                spec.workflow_type,
                args,
                id=child_id,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                static_summary=f"{plan.procedure} for incident {inp.incident_id}",
            )
        except (ChildWorkflowError, WorkflowAlreadyStartedError) as err:
            self.runbook_error = _innermost(err)
            self._set_status("runbook failed")
            self._event(
                "runbook",
                f"{plan.workflow} failed: {self.runbook_error}. Close the incident with "
                f"`drp incident resolve {inp.incident_id}` once people have taken over.",
            )
        else:
            result = self.runbook_result or {}
            # The last step's signal can be cut off by the child's completion: its result has them all.
            self._record_steps([StepRecord.model_validate(s) for s in result.get("steps", [])])
            self._set_status("recovered")
            self._event(
                "runbook",
                f"{plan.workflow} finished: {result.get('outcome', 'completed')}. Confirm with "
                f"`drp incident resolve {inp.incident_id} --by NAME --reason TEXT`.",
            )

    @workflow.signal
    def runbook_progress(self, p: RunbookProgress) -> None:
        """The runbook child's steps, decisions and pending approval; out-of-order signals are ignored by `seq`."""
        old = self.progress
        if old is not None and p.seq <= old.seq:
            return  # signals may arrive out of order after a retry; the newest wins
        self._record_steps(p.completed)
        if p.current_step and (old is None or old.current_step != p.current_step):
            self._event("step", f"{p.current_step}: started")
        for d in p.decisions[len(old.decisions) if old else 0 :]:
            self._event(
                "approval",
                f"{d.step!r} {'approved' if d.approved else 'rejected'} by {d.approver}: {d.reason}",
                at=d.decided_at,
            )
        if p.awaiting_approval and (old is None or old.awaiting_approval != p.awaiting_approval):
            self.pending_approval = (p.awaiting_approval, workflow.now())
            self._event("approval", f"approval requested for {p.awaiting_approval!r}")
            self._set_status("awaiting approval")
            self._notify(
                "approval_needed",
                self._plan.levels[max(self.level, 1) - 1].channels,
                f"approval-{p.awaiting_approval}-asked",
                approval_step=p.awaiting_approval,
            )
        elif not p.awaiting_approval and self.pending_approval is not None:
            self.pending_approval = None
            if self.state == "awaiting approval":
                self._set_status("recovering")
        self.progress = p
        self.changed = True

    def _record_steps(self, completed: list[StepRecord]) -> None:
        for step in completed[self.steps_recorded :]:
            seconds = (step.ended_at - step.started_at).total_seconds()
            self._event("step", f"{step.name}: {step.outcome} ({seconds:.1f} s)", at=step.ended_at)
        self.steps_recorded = max(self.steps_recorded, len(completed))

    # --- alerts ---------------------------------------------------------------------------

    @workflow.signal
    def alert(self, notice: AlertNotice) -> None:
        """Alertmanager's notification for this incident's alert group: firing/resolved alerts into the timeline."""
        for a in notice.alerts:
            if self.alerts.get(a.fingerprint) == a.status:
                continue  # a repeat notification of what we know
            self.alerts[a.fingerprint] = a.status
            name = a.labels.get("alertname", a.fingerprint)
            self._event("alert", f"{name} {a.status} ({', '.join(f'{k}={v}' for k, v in sorted(a.labels.items()))})")
        if notice.truncated != self.truncated_alerts:
            self.truncated_alerts = notice.truncated
            self._event(
                "alert",
                f"{notice.truncated} more alerts of the group are not listed (Alertmanager "
                "max_alerts, or over the receiver's limit per notification)",
            )
        if self.alerts and all(s == "resolved" for s in self.alerts.values()) and notice.status == "resolved":
            self._event("alert", "every alert of the group has resolved; a person confirms the incident resolved")
        self.changed = True

    @workflow.signal
    def recurred(self, note: str) -> None:
        """The alert group fired again after this incident was resolved: the new incident, and how."""
        self._event("alert", f"the alert group fired again after this incident was resolved: {note}")

    # --- people ---------------------------------------------------------------------------

    @workflow.update
    def acknowledge(self, req: AckRequest) -> AckRecord:
        """Acknowledge the current escalation level: its re-paging stops (escalation goes on). Refused:
        NotOnRoster, AlreadyResolved, AlreadyAcknowledged, NotReady.
        """
        self.acked_level = self.level
        self._event("ack", f"level {self.level} acknowledged by {req.by}" + (f": {req.note}" if req.note else ""))
        self.changed = True
        return AckRecord(level=self.level, by=req.by, at=workflow.now())

    @acknowledge.validator
    def _validate_acknowledge(self, req: AckRequest) -> None:
        plan = self._ready()
        if req.by not in plan.responders:
            raise ApplicationError(
                f"{req.by!r} is not in the playbook's people ({', '.join(plan.responders)})",
                type=ErrorKind.NotOnRoster,
                non_retryable=True,
            )
        if self.resolution is not None:
            raise ApplicationError(
                "the incident is already resolved", type=ErrorKind.AlreadyResolved, non_retryable=True
            )
        if self.level <= self.acked_level:
            raise ApplicationError(
                f"level {self.level} is already acknowledged", type=ErrorKind.AlreadyAcknowledged, non_retryable=True
            )

    @workflow.update
    def resolve(self, req: ResolveRequest) -> str:
        """Resolve (the runbook succeeded or none ran) or close (it failed) the incident; returns which.
        Refused: NotOnRoster, AlreadyResolved, RunbookRunning, NotReady.
        """
        self.resolution = (req, workflow.now())
        return "closed" if self.runbook_error else "resolved"

    @resolve.validator
    def _validate_resolve(self, req: ResolveRequest) -> None:
        plan = self._ready()
        self._check_resolver(req.by, plan)
        if self.resolution is not None:
            raise ApplicationError(
                f"already resolved by {self.resolution[0].by}", type=ErrorKind.AlreadyResolved, non_retryable=True
            )
        if self.state in ("recovering", "awaiting approval"):
            raise ApplicationError(
                f"the {plan.procedure} runbook is still running (status {self.state!r}); "
                "resolve when it has finished, or cancel it first",
                type=ErrorKind.RunbookRunning,
            )

    @workflow.update
    async def set_severity(self, change: SeverityChange) -> IncidentPlan:
        """Re-classify the incident (a new plan from the playbook: cadence, roster, escalation). Serialised
        with a lock. Refused: NotOnRoster, NothingToChange, AlreadyResolved, NotReady.
        """
        async with self.lock:  # the validator saw the state before any change queued ahead of this one
            self._check_severity_change(change)
            old = self._plan.severity
            self.plan = await workflow.execute_activity_method(
                PlaybookActivities.plan_incident,
                PlanRequest(labels=self.inp.labels, severity=change.severity, procedure=self._plan.procedure or "none"),
                summary=f"re-classify as {change.severity.value}",
                **QUICK,
            )
            self._event("severity", f"{old.value} -> {change.severity.value} by {change.by}: {change.reason}")
            self._show()
            self._wake()
            return self.plan

    @set_severity.validator
    def _validate_set_severity(self, change: SeverityChange) -> None:
        self._check_resolver(change.by, self._ready())
        self._check_severity_change(change)

    def _check_severity_change(self, change: SeverityChange) -> None:
        plan = self._plan
        if change.severity == plan.severity:
            raise ApplicationError(
                f"the incident is already {plan.severity.value}", type=ErrorKind.NothingToChange, non_retryable=True
            )
        if self.resolution is not None:
            raise ApplicationError(
                "the incident is already resolved", type=ErrorKind.AlreadyResolved, non_retryable=True
            )

    @workflow.query
    def status(self) -> IncidentStatus:
        """The incident as it stands: severity, status, escalation level, current step, timeline."""
        return IncidentStatus(
            incident_id=self.inp.incident_id,
            title=self.inp.title,
            severity=self.plan.severity if self.plan else self.inp.severity,
            status=self.state,
            level=self.level,
            acknowledged_level=self.acked_level,
            procedure=self.plan.procedure if self.plan else self.inp.procedure,
            current_step=self.progress.current_step if self.progress else None,
            awaiting_approval=self.pending_approval[0] if self.pending_approval else None,
            timeline=self.timeline,
            report_uri=self.report_uri,
            run=self.run_number,
        )

    def _ready(self) -> IncidentPlan:
        if self.plan is None:
            raise ApplicationError("the incident is still opening; try again in a moment", type=ErrorKind.NotReady)
        return self.plan

    @staticmethod
    def _check_resolver(by: str, plan: IncidentPlan) -> None:
        if by not in plan.resolvers:
            raise ApplicationError(
                f"{by!r} is not on the {plan.severity.value} roster ({', '.join(plan.resolvers)})",
                type=ErrorKind.NotOnRoster,
                non_retryable=True,
            )

    # --- cadence and escalation -----------------------------------------------------------

    async def _communicate_until_resolved(self) -> None:
        while self.resolution is None:
            self._surface_runbook_crash()
            now = workflow.now()
            # One due item at a time, the schedule recomputed after each: an escalation changes what
            # (and whom) the next re-page is for. After an outage only the latest tick of a series is
            # due: people get the current status once, not a burst of stale ones.
            while due := cadence.due(self._schedule(now), self.fired, now):
                self.fired.add(due.key)
                self._fire(due)
            if self._history_too_long() and workflow.patched(CONTINUE_AS_NEW_PATCH):
                await self._continue_as_new()  # returns only if the incident was resolved meanwhile
                continue
            wake = cadence.next_wake(self._schedule(now), self.fired, now)
            self.changed = False
            try:
                await workflow.wait_condition(lambda: self.changed or self.resolution is not None, timeout=wake)
            except TimeoutError:
                pass

    def _wake(self) -> None:
        self.changed = True

    def _surface_runbook_crash(self) -> None:
        """The runbook task handles the child's failures itself; anything else it raised (a bug) fails
        the workflow task here, visibly and retried on the next worker, instead of vanishing with the task."""
        task = self.runbook_task
        if task is not None and task.done() and not task.cancelled() and (bug := task.exception()) is not None:
            raise bug

    # --- continue-as-new --------------------------------------------------------------------

    def _history_too_long(self) -> bool:
        """Temporal suggests it (the history nears its size or event limit), or the input's own threshold
        is reached. Not while the runbook child runs: this run awaits its result."""
        if self.runbook_task is not None and not self.runbook_task.done():
            return False
        info = workflow.info()
        limit = self.inp.continue_as_new_after
        return info.is_continue_as_new_suggested() or (limit is not None and info.get_current_history_length() >= limit)

    async def _continue_as_new(self) -> None:
        # Updates (set_severity) finish and every message started is delivered or given up: their
        # outcome belongs to this run's state. Signals and sync updates meanwhile change the state carried.
        await workflow.wait_condition(
            lambda: workflow.all_handlers_finished() and all(t.done() for t in self.deliveries)
        )
        self._raise_delivery_bugs()
        if self.resolution is not None:
            return
        fired = cadence.carried_keys(self.fired, self._schedule(workflow.now()))
        carry = IncidentCarry(
            plan=self._plan,
            opened_at=self._opened_at,
            status=self.state,
            timeline=cadence.carried_timeline(self.timeline),
            level=self.level,
            level_since=self.level_since,
            acked_level=self.acked_level,
            fired=fired,
            alerts=self.alerts,
            progress=self.progress,
            steps_recorded=self.steps_recorded,
            pending_approval=self.pending_approval,
            runbook_id=self.runbook_id,
            runbook_result=self.runbook_result,
            runbook_error=self.runbook_error,
            labels=self.labels,
            run=self.run_number + 1,
            truncated_alerts=self.truncated_alerts,
        )
        workflow.logger.info(
            "continuing as new (run %d) after %d history events",
            carry.run,
            workflow.info().get_current_history_length(),
        )
        workflow.continue_as_new(
            self.inp.model_copy(update={"carried": carry}), search_attributes=workflow.info().typed_search_attributes
        )

    def _restore(self, c: IncidentCarry) -> None:
        self.plan, self.opened_at, self.state, self.timeline = c.plan, c.opened_at, c.status, list(c.timeline)
        self.level, self.level_since, self.acked_level = c.level, c.level_since, c.acked_level
        self.fired, self.alerts, self.progress = set(c.fired), dict(c.alerts), c.progress
        self.steps_recorded, self.pending_approval, self.runbook_id = c.steps_recorded, c.pending_approval, c.runbook_id
        self.runbook_result, self.runbook_error, self.labels = c.runbook_result, c.runbook_error, c.labels
        self.run_number, self.truncated_alerts = c.run, c.truncated_alerts

    def _schedule(self, now: datetime) -> list[cadence.Tick]:
        """Each series' due or next occurrence (workflows/cadence.py); keys make every tick fire once."""
        return cadence.schedule(
            self._plan,
            cadence.Paging(
                opened_at=self._opened_at,
                level=self.level,
                level_since=self.level_since,
                acked_level=self.acked_level,
                recovered=self.state == "recovered",
                pending_approval=self.pending_approval,
            ),
            now,
        )

    def _fire(self, tick: cadence.Tick) -> None:
        if tick.action == "opening":
            self._opening()
        elif tick.action == "escalate":
            self._escalate(tick.level, tick.why, tick.key)
        elif tick.action == "repage":
            self._page(tick.key)
        elif tick.action == "notify":
            self._notify(tick.kind, self._plan.notify.get(tick.kind, []), tick.key)
        else:  # an approval nobody decided: the next level is paged for it
            self._escalate(tick.level, tick.why, tick.key, kind="approval_needed", approval_step=tick.step)

    def _opening(self) -> None:
        """Declare the incident: the first status update, customer and executive notices where the playbook asks."""
        plan = self._plan
        self._notify("status_update", plan.notify.get("status_update", []), "status_update-0")
        if plan.customer_notice_within is not None:
            self._notify("customer_notice", plan.notify.get("customer_notice", []), "customer_notice")
        if plan.exec_notice_within is not None:
            self._notify("exec_notice", plan.notify.get("exec_notice", []), "exec_notice")

    def _escalate(self, level: int, why: str, tick: str, kind: str = "page", **extra: str) -> None:
        if level > self.level:
            self.level, self.level_since = level, workflow.now()
            self._event("escalation", f"level {level} {self._plan.levels[level - 1].name}: {why}")
        self._page(tick, kind=kind, **extra)

    def _page(self, tick: str, kind: str = "page", **extra: str) -> None:
        lv = self._plan.levels[self.level - 1]
        self._event("page", f"paging level {lv.level} ({lv.name}) via {', '.join(lv.channels)}")
        self._notify(kind, lv.channels, tick, **extra)

    # --- messages -------------------------------------------------------------------------

    def _notify(self, kind: str, channels: list[str], tick: str, **extra: str) -> None:
        context = self._context(**extra)
        for channel in channels:
            n = Notification(
                key=f"{self.inp.incident_id}/{tick}/{channel}",
                incident_id=self.inp.incident_id,
                kind=kind,
                channel=channel,
                context=context,
                status_page_status=STATUS_PAGE[self.state],
            )
            self.deliveries.append(asyncio.create_task(self._deliver(n)))

    async def _deliver(self, n: Notification) -> None:
        try:
            d = await workflow.execute_activity_method(
                NotifyActivities.send_notification, n, summary=f"{n.kind} to {n.channel}", **SEND_OPTIONS
            )
        except ActivityError as err:
            self._event("message", f"FAILED {n.kind} to {n.channel}: {_innermost(err)}")
            return
        note = " (found in the delivery ledger: not sent again)" if d.already_sent else ""
        self._event("message", f"{n.kind} to {n.channel}: {d.subject}{note}")

    async def _deliveries_done(self) -> None:
        await workflow.wait_condition(lambda: all(t.done() for t in self.deliveries))
        self._raise_delivery_bugs()

    def _raise_delivery_bugs(self) -> None:
        """A delivery handles a failed send itself; anything else it raised is a bug, not to be lost."""
        for task in self.deliveries:
            if not task.cancelled() and (bug := task.exception()) is not None:
                raise bug
        self.deliveries = []

    def _context(self, **extra: str) -> dict[str, str]:
        plan, now = self._plan, workflow.now()
        every = plan.status_update_every
        level = self._plan.levels[max(self.level, 1) - 1]
        return {
            "incident_id": self.inp.incident_id,
            "title": self.inp.title,
            "severity": plan.severity.value,
            "severity_name": plan.severity_name,
            "impact": plan.impact,
            "status": self.state,
            "next_steps": NEXT_STEPS[self.state],
            "timestamp": now.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "started_at": self._opened_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "next_update": (now + every).strftime("%H:%M:%S UTC") if every else "as needed",
            "procedure": plan.procedure or "none",
            "current_step": (self.progress.current_step if self.progress else None) or "-",
            "level": str(level.level),
            "level_name": level.name,
            "duration": human(now - self._opened_at),
            "services": ", ".join(self.inp.services) or self.inp.labels.get("service", "our services"),
            "report_uri": self.report_uri or "(written when resolved)",
            "alerts": self._alert_summary(),
            **extra,
        }

    def _alert_summary(self) -> str:
        firing = sum(s == "firing" for s in self.alerts.values())
        text = f"{firing} firing, {len(self.alerts) - firing} resolved" if self.alerts else "none"
        return text + (f", {self.truncated_alerts} more not listed (truncated)" if self.truncated_alerts else "")

    # --- record and display ---------------------------------------------------------------

    def _event(self, kind: str, text: str, at: datetime | None = None) -> None:
        self.timeline.append(TimelineEvent(at=at or workflow.now(), kind=kind, text=text))
        if self.plan is not None:
            self._show()

    def _set_status(self, status: IncidentState) -> None:
        self.state = status
        self._show()

    def _show(self) -> None:
        """Search attributes and current details: what the Web UI lists and shows."""
        plan = self._plan
        labels = (plan.severity.value, plan.procedure or "none", self.state)
        if labels != self.labels:  # an upsert is a history event: only on change
            self.labels = labels
            workflow.upsert_search_attributes(
                [
                    INCIDENT_ID.value_set(self.inp.incident_id),
                    SEVERITY.value_set(labels[0]),
                    PROCEDURE.value_set(labels[1]),
                    STATUS.value_set(labels[2]),
                ]
            )
        step = self.progress.current_step if self.progress else None
        lines = [
            f"**{plan.severity.value} {self.state}** - {self.inp.title}",
            f"Escalation level {self.level} (acknowledged up to {self.acked_level})",
            f"Runbook: {plan.procedure or 'none'}" + (f", step: {step}" if step else ""),
        ]
        if self.pending_approval:
            lines.append(
                f"Awaiting approval of {self.pending_approval[0]!r}: "
                f"`drp approve {self.inp.incident_id} --by NAME --reason TEXT`"
            )
        if self.report_uri:
            lines.append(f"Report: {self.report_uri}")
        lines += ["", "Latest:", *(f"- {e.at:%H:%M:%S} {e.kind}: {e.text}" for e in self.timeline[-5:])]
        workflow.set_current_details("\n".join(lines))


def _innermost(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err)
