"""`drp alerts serve`: Alertmanager webhooks in, Incident workflows out.

Authenticates every request (Authorization: Bearer <token>, which
Alertmanager's http_config sends, or X-DRP-Signature: sha256=<HMAC of the
body> for other senders): anything else is 401 and starts nothing. A payload
that is not a version 4 webhook is 400 with the reason.

One alert group, one incident at a time: the incident ID comes from the
groupKey alone (INC-AM-<hash>), so every notification of a group finds it,
whatever alerts it carries. A firing notification is a signal-with-start of
the group's open incident. Once a person has resolved it, the next firing
notification opens a NEW incident (INC-AM-<hash>-2, -3 ...) that names the
previous one, and the previous one records it: whether its alerts began after
the resolution (the group fired again) or never stopped firing (the problem
was not over) is said in both. Nothing is dropped. A resolved notification
signals the group's latest incident and never opens one.

Storms: bodies up to MAX_BODY are read (Alertmanager sends every alert of a
group in one notification unless `max_alerts` is set); a signal lists at most
MAX_ALERTS_PER_NOTICE alerts and counts the rest, with Alertmanager's own
`truncatedAlerts`, in the incident's timeline, status updates and report.

Answers follow what Alertmanager retries (5xx, never 4xx): 503 only when
Temporal is unreachable or overloaded and sending again can help; input that
can never be accepted is 4xx.
"""

import hashlib
import hmac
import json

import structlog
from aiohttp import web
from pydantic import ValidationError
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from models.alerts import AlertmanagerWebhook
from models.config import AlertReceiverSettings
from starters.http_metrics import instrument
from starters.incident import incident_search_attributes
from workflows.incident import Incident
from workflows.search_attributes import STATUS

PATH = "/alerts"
# Alertmanager puts every alert of a group in one notification (unless max_alerts is set): about 1-2 KB an
# alert, so a storm of 10,000 alerts is 10-20 MB. 64 MiB takes any storm a real Alertmanager sends while
# bounding what one request may make the receiver hold; beyond it, 413 and the README's max_alerts advice.
MAX_BODY = 64 << 20
# Temporal answers that sending again can help with (the rest are final: 4xx).
RETRYABLE_RPC = {
    RPCStatusCode.UNAVAILABLE,
    RPCStatusCode.DEADLINE_EXCEEDED,
    RPCStatusCode.RESOURCE_EXHAUSTED,
    RPCStatusCode.ABORTED,
    RPCStatusCode.INTERNAL,
    RPCStatusCode.UNKNOWN,
    RPCStatusCode.CANCELLED,
}
CLOSED_STATES = ("resolved", "closed")
log = structlog.get_logger()


