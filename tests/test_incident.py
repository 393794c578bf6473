"""The Incident workflow end to end: classification from alert labels, the recovery runbook as a
child, approvals on the playbook's roster with escalation, acknowledgement, the communication
cadence over real SMTP, SNS (moto) and the Slack/Statuspage fakes, resolution and the report."""

import asyncio
import re
import signal
import uuid
from datetime import UTC, datetime

import pytest
import redis
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.service import RPCError

from adapters.reports import read_report
from models.approval import ApprovalRequest
from models.incident import (
    AckRequest,
    AlertNotice,
    AlertSummary,
    IncidentInput,
    IncidentStatus,
    ResolveRequest,
    SeverityChange,
)
from stack.corrupt import corrupt_table
from stack.stack import DATABASE
from starters.incident import open_incident
from tests.conftest import RUN_WAIT, query_timed_out, running_worker
from tests.notify_world import incident_settings, short_playbook
from tests.test_crash_survival import spawn_worker, wait_for_poller
from tests.test_stack import drp
from workers.clients import build_s3
from workflows._runbook import Runbook
from workflows.incident import Incident


def incident_id() -> str:
    return f"INC-T{uuid.uuid4().hex[:8]}"


async def status_when(handle, check, timeout: float = 300) -> IncidentStatus:
    """Poll the incident's status query until `check(status)` holds; on timeout, show where it stood."""
    status = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    status = await handle.query(Incident.status)
                except RPCError as err:
                    if not query_timed_out(err):
                        raise
                    continue  # no worker answered in time (a loaded machine): ask again
                if check(status):
                    return status
                await asyncio.sleep(0.1)
    except TimeoutError:
        timeline = "\n".join(f"{e.at:%H:%M:%S.%f} {e.kind} {e.text}" for e in (status.timeline if status else []))
        raise AssertionError(
            f"incident never got there; status {status and status.status}, level {status and status.level}:\n{timeline}"
        ) from None


async def refused(call, *args, retryable: bool = False) -> str:
    """The refusal's message; asserts the refusal says whether retrying it later could succeed."""
    with pytest.raises(WorkflowUpdateFailedError) as err:
        await call(*args)
    assert err.value.cause.non_retryable is not retryable, (
        f"{err.value.cause!r}: non_retryable should be {not retryable}"
    )
    return str(err.value.cause)


