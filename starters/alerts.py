"""`drp alerts serve`: Alertmanager webhooks in, Incident workflows out.

Authenticates every request (Authorization: Bearer <token>, which
Alertmanager's http_config sends, or X-DRP-Signature: sha256=<HMAC of the
body> for other senders): anything else is 401 and starts nothing. A payload
that is not a version 4 webhook is 400 with the reason. A firing notification
is a signal-with-start of the group's incident, so repeats and new alerts of
the group join one incident; a resolved one signals it (and starts nothing).
The 2xx is sent only after Temporal has the alert: if Temporal cannot be
reached the answer is 503 and Alertmanager sends it again.
"""

import hashlib
import hmac
import json

import structlog
from aiohttp import web
from pydantic import ValidationError
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from models.alerts import AlertmanagerWebhook
from models.config import AlertReceiverSettings
from starters.incident import incident_search_attributes
from workflows.incident import Incident

PATH = "/alerts"
MAX_BODY = 1 << 20
log = structlog.get_logger()


def build_app(client: Client, settings: AlertReceiverSettings, task_queue: str) -> web.Application:
    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        if not _authenticated(request.headers, body, settings):
            log.warning("alert refused: unauthenticated", peer=request.remote)
            return _json(401, {"error": "unauthenticated: send Authorization: Bearer <token> or "
                                        "X-DRP-Signature: sha256=<hex HMAC-SHA256 of the body>"},
                         headers={"WWW-Authenticate": "Bearer"})
        try:
            payload = AlertmanagerWebhook.model_validate_json(body)
        except ValidationError as err:
            problems = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()][:20]
            return _json(400, {"error": "not an Alertmanager webhook (version 4)", "problems": problems})
        incident_id = payload.incident_id()
        try:
            await deliver(client, payload, task_queue)
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:  # resolved, and no incident open for it
                return _json(202, {"incident_id": incident_id, "note": "no open incident for this group"})
            log.error("alert not accepted: Temporal unavailable", incident_id=incident_id, error=str(err))
            return _json(503, {"error": "Temporal is unavailable; send again"})
        log.info("alert accepted", incident_id=incident_id, status=payload.status, alerts=len(payload.alerts))
        return _json(202, {"incident_id": incident_id})

    async def healthy(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(PATH, receive)
    app.router.add_get("/-/healthy", healthy)
    return app


async def deliver(client: Client, payload: AlertmanagerWebhook, task_queue: str) -> None:
    """Firing: signal-with-start of the group's incident. Resolved: signal it (RPCError NOT_FOUND when none
    is open: a resolved notification never opens an incident)."""
    incident_id = payload.incident_id()
    if payload.status == "firing":
        inp = payload.incident_input()
        await client.start_workflow(
            Incident.run, inp, id=incident_id, task_queue=task_queue, start_signal="alert",
            start_signal_args=[payload.notice()], search_attributes=incident_search_attributes(inp),
            static_summary=f"incident {incident_id}: {inp.title}")
    else:
        await client.get_workflow_handle(incident_id).signal(Incident.alert, payload.notice())


def _authenticated(headers, body: bytes, settings: AlertReceiverSettings) -> bool:
    auth = headers.get("Authorization", "")
    if settings.bearer_token is not None and auth.startswith("Bearer "):
        return hmac.compare_digest(auth.removeprefix("Bearer ").encode(),
                                   settings.bearer_token.get_secret_value().encode())
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