def build_app(client: Client, settings: AlertReceiverSettings, task_queue: str) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        if not _authenticated(request.headers, body, settings):
            log.warning("alert refused: unauthenticated", peer=request.remote)
            return _json(
                401,
                {
                    "error": "unauthenticated: send Authorization: Bearer <token> or "
                    "X-DRP-Signature: sha256=<hex HMAC-SHA256 of the body>"
                },
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            payload = AlertmanagerWebhook.model_validate_json(body)
        except ValidationError as err:
            problems = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()][:20]
            return _json(400, {"error": "not an Alertmanager webhook (version 4)", "problems": problems})
        try:
            incident_id, note = await deliver(client, payload, task_queue, occurrences)
        except RPCError as err:
            if err.status in RETRYABLE_RPC:
                log.error("alert not accepted: Temporal unavailable", group=payload.groupKey, error=str(err))
                return _json(503, {"error": f"Temporal is unavailable ({err.status.name}); send again"})
            log.error("alert refused by Temporal", group=payload.groupKey, error=str(err))
            return _json(422, {"error": f"Temporal refused the alert ({err.status.name}): {err.message}"})
        except RuntimeError as err:  # the client's (re)connection failed: Temporal is down or unreachable
            if "connect" not in str(err).lower():
                raise
            log.error("alert not accepted: Temporal unreachable", group=payload.groupKey, error=str(err))
            return _json(503, {"error": "Temporal is unreachable; send again"})
        log.info(
            "alert accepted",
            incident_id=incident_id,
            status=payload.status,
            alerts=len(payload.alerts),
            truncated=payload.truncated(),
        )
        return _json(202, {"incident_id": incident_id, **({"note": note} if note else {})})

    async def healthy(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    occurrences: dict[str, int] = {}  # groupKey -> its latest incident's occurrence seen (saves lookups)
    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(PATH, receive)
    app.router.add_get("/-/healthy", healthy)
    instrument(app)  # GET /metrics: request counts and latencies
    return app


async def deliver(
    client: Client, payload: AlertmanagerWebhook, task_queue: str, occurrences: dict[str, int] | None = None
) -> tuple[str | None, str | None]:
    """Deliver one notification to its group's incident: (incident ID or None, a note for the answer).

    Firing: the group's open incident, by signal-with-start; when a person resolved the latest one, a new
    incident linked to it. Resolved: the latest incident is told; none is ever opened for it."""
    occurrences = {} if occurrences is None else occurrences
    n = occurrences.get(payload.groupKey, 1)
    latest = None  # (occurrence, description) of the newest incident of the group that exists
    while True:  # walk the group's incidents: INC-AM-<hash>, -2, -3 ...
        try:
            desc = await client.get_workflow_handle(payload.incident_id(n)).describe()
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            break
        latest = (n, desc)
        if (
            desc.status == WorkflowExecutionStatus.RUNNING
            and desc.typed_search_attributes.get(STATUS) not in CLOSED_STATES
        ):
            break  # open: this is the incident
        n += 1
    if latest:
        occurrences[payload.groupKey] = latest[0]

    if payload.status == "resolved":
        if latest is None or latest[1].status != WorkflowExecutionStatus.RUNNING:
            return None, "no open incident for this group"
        incident_id = payload.incident_id(latest[0])
        await client.get_workflow_handle(incident_id).signal(Incident.alert, payload.notice())
        return incident_id, None

    if latest is not None and latest[0] == n:  # the open incident
        incident_id, follows, previous = payload.incident_id(n), None, None
    else:
        previous = payload.incident_id(latest[0]) if latest else None
        follows = await _recurrence(client, previous, payload) if previous else None
        incident_id = payload.incident_id(n)
    inp = payload.incident_input(n, follows)
    await client.start_workflow(
        Incident.run,
        inp,
        id=incident_id,
        task_queue=task_queue,
        start_signal=Incident.alert.__name__,  # registered under its method name
        start_signal_args=[payload.notice()],
        search_attributes=incident_search_attributes(inp),
        static_summary=f"incident {incident_id}: {inp.title}",
    )
    if previous:
        occurrences[payload.groupKey] = n
        try:  # the link in the other direction; an incident that has ended cannot take it
            await client.get_workflow_handle(previous).signal(Incident.recurred, f"{incident_id}: {follows}")
        except RPCError as err:
            log.warning("previous incident not told of its recurrence", previous=previous, error=str(err))
        return incident_id, f"the group fired again after {previous} was resolved: opened {incident_id}"
    return incident_id, None


async def _recurrence(client: Client, previous: str, payload: AlertmanagerWebhook) -> str:
    """How the group came back after a person resolved `previous`: fired again, or never stopped."""
    resolved_at = None
    try:
        status = await client.get_workflow_handle(previous).query(Incident.status)
        resolved_at = next((e.at for e in reversed(status.timeline) if e.kind == "resolved"), None)
    except Exception as err:  # noqa: BLE001 - an ended or unreachable incident still gets its link
        log.warning("could not read the previous incident", previous=previous, error=str(err))
    firing = [a for a in payload.alerts if a.status == "firing"] or list(payload.alerts)
    began = min(a.startsAt for a in firing)
    if resolved_at is None:
        return f"follows {previous} (resolved); the group is firing again"
    if began > resolved_at:
        return (
            f"follows {previous} (resolved {resolved_at:%Y-%m-%d %H:%M:%S} UTC); the group fired again at "
            f"{began:%Y-%m-%d %H:%M:%S} UTC"
        )
    return (
        f"follows {previous} (resolved {resolved_at:%Y-%m-%d %H:%M:%S} UTC); its alerts never stopped "
        f"firing (since {began:%Y-%m-%d %H:%M:%S} UTC): the problem is not over"
    )


def _authenticated(headers, body: bytes, settings: AlertReceiverSettings) -> bool:
    auth = headers.get("Authorization", "")
    if settings.bearer_token is not None and auth.startswith("Bearer "):
        return hmac.compare_digest(
            auth.removeprefix("Bearer ").encode(), settings.bearer_token.get_secret_value().encode()
        )
    signature = headers.get("X-DRP-Signature", "")
    if settings.hmac_secret is not None and signature.startswith("sha256="):
        expected = hmac.new(settings.hmac_secret.get_secret_value().encode(), body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(signature.removeprefix("sha256="), expected)
    return False


def sign(secret: str, body: bytes) -> str:
    """The X-DRP-Signature value a sender computes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _json(status: int, body: dict, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


async def serve(client: Client, settings: AlertReceiverSettings, task_queue: str) -> web.AppRunner:
    """Start listening; the caller owns the runner (`await runner.cleanup()` to stop)."""
    runner = web.AppRunner(build_app(client, settings, task_queue), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    log.info("alert receiver listening", url=f"http://{settings.host}:{settings.port}{PATH}")
    return runner