async def test_alert_labels_open_a_p0_that_recovers_escalates_and_reports(stack, client, notify_world, tmp_path):
    world = notify_world
    playbook = short_playbook(tmp_path)
    corrupt_table(stack.postgres(), DATABASE, "metrics")
    inc = incident_id()
    async with running_worker(client, stack, settings=lambda q: incident_settings(stack, q, world, playbook)) as queue:
        handle = await open_incident(
            client,
            IncidentInput(
                incident_id=inc,
                title="metrics table unreadable",
                labels={"alertname": "PostgresDataCorruption", "datname": DATABASE},
            ),
            queue,
        )
        # The playbook's rule classified it P0 and started the db-corruption runbook with the label's database.
        status = await status_when(handle, lambda s: s.awaiting_approval == "restore")
        assert status.severity.value == "P0" and status.procedure == "db-corruption" and status.level == 1
        runbook = client.get_workflow_handle(f"db-corruption-{inc}")

        # Nobody decides within approval_escalate_after (2 s): level 2 is paged with the approval request.
        # (The level timers are hours away: this escalation can only be the approval's.)
        status = await status_when(handle, lambda s: s.level == 2)
        assert any(e.kind == "escalation" and "nobody decided 'restore'" in e.text for e in status.timeline)

        # Refusals: not on the P0 roster, an empty reason, a responder not in the playbook.
        assert "not on the roster" in await refused(
            runbook.execute_update, Runbook.approve, ApprovalRequest(approver="carol", reason="on call")
        )
        assert "reason must not be empty" in await refused(
            runbook.execute_update, "approve", {"approver": "alice", "reason": " "}
        )
        assert "not in the playbook's people" in await refused(
            handle.execute_update, Incident.acknowledge, AckRequest(by="mallory")
        )
        assert "still running" in await refused(  # the runbook will finish: this one may be retried
            handle.execute_update, Incident.resolve, ResolveRequest(by="alice", reason="too early"), retryable=True
        )

        ack = await handle.execute_update(Incident.acknowledge, AckRequest(by="carol", note="looking"))
        assert ack.level == 2
        assert "already acknowledged" in await refused(
            handle.execute_update, Incident.acknowledge, AckRequest(by="bob")
        )
        await runbook.execute_update(Runbook.approve, ApprovalRequest(approver="bob", reason="restore from backup"))
        assert "already approved by bob" in await refused(
            runbook.execute_update, Runbook.approve, ApprovalRequest(approver="alice", reason="me too")
        )

        await status_when(handle, lambda s: s.status == "recovered", timeout=RUN_WAIT)
        assert "not on the P0 roster" in await refused(
            handle.execute_update, Incident.resolve, ResolveRequest(by="carol", reason="looks good")
        )
        await handle.execute_update(Incident.resolve, ResolveRequest(by="alice", reason="verified by the DBA"))
        result = await handle.result()
        child = await runbook.result()

    assert result.status == "resolved"
    kinds = [e.kind for e in result.timeline]
    assert kinds.index("opened") < kinds.index("escalation") < kinds.index("ack") < kinds.index("resolved")

    # Every message exactly once per (tick, channel), on the channels the playbook names for P0.
    slack = world.slack_texts()
    assert len(slack) == len(set(slack)) and world.slack.rejected == 0
    assert any(re.search(r"Status Update: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC - recovering - ", t) for t in slack)
    assert any("approval needed: restore" in t for t in slack) and any("Resolved:" in t for t in slack)
    subjects = {}
    for rcpts, mail in world.mail.messages:
        subjects.setdefault(tuple(rcpts), []).append(mail["Subject"])
    assert subjects[("customers@corporate-intel.example",)] == [
        "Service Disruption - Corporate Intelligence Platform",
        f"Resolved: metrics table unreadable ({inc})",
    ]
    assert subjects[("dba@corporate-intel.example",)] == [f"[P0] approval needed: restore ({inc})"]  # level 2
    message_ids = [m["Message-ID"] for _, m in world.mail.messages]
    assert len(message_ids) == len(set(message_ids))
    pages = world.pages()
    # SNS (the on-call pager, on levels 1 and 2): page level 1 at open, the approval request to level 1,
    # then to level 2 when it escalated.
    assert [p["Subject"] for p in pages][:3] == [
        "[P0] PAGE level 1 (On-Call Engineer): metrics table unreadable",
        f"[P0] approval needed: restore ({inc})",
        f"[P0] approval needed: restore ({inc})",
    ]
    assert pages[0]["MessageAttributes"]["incident_id"]["Value"] == inc
    [page] = world.page.incidents.values()
    assert page["status"] == "resolved" and f"[{inc}]" in page["name"] and len(page["updates"]) >= 3

    # The report: every step of the runbook and every message, in time order, with the measured figures.
    report = read_report(build_s3(incident_settings(stack, "q", world, playbook)), "s3://drp-backups/reports", inc)
    assert result.report_uri == f"s3://drp-backups/reports/{inc}.md" and report.startswith("# Incident Report")
    timeline = report.split("## Timeline")[1].split("## Approvals")[0]
    rows = [line for line in timeline.splitlines() if line.startswith("| 20")]
    assert [row.split("|")[1] for row in rows] == sorted(row.split("|")[1] for row in rows)
    assert len(rows) == kinds.index("report")  # everything before the report was written
    positions = [timeline.index(f"| step | {step['name']}: ok") for step in child["steps"]]
    assert positions == sorted(positions) and len(positions) == len(child["steps"])
    assert timeline.count("| message |") == kinds[: kinds.index("report")].count("message") > 5
    assert "**RTO Target:** 2h 00m 00s" in report and "**RPO Target:** 5m 00s" in report
    assert f"**Actual:** {_human(child['rto_actual'])}" in report
    assert f"**RPO Target:** 5m 00s | **Actual:** {_human(child['rpo_actual'])}" in report
    assert "'restore' approved by bob: restore from backup" in report.split("## Approvals")[1]
    assert "level 2 acknowledged by carol" in report.split("## Escalations")[1]
    assert "## Root Cause" in report and "## Action Items" in report
    # The postmortem reminder came after the report, from the durable timer.
    assert any("Blameless postmortem due" in t for t in world.slack_texts())


