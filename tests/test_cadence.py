"""The Incident's cadence and escalation arithmetic (workflows/cadence.py), without a Temporal server.

The shipped playbook's P0: levels at 0s, 30m, 1h and 2h; re-page every 5m; status updates every 15m;
an undecided approval escalates after the severity's approval_escalate_after.
"""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from activities.playbook import PlaybookActivities
from models.incident import PlanRequest, TimelineEvent
from models.playbook import Severity, load_playbook
from workflows import cadence
from workflows.cadence import Paging, Tick

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def plan():
    playbook = load_playbook(ROOT / "playbook.yaml")
    return PlaybookActivities(playbook).plan_incident(
        PlanRequest(labels={}, severity=Severity.P0, procedure="db-corruption")
    )


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


def run(
    plan,
    until: timedelta,
    *,
    acked_at: timedelta | None = None,
    recovered_at: timedelta | None = None,
    approval_asked_at: timedelta | None = None,
    step: timedelta = timedelta(seconds=1),
) -> list[Tick]:
    """What a workflow following the schedule fires, second by second (the Incident's loop, without Temporal)."""
    fired: set[str] = set()
    out: list[Tick] = []
    level, since, acked = 0, None, 0
    now = T0
    while now <= T0 + until:
        elapsed = now - T0
        if acked_at is not None and elapsed >= acked_at and acked < level:
            acked, acked_at = level, None  # one acknowledgement, of the level reached then
        pending = ("restore", T0 + approval_asked_at) if approval_asked_at is not None else None
        state = Paging(
            opened_at=T0,
            level=level,
            level_since=since,
            acked_level=acked,
            recovered=recovered_at is not None and elapsed >= recovered_at,
            pending_approval=pending,
        )
        while due := cadence.due(cadence.schedule(plan, state, now), fired, now):
            fired.add(due.key)
            out.append(due)
            if due.action in ("escalate", "approval") and due.level > level:
                level, since = due.level, now
            state = Paging(
                opened_at=T0,
                level=level,
                level_since=since,
                acked_level=acked,
                recovered=state.recovered,
                pending_approval=pending,
            )
        now += step
    return out


def keys(ticks: list[Tick]) -> list[str]:
    return [t.key for t in ticks]


def test_the_first_hour_pages_level_one_at_once_then_re_pages_escalates_and_updates(plan):
    fired = run(plan, minutes(61))
    assert keys(fired)[:2] == ["opening", "level-1"]
    assert [t.level for t in fired if t.action == "escalate"] == [1, 2, 3]
    escalations = {t.key: t for t in fired if t.action == "escalate"}
    assert escalations["level-2"].why == "unresolved after 30m00s" and escalations["level-1"].why == "incident opened"
    # Level 1 is re-paged every 5 minutes until level 2 takes over at 30m; then level 2's own series.
    assert [k for k in keys(fired) if k.startswith("repage-L1")] == [f"repage-L1-{n}" for n in range(1, 6)]
    assert "repage-L2-1" in keys(fired)
    assert [k for k in keys(fired) if k.startswith("status_update")] == [
        "status_update-900s-1",
        "status_update-900s-2",
        "status_update-900s-3",
        "status_update-900s-4",
    ]


def test_an_acknowledgement_stops_the_re_paging_of_that_level_but_not_escalation(plan):
    fired = keys(run(plan, minutes(40), acked_at=minutes(7)))
    assert [k for k in fired if k.startswith("repage-L1")] == ["repage-L1-1"]  # 5m, before the ack at 7m
    assert "level-2" in fired and "repage-L2-1" in fired  # level 2 is not acknowledged


def test_once_service_is_back_nobody_more_is_woken_but_status_updates_go_on(plan):
    fired = keys(run(plan, minutes(50), recovered_at=minutes(12)))
    assert "level-2" not in fired and [k for k in fired if k.startswith("repage")] == ["repage-L1-1", "repage-L1-2"]
    assert "status_update-900s-3" in fired


def test_an_undecided_approval_pages_the_next_level_once(plan):
    fired = run(plan, minutes(29), approval_asked_at=minutes(2))
    approvals = [t for t in fired if t.action == "approval"]
    assert len(approvals) == 1
    only = approvals[0]
    assert only.level == 2 and only.step == "restore" and only.at == T0 + minutes(2) + plan.approval_escalate_after
    assert only.why == f"nobody decided 'restore' within {cadence.human(plan.approval_escalate_after)}"


