"""The post-incident report's Markdown: rendered from the incident's record, kept in S3 (`s3://bucket/prefix`)."""

from datetime import timedelta

from pydantic import TypeAdapter
from temporalio.exceptions import ApplicationError

from models.errors import ErrorKind
from models.incident import ReportRequest, TimelineEvent
from models.templates import render

_DURATION = TypeAdapter(timedelta)


def render_report(template: str, req: ReportRequest) -> str:
    result = req.runbook_result or {}
    plan = req.plan
    rto = measured(result.get("rto_actual")) or (req.resolved_at - req.opened_at)
    rpo = measured(result.get("rpo_actual"))
    rpo_text = (
        human(rpo)
        if rpo is not None
        else f"{result['lost_bytes']} bytes of WAL lost"
        if result.get("lost_bytes") is not None
        else "not measured by this run"
    )
    if req.runbook_error:
        outcome = f"The {plan.procedure} runbook failed: {req.runbook_error}"
    elif plan.procedure:
        outcome = f"The {plan.procedure} runbook ended with outcome {result.get('outcome', 'completed')!r}."
    else:
        outcome = "No runbook ran: people worked this incident."
    context = {
        "incident_id": req.incident_id,
        "title": req.title,
        "severity": plan.severity.value,
        "severity_name": plan.severity_name,
        "impact": plan.impact,
        "status": req.status,
        "started_at": _utc(req.opened_at),
        "ended_at": _utc(req.resolved_at),
        "duration": human(req.resolved_at - req.opened_at),
        "procedure": plan.procedure or "none",
        "services": ", ".join(req.services) or "_to be filled in_",
        "incident_commander": plan.incident_commander or "_to be filled in_",
        "rto_target": human(plan.rto_target) if plan.rto_target else "n/a",
        "rto_actual": human(rto),
        "rpo_target": human(plan.rpo_target) if plan.rpo_target else "n/a",
        "rpo_actual": rpo_text,
        "timeline_table": _table(req.timeline),
        "approvals_table": _table([e for e in req.timeline if e.kind == "approval"]),
        "escalations_table": _table([e for e in req.timeline if e.kind in ("escalation", "page", "ack")]),
        "resolution": f"{req.status.capitalize()} by {req.resolved_by}: {req.resolution}",
        "runbook_outcome": f"{req.title}. Classified {plan.severity.value} ({plan.classified_by}). {outcome}",
    }
    return render("report", template, context).body


def read_report(s3, destination: str, incident_id: str) -> str | None:
    bucket, prefix = split_s3(destination)
    try:
        return s3.get_object(Bucket=bucket, Key=f"{prefix}/{incident_id}.md".lstrip("/"))["Body"].read().decode()
    except s3.exceptions.NoSuchKey:
        return None


def split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ApplicationError(f"{uri!r} is not an s3:// URI", type=ErrorKind.BadDestination, non_retryable=True)
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def _table(events: list[TimelineEvent]) -> str:
    if not events:
        return "_None._"
    rows = [
        f"| {_utc(e.at)} | {e.kind} | {' '.join(e.text.split()).replace('|', '/')} |"
        for e in sorted(events, key=lambda e: e.at)
    ]
    return "\n".join(["| Time (UTC) | Kind | Event |", "|---|---|---|", *rows])


def measured(value) -> timedelta | None:
    return None if value is None else _DURATION.validate_python(value)


def _utc(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def human(delta: timedelta) -> str:
    seconds = int(round(delta.total_seconds()))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"