async def test_cadence_and_escalation_survive_a_worker_sigkill_without_double_posts(
    stack, client, notify_world, tmp_path
):
    world = notify_world
    # Level 2 comes 4 s in; level 3 at 30 s leaves the test time to acknowledge level 2 however slow the
    # machine is (the test waits for each state; nothing here is timed by the test's own clock).
    playbook = short_playbook(
        tmp_path,
        levels=("0s", "4s", "30s", "1h"),
        repage_every="1s",
        status_update_every="2s",
        status_page_update_every="2s",
    )
    env = {
        "DRP_PLAYBOOK_PATH": str(playbook),
        "DRP_STICKY_QUEUE_TIMEOUT": "1s",
        **{f"DRP_NOTIFY__{key.upper()}": str(value) for key, value in world.settings.items()},
    }
    inc, queue = incident_id(), f"cadence-{uuid.uuid4().hex[:8]}"
    first = spawn_worker(stack, queue, tmp_path / "worker1.log", env)
    second = None
    try:
        # The escalation clock starts at the opening: a worker still importing would fold level 1's
        # re-pages into one. Open when it polls.
        await wait_for_poller(client, queue, first)
        handle = await open_incident(
            client,
            IncidentInput(
                incident_id=inc,
                title="API answering 5xx",
                severity="P0",
                procedure="none",
                services=["corporate-intel-api"],
            ),
            queue,
        )
        # Into the cadence: level 1 paged and re-paged, then the worker dies.
        await status_when(handle, lambda s: sum("paging level 1" in e.text for e in s.timeline) >= 2)
        killed_at = (datetime.now(UTC) - (await handle.describe()).start_time).total_seconds()
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        # Deliveries the dead worker had started: one of them may have reached its provider without
        # reaching the ledger (the documented repeat; a loaded machine widens that window).
        started = PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        cut = sum(
            a.activity_type.name == "send_notification" and a.state == started
            for a in (await handle.describe()).raw_description.pending_activities
        )
        second = spawn_worker(stack, queue, tmp_path / "worker2.log", env)
        await wait_for_poller(client, queue, second)

        await status_when(handle, lambda s: s.level >= 2)
        ack = await handle.execute_update(Incident.acknowledge, AckRequest(by="bob", note="on it"))
        assert ack.level == 2
        await status_when(
            handle, lambda s: sum("paging level 3" in e.text for e in s.timeline) >= 2, timeout=120
        )  # paged, then re-paged
        await handle.execute_update(Incident.resolve, ResolveRequest(by="alice", reason="mitigated by hand"))
        result = await handle.result()
    finally:
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.terminate()
                proc.wait(10)

    ledger = redis.Redis.from_url(stack.redis_url)
    keys = sorted(k.decode().removeprefix(f"drp:notify:{inc}/") for k in ledger.keys(f"drp:notify:{inc}/*"))
    by_channel = {}
    for key in keys:
        tick, channel = key.rsplit("/", 1)
        by_channel.setdefault(channel, []).append(tick)
    # No double posts: each channel received what the ledger says was delivered, once per key, except at
    # most the deliveries the SIGKILL cut between the provider's answer and the ledger write.
    received = {"slack": len(world.slack.messages), "pager": len(world.pages()), "mail": len(world.mail.messages)}
    ledgered = {
        "slack": len(by_channel["incidents_slack"]),
        "pager": len(by_channel["oncall_pager"]),
        "mail": sum(len(by_channel.get(c, [])) for c in ("customer_email", "exec_email", "dba_email", "ceo_email")),
    }
    assert all(received[c] >= ledgered[c] for c in received), (received, ledgered)
    assert sum(received.values()) - sum(ledgered.values()) <= cut, (received, ledgered, cut)
    # The status update ticks, every 2 s from the opening, each once; while no worker ran, the ticks
    # that fell due were folded into the latest one, then the cadence went on without a gap.
    ticks = sorted(int(t.rsplit("-", 1)[1]) for t in by_channel["incidents_slack"] if t.startswith("status_update"))
    after_restart = [t for t in ticks if t * 2 > killed_at]
    assert len(after_restart) >= 2 and after_restart == list(range(after_restart[0], after_restart[-1] + 1))
    # ... up to the end: the tick due when level 3 was last re-paged went out (same wake-up of the loop).
    last_page = max(e.at for e in result.timeline if e.kind == "page")
    assert ticks[-1] >= int((last_page - result.opened_at).total_seconds() // 2)
    # The right people on the right channels: level 2 by email to the DBAs, level 3 to the executives.
    subjects = {tuple(rcpt): [] for rcpt, _ in world.mail.messages}
    for rcpt, mail in world.mail.messages:
        subjects[tuple(rcpt)].append(mail["Subject"])
    assert subjects[("dba@corporate-intel.example",)][0].startswith("[P0] PAGE level 2")
    exec_mail = subjects[("cto@corporate-intel.example", "eng-manager@corporate-intel.example")]
    assert exec_mail[0].startswith("[P0] API answering 5xx - executive notice")
    assert sum(s.startswith("[P0] PAGE level 3") for s in exec_mail) >= 2  # paged, then re-paged
    # The acknowledgement stopped level 2's re-paging; level 3 was paged when its time came.
    pages = [e for e in result.timeline if e.kind == "page"]
    assert not [e for e in pages if "level 2" in e.text and e.at > ack.at]
    assert sum("level 1" in e.text for e in pages) >= 2  # level 1 was re-paged until level 2 took over
    assert result.status == "resolved"


async def test_escalation_timers_survive_a_temporal_server_restart(stack, client, notify_world, tmp_path):
    playbook = short_playbook(tmp_path, levels=("0s", "5s", "1h", "2h"))  # P0: level 2 after 5 s
    inc = incident_id()
    async with running_worker(
        client, stack, settings=lambda q: incident_settings(stack, q, notify_world, playbook)
    ) as queue:
        handle = await open_incident(
            client, IncidentInput(incident_id=inc, title="API answering 5xx", severity="P0", procedure="none"), queue
        )
        await status_when(handle, lambda s: s.level == 1)
        stack.restart_temporal()  # same port and store: the timers are in it
        async with asyncio.timeout(120):
            while True:  # the client and the worker reconnect by themselves
                try:
                    status = await status_when(handle, lambda s: s.level == 2, timeout=30)
                    break
                except RPCError:  # the server is still starting
                    await asyncio.sleep(0.5)
        assert any("level 2 Senior Engineer + DBA: unresolved after 5s" in e.text for e in status.timeline)
        await handle.execute_update(Incident.resolve, ResolveRequest(by="alice", reason="after a restart"))
        result = await handle.result()
    escalated = next(e.at for e in result.timeline if e.kind == "escalation" and "level 2" in e.text)
    assert (escalated - result.opened_at).total_seconds() >= 5  # the timer kept its time, it did not fire early
    texts = notify_world.slack_texts()
    assert len(texts) == len(set(texts)) and sum("PAGE level 2" in t for t in texts) == 1


async def test_a_failed_runbook_is_closed_by_a_person_and_reported_as_failed(stack, client, notify_world, tmp_path):
    playbook = short_playbook(tmp_path)
    inc = incident_id()
    async with running_worker(
        client, stack, settings=lambda q: incident_settings(stack, q, notify_world, playbook)
    ) as queue:
        with pytest.raises(WorkflowFailureError) as mismatch:  # the Web UI's ID field must be the incident ID
            await (
                await client.start_workflow(
                    Incident.run, IncidentInput(incident_id=inc, title="x"), id=f"other-{inc}", task_queue=queue
                )
            ).result()
        assert mismatch.value.cause.type == "WorkflowIdMismatch"
        handle = await open_incident(
            client,
            IncidentInput(
                incident_id=inc,
                title="corruption alert for a database that is not there",
                labels={"alertname": "PostgresDataCorruption", "datname": "no_such_db"},
            ),
            queue,
        )
        status = await status_when(handle, lambda s: s.status == "runbook failed")
        assert any("UnknownDatabase" in e.text or "no_such_db" in e.text for e in status.timeline)
        await handle.execute_update(Incident.resolve, ResolveRequest(by="alice", reason="false alarm, db renamed"))
        result = await handle.result()
    assert result.status == "closed"
    report = read_report(
        build_s3(incident_settings(stack, "q", notify_world, playbook)), "s3://drp-backups/reports", inc
    )
    assert "The db-corruption runbook failed:" in report and "Closed by alice: false alarm, db renamed" in report


async def test_the_cli_opens_acknowledges_resolves_and_prints_the_report(stack, client, notify_world, tmp_path):
    playbook = short_playbook(tmp_path)
    state = ["--state-dir", str(stack.state_dir)]

    async def cli(*args: str):
        return await asyncio.to_thread(drp, *state, *args)

    async with running_worker(
        client, stack, settings=lambda q: incident_settings(stack, q, notify_world, playbook)
    ) as queue:
        wrong = await cli("incident", "open", "--title", "x", "--procedure", "db-corrupt", "--task-queue", queue)
        assert wrong.returncode == 2 and "unknown procedure 'db-corrupt'" in wrong.stderr
        opened = await cli(
            "incident",
            "open",
            "--title",
            "Checkout latency",
            "--severity",
            "P1",
            "--procedure",
            "none",
            "--service",
            "checkout",
            "--task-queue",
            queue,
        )
        assert opened.returncode == 0, opened.stderr
        inc = opened.stdout.split()[-1]
        assert re.fullmatch(r"INC-\d{8}-\d{3}", inc)
        handle = client.get_workflow_handle(inc)
        await status_when(handle, lambda s: s.level == 1)
        shown = await cli("incident", "status", inc)
        assert f"{inc} P1 investigating level 1" in shown.stdout and "escalation" in shown.stdout

        raised = await cli(
            "incident", "severity", inc, "--severity", "P0", "--by", "alice", "--reason", "checkout down"
        )
        assert raised.returncode == 0 and f"{inc}: now P0" in raised.stdout, raised.stderr
        same = await cli("incident", "severity", inc, "--severity", "P0", "--by", "alice", "--reason", "again")
        assert same.returncode == 2 and "already P0" in same.stderr
        status = await status_when(handle, lambda s: s.severity.value == "P0")
        assert any(e.kind == "severity" and "P1 -> P0 by alice: checkout down" in e.text for e in status.timeline)
        acked = await cli("ack", inc, "--by", "carol")
        assert acked.returncode == 0 and "level 1 acknowledged by carol" in acked.stdout
        again = await cli("ack", inc, "--by", "carol")
        assert again.returncode == 2 and "already acknowledged" in again.stderr
        outsider = await cli("incident", "resolve", inc, "--by", "carol", "--reason", "fine now")
        assert outsider.returncode == 2 and "not on the P0 roster (alice, bob, frank)" in outsider.stderr
        early = await cli("report", inc)
        assert early.returncode == 2 and "written when the incident is resolved" in early.stderr
        resolved = await cli("incident", "resolve", inc, "--by", "bob", "--reason", "cache warmed")
        assert resolved.returncode == 0, resolved.stderr
        await handle.result()
    report = await cli("report", inc)
    assert report.returncode == 0, report.stderr
    assert report.stdout.startswith("# Incident Report: Checkout latency")
    assert "**Severity:** P0 (Critical)" in report.stdout and "Resolved by bob: cache warmed" in report.stdout
    assert "level 1 acknowledged by carol" in report.stdout and "**Services Affected:** checkout" in report.stdout


def _human(iso: str) -> str:
    from adapters.reports import human, measured

    return human(measured(iso))


async def test_an_incident_continues_as_new_carrying_its_state_and_still_resolves_and_reports(
    stack, client, notify_world, tmp_path
):
    """A long incident's history is cut by continue-as-new (here after 150 events instead of Temporal's
    suggestion at thousands): severity, acknowledgement, runbook outcome, timeline and the cadence's
    sent ticks cross into the next run; nothing is sent twice; the report covers both runs."""
    world = notify_world
    playbook = short_playbook(tmp_path)  # P0: status updates every 2 s, status page every 3 s
    inc = incident_id()
    async with running_worker(client, stack, settings=lambda q: incident_settings(stack, q, world, playbook)) as queue:
        handle = await open_incident(
            client,
            IncidentInput(
                incident_id=inc,
                title="checksum alert on a healthy database",
                severity="P1",
                procedure="db-corruption",
                runbook_input={"database": DATABASE},
                continue_as_new_after=150,
            ),
            queue,
        )
        # The runbook finds no corruption; the incident does not continue while its child runs.
        await status_when(handle, lambda s: s.status == "recovered", timeout=RUN_WAIT)
        # Two people raise it at once: the lock lets one re-classify, the other finds it done.
        raised = await asyncio.gather(
            *(
                handle.execute_update(Incident.set_severity, SeverityChange(severity="P0", by=by, reason="customers"))
                for by in ("alice", "bob")
            ),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, Exception) for r in raised) == 1
        [refusal] = [r for r in raised if isinstance(r, Exception)]
        assert isinstance(refusal, WorkflowUpdateFailedError) and "already P0" in str(refusal.cause)
        ack = await handle.execute_update(Incident.acknowledge, AckRequest(by="carol", note="watching"))
        # A storm's notification listed one alert and left 7 out (Alertmanager's max_alerts).
        storm = AlertNotice(
            group_key='{}:{alertname="Storm"}',
            status="firing",
            receiver="drp",
            truncated=7,
            alerts=[
                AlertSummary(
                    fingerprint="f1", status="firing", labels={"alertname": "Storm"}, starts_at=datetime.now(UTC)
                )
            ],
        )
        await handle.signal(Incident.alert, storm)
        await status_when(handle, lambda s: any("7 more alerts" in e.text for e in s.timeline))

        status = await status_when(handle, lambda s: s.run >= 2, timeout=RUN_WAIT)
        assert (status.severity.value, status.status, status.level, status.acknowledged_level) == (
            "P0",
            "recovered",
            1,
            1,
        )
        assert "already acknowledged" in await refused(
            handle.execute_update, Incident.acknowledge, AckRequest(by="bob")
        )
        continued = len(status.timeline)
        sent_before = len(world.slack_texts())
        await handle.signal(Incident.alert, storm)  # the same notification again, in the new run
        # The new run keeps the cadence: more status updates go out, still counting the truncated alerts.
        await status_when(handle, lambda s: sum(e.kind == "message" for e in s.timeline[continued:]) >= 2)
        assert any("7 more not listed" in t for t in world.slack_texts()[sent_before:])
        await handle.execute_update(Incident.resolve, ResolveRequest(by="alice", reason="false alarm"))
        result = await handle.result()  # follows the runs to the last one
        runs = [w async for w in client.list_workflows(f"WorkflowId = '{inc}'")]

    assert result.status == "resolved" and result.severity.value == "P0" and len(runs) >= 2
    second_run = sorted(w.start_time for w in runs)[1]
    assert result.opened_at < second_run  # the clocks kept counting from the opening, not from the new run
    texts = [e.text for e in result.timeline]
    assert sum("P1 -> P0" in t for t in texts) == 1 and texts.count("level 1 acknowledged by carol: watching") == 1
    assert ack.level == 1 and sum(e.kind == "opened" for e in result.timeline) == 1
    assert sum("7 more alerts of the group are not listed" in t for t in texts) == 1  # known across runs
    assert any("DatabaseCorruptionRecovery finished: no_corruption_found" in t for t in texts)
    # The ticks sent before a continue-as-new were not sent again after it (the ledger would have said so).
    assert not [t for t in texts if "not sent again" in t]
    ledger = redis.Redis.from_url(stack.redis_url)
    slack_keys = ledger.keys(f"drp:notify:{inc}/*/incidents_slack")
    assert len(world.slack.messages) == len(slack_keys)
    report = read_report(build_s3(incident_settings(stack, "q", world, playbook)), "s3://drp-backups/reports", inc)
    assert "checksum alert on a healthy database - opened by operator" in report  # from the first run
    assert "| step | assess: ok" in report and "Resolved by alice: false alarm" in report