def test_after_an_outage_only_the_latest_tick_of_a_series_is_due():
    start, every = T0, minutes(5)
    assert cadence.ticks(start, every, T0 + minutes(23), "repage-L1") == [
        (T0 + minutes(20), "repage-L1-4"),
        (T0 + minutes(25), "repage-L1-5"),
    ]
    assert cadence.ticks(start, every, T0 + minutes(1), "s")[0] == (T0 + minutes(5), "s-1")  # tick 0 is the start


def test_next_wake_is_the_earliest_occurrence_not_yet_fired(plan):
    state = Paging(opened_at=T0, level=1, level_since=T0, acked_level=0, recovered=False)
    items = cadence.schedule(plan, state, T0 + minutes(1))
    fired = {"opening", "level-1"}
    assert cadence.next_wake(items, fired, T0 + minutes(1)) == minutes(4)  # the 5-minute re-page
    assert cadence.next_wake([], set(), T0) is None


def test_a_continued_run_carries_one_off_keys_and_only_the_series_ticks_still_on_the_schedule(plan):
    state = Paging(opened_at=T0, level=2, level_since=T0 + minutes(30), acked_level=0, recovered=False)
    now = T0 + minutes(47)
    fired = {
        "opening",
        "level-1",
        "level-2",
        "approval-restore-escalated",
        "repage-L1-3",
        "repage-L2-2",
        "repage-L2-3",
        "status_update-900s-1",
        "status_update-900s-3",
    }
    assert cadence.carried_keys(fired, cadence.schedule(plan, state, now)) == [
        "approval-restore-escalated",
        "level-1",
        "level-2",
        "opening",
        "repage-L2-3",
        "status_update-900s-3",
    ]


@pytest.mark.parametrize(
    "delta, text", [(timedelta(seconds=45), "45s"), (minutes(5), "5m00s"), (minutes(125), "2h05m")]
)
def test_durations_read_as_people_write_them(delta, text):
    assert cadence.human(delta) == text


def test_a_week_of_one_minute_status_updates_carries_a_bounded_timeline():
    """An incident paging three channels every minute for a week continues as new many times; what it
    carries must stay far below Temporal's 2 MB payload limit, keep every non-message event and failed
    delivery, and still count every delivered message."""
    minute = timedelta(minutes=1)
    timeline = [TimelineEvent(at=T0, kind="opened", text="db down - opened by alertmanager")]
    for i in range(7 * 24 * 60):
        for channel in ("incidents_slack", "status_page", "exec_email"):
            timeline.append(TimelineEvent(at=T0 + i * minute, kind="message", text=f"status_update to {channel}: #{i}"))
        if i % 1000 == 0:
            timeline.append(TimelineEvent(at=T0 + i * minute, kind="message", text=f"FAILED page to pager: #{i}"))
            timeline.append(TimelineEvent(at=T0 + i * minute, kind="escalation", text=f"level 2 at #{i}"))
    carried = cadence.carried_timeline(timeline)

    assert len(TypeAdapter(list[TimelineEvent]).dump_json(carried)) < 100_000
    assert [e for e in carried if e.kind != "message" and e.kind != "messages"] == [
        e for e in timeline if e.kind not in ("message",)
    ]
    assert [e for e in carried if e.text.startswith("FAILED")] == [e for e in timeline if e.text.startswith("FAILED")]
    delivered = [e for e in timeline if e.kind == "message" and not e.text.startswith("FAILED")]
    assert carried[-cadence.MESSAGES_CARRIED :] == delivered[-cadence.MESSAGES_CARRIED :]  # the newest, as they were
    [summary] = [e for e in carried if e.kind == "messages"]
    assert summary.text.startswith(f"{len(delivered) - cadence.MESSAGES_CARRIED} earlier messages delivered: ")
    assert "status_update to incidents_slack x10047" in summary.text
    assert carried == sorted(carried, key=lambda e: e.at)  # still in time order

    # The next continue-as-new folds what came since into a second summary; a short timeline is untouched.
    again = cadence.carried_timeline([*carried, *delivered[:500]])
    assert sum(e.kind == "messages" for e in again) == 2
    assert cadence.carried_timeline(timeline[:50]) == timeline[:50]
