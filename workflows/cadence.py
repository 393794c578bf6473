"""The Incident's cadence and escalation as arithmetic: what is due when, with no Temporal in it.

The Incident (workflows/incident.py) asks `schedule()` for every series' due or next occurrence, fires
the first `due()` one whose key has not fired yet, asks again (an escalation changes what, and whom,
the next re-page is for), and sleeps until `next_wake()`. Keys make every occurrence fire once, also
across a worker crash or a continue-as-new (`carried_keys()`); the timeline a continued run carries
stays bounded (`carried_timeline()`).

Series, from the playbook's severity policy and escalation path:
- the opening notices, at the incident's start;
- each escalation level `after` its delay since the start, while the incident is not recovered;
- re-pages of the current level every `repage_every` since it was reached, until it is acknowledged;
- status updates and status-page updates every `status_update_every` / `status_page_update_every`
  since the start;
- an approval nobody decided within `approval_escalate_after`: the next level is paged for it.

After an outage only the latest occurrence of a repeating series is due: people get the current
status once, not a burst of stale ones.

Pure (stdlib and the plan model): imported inside the workflow sandbox and unit-tested in
tests/test_cadence.py without a server.
"""

import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from models.incident import IncidentPlan, TimelineEvent

Action = Literal["opening", "escalate", "repage", "notify", "approval"]


@dataclass(frozen=True)
class Tick:
    """One occurrence of a series: when, its key (fires once), and what the Incident does then."""

    at: datetime
    key: str
    action: Action
    level: int = 0  # escalate / approval: the level to reach
    why: str = ""  # escalate / approval: the reason given in the timeline
    kind: str = ""  # notify: the message kind (status_update, status_page)
    step: str = ""  # approval: the gate nobody decided


@dataclass(frozen=True)
class Paging:
    """The part of the Incident's state the schedule depends on."""

    opened_at: datetime
    level: int  # the escalation level reached (0: none yet)
    level_since: datetime | None  # when it was reached
    acked_level: int  # acknowledged up to this level
    recovered: bool  # service is back: nobody more needs waking
    pending_approval: tuple[str, datetime] | None = None  # (gate, asked at)


def schedule(plan: IncidentPlan, state: Paging, now: datetime) -> list[Tick]:
    """Each series' due or next occurrence, in the order the Incident fires them when several are due."""
    t0 = state.opened_at
    items = [Tick(t0, "opening", "opening")]
    paging = not state.recovered
    for lv in plan.levels:
        if paging and lv.level > state.level:
            why = f"unresolved after {human(lv.after)}" if lv.after else "incident opened"
            items.append(Tick(t0 + lv.after, f"level-{lv.level}", "escalate", level=lv.level, why=why))
    if paging and state.level > state.acked_level and state.level_since is not None:
        items += [
            Tick(at, key, "repage")
            for at, key in ticks(state.level_since, plan.repage_every, now, f"repage-L{state.level}")
        ]
    for kind, every in (("status_update", plan.status_update_every), ("status_page", plan.status_page_update_every)):
        if every:
            items += [
                Tick(at, key, "notify", kind=kind)
                for at, key in ticks(t0, every, now, f"{kind}-{int(every.total_seconds())}s")
            ]
    if state.pending_approval is not None:
        step, since = state.pending_approval
        items.append(
            Tick(
                since + plan.approval_escalate_after,
                f"approval-{step}-escalated",
                "approval",
                level=min(state.level + 1, len(plan.levels)),
                step=step,
                why=f"nobody decided {step!r} within {human(plan.approval_escalate_after)}",
            )
        )
    return items


def due(items: list[Tick], fired: set[str], now: datetime) -> Tick | None:
    """The first occurrence that is due and has not fired."""
    return next((t for t in items if t.at <= now and t.key not in fired), None)


def next_wake(items: list[Tick], fired: set[str], now: datetime) -> timedelta | None:
    """How long until the next occurrence that has not fired; None when nothing is scheduled."""
    later = [t.at for t in items if t.at > now and t.key not in fired]
    return (min(later) - now) if later else None


def ticks(start: datetime, every: timedelta, now: datetime, series: str) -> list[tuple[datetime, str]]:
    """A repeating series' latest tick at or before now and the one after it, as (when, key). Tick 0 is
    the start itself, which is not repeated: the caller fires the first if it is new and sleeps until
    the second."""
    n = max(1, int((now - start) / every))
    return [(start + k * every, f"{series}-{k}") for k in (n, n + 1)]


SERIES_TICK = re.compile(r"(repage-L\d+|status_update-\d+s|status_page-\d+s)-\d+")


def carried_keys(fired: set[str], items: list[Tick]) -> list[str]:
    """The fired keys a continued run needs: of the repeating series only the ticks still on the
    schedule (older ones never come back); the one-off keys (opening, levels, approvals) all."""
    on_schedule = {t.key for t in items}
    return sorted(k for k in fired if k in on_schedule or not SERIES_TICK.fullmatch(k))


# Delivered messages that cross a continue-as-new one line each; older ones are counted.
MESSAGES_CARRIED = 100


def carried_timeline(timeline: list[TimelineEvent], keep: int = MESSAGES_CARRIED) -> list[TimelineEvent]:
    """The timeline a continued run starts with: every event, in order, except the delivered messages
    older than the newest `keep`, which become one `messages` event (at the last of them) counting them
    per kind and channel. An incident paging every minute for days would otherwise carry every status
    update in its continue-as-new input until it passed Temporal's payload limit (2 MB); each message
    stays on its channel and in the delivery ledger. Failed deliveries are never folded."""
    delivered = [i for i, e in enumerate(timeline) if e.kind == "message" and not e.text.startswith("FAILED")]
    folded = set(delivered[: max(len(delivered) - keep, 0)])
    if not folded:
        return list(timeline)
    counts = Counter(timeline[i].text.split(":", 1)[0] for i in folded)
    last = max(folded)
    summary = TimelineEvent(
        at=timeline[last].at,
        kind="messages",
        text=f"{len(folded)} earlier messages delivered: "
        + ", ".join(f"{what} x{n}" for what, n in sorted(counts.items())),
    )
    return [summary if i == last else e for i, e in enumerate(timeline) if i not in folded or i == last]


def human(delta: timedelta) -> str:
    """A duration for people: 45s, 5m00s, 2h05m."""
    seconds = int(delta.total_seconds())
    if seconds < 60:
        return f"{seconds}s"
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )
