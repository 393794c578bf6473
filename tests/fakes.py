"""Named fakes for SaaS APIs that cannot run here (Atlassian Statuspage, a Slack incoming webhook).

Each is a real local HTTP server that checks what the real API checks (auth,
request shape) and answers the way it answers, so the client code under test
speaks the real protocol.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATUSES = ("investigating", "identified", "monitoring", "resolved")


class _Handler(BaseHTTPRequestHandler):
    def _reply(self, code: int, body, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def log_message(self, *args):
        pass


class _Server:
    def _serve(self, handler: type) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


class FakeStatuspage(_Server):
    """FAKE Atlassian Statuspage API (a SaaS): the three calls drp makes, with the auth header and the
    body shape the real API requires (a new incident needs name, status and body; a status is one of four)."""

    TOKEN = "statuspage-token"

    def __init__(self):
        self.incidents: dict[str, dict] = {}
        self.calls: list[str] = []
        outer = self

        class Handler(_Handler):
            def _authorized(self) -> bool:
                outer.calls.append(f"{self.command} {self.path}")
                if self.headers.get("Authorization") != f"OAuth {outer.TOKEN}":
                    self._reply(401, {"error": "unauthorized"})
                    return False
                return True

            def _incident(self, required: set[str]) -> dict | None:
                incident = json.loads(self._body()).get("incident", {})
                if not required <= set(incident) or incident.get("status", "investigating") not in STATUSES:
                    self._reply(422, {"error": "invalid incident"})
                    return None
                return incident

            def do_GET(self):  # noqa: N802
                if self._authorized():
                    self._reply(200, [i for i in outer.incidents.values() if i["status"] != "resolved"])

            def do_POST(self):  # noqa: N802
                if self._authorized() and (incident := self._incident({"name", "status", "body"})) is not None:
                    incident["id"] = f"inc{len(outer.incidents) + 1}"
                    incident["updates"] = [incident["body"]]
                    outer.incidents[incident["id"]] = incident
                    self._reply(201, incident)

            def do_PATCH(self):  # noqa: N802
                if self._authorized() and (incident := self._incident({"status"})) is not None:
                    found = outer.incidents[self.path.rsplit("/", 1)[-1]]
                    found.update(incident)
                    found["updates"].append(incident.get("body", ""))
                    self._reply(200, found)

        self._serve(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/pages/page1"


class FakeSlackWebhook(_Server):
    """FAKE Slack incoming webhook: JSON with a non-empty `text` string, else 400 `invalid_payload`
    (what Slack answers); success is 200 with the body `ok`."""

    def __init__(self):
        self.messages: list[dict] = []
        self.rejected = 0
        outer = self

        class Handler(_Handler):
            def do_POST(self):  # noqa: N802
                try:
                    payload = json.loads(self._body())
                    valid = (
                        self.headers.get("Content-Type", "").startswith("application/json")
                        and isinstance(payload.get("text"), str)
                        and payload["text"].strip()
                    )
                except ValueError:
                    valid = False
                if not valid:
                    outer.rejected += 1
                    self._reply(400, "invalid_payload", "text/plain")
                    return
                outer.messages.append(payload)
                self._reply(200, "ok", "text/plain")

        self._serve(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T000/B000/XXXX"
