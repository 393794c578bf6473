"""The demo application: a small HTTP API over the company database.

Stands in for `corporate-intel-api` of the playbook: `/health`,
`/api/v1/companies?limit=N`, `/metrics`, and `POST /api/v1/write-check` (writes
one row, answers with the server port that took it). A request whose `X-API-Key` is
in Redis' `blocked_api_keys` set (as a SHA-256 fingerprint) gets 403. Run as
`python -m stack.demoapp` with DRP_APP_DSN and DRP_APP_PORT in the
environment. It keeps no state of its own, so stopping and starting it is
what the platform adapters do during a recovery.
"""

import hashlib
import json
import os
import signal
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import psycopg
import redis

DSN = os.environ.get("DRP_APP_DSN", "")
REDIS_URL = os.environ.get("DRP_APP_REDIS_URL")
BLOCKED_KEYS = "blocked_api_keys"  # SHA-256 hex of each blocked key: the incident tooling never sees a key
REQUESTS: Counter = Counter()
_LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server_version = "corporate-intel-demo/1"

    def log_message(self, fmt, *args):  # one JSON line per request on stdout
        print(json.dumps({"event": "request", "line": fmt % args}), flush=True)

    def _send(self, code: int, body: object, content_type: str = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else json.dumps(body, default=str).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        with _LOCK:
            REQUESTS[(urlparse(self.path).path, code)] += 1

    def do_GET(self):  # noqa: N802 (http.server's naming)
        url = urlparse(self.path)
        try:
            if url.path == "/health":
                with psycopg.connect(DSN, connect_timeout=3) as conn:
                    conn.execute("SELECT 1")
                return self._send(200, {"status": "ok"})
            if url.path.startswith("/api/") and self._key_blocked():
                return self._send(403, {"error": "this API key is blocked during an incident"})
            if url.path == "/api/v1/companies":
                limit = int(parse_qs(url.query).get("limit", ["10"])[0])
                if not 1 <= limit <= 1000:
                    return self._send(400, {"error": "limit must be between 1 and 1000"})
                with psycopg.connect(DSN, connect_timeout=3) as conn:
                    rows = conn.execute(
                        "SELECT id, name, ticker, sector FROM companies ORDER BY id LIMIT %s", (limit,)
                    ).fetchall()
                return self._send(200, [dict(zip(("id", "name", "ticker", "sector"), r, strict=True)) for r in rows])
            if url.path == "/metrics":
                with _LOCK:
                    lines = [f'http_requests_total{{path="{p}",code="{c}"}} {n}' for (p, c), n in REQUESTS.items()]
                return self._send(
                    200, "# TYPE http_requests_total counter\n" + "\n".join(lines) + "\n", "text/plain; version=0.0.4"
                )
            return self._send(404, {"error": "not found"})
        except ValueError:
            return self._send(400, {"error": "limit must be an integer"})
        except redis.RedisError as err:
            return self._send(503, {"error": "key check unavailable", "detail": str(err)})
        except psycopg.Error as err:
            return self._send(503, {"error": "database unavailable", "detail": str(err).splitlines()[0]})

    def do_POST(self):  # noqa: N802
        url = urlparse(self.path)
        if url.path != "/api/v1/write-check":
            return self._send(404, {"error": "not found"})
        try:
            with psycopg.connect(DSN, connect_timeout=3) as conn:
                row = conn.execute("INSERT INTO app_write_checks DEFAULT VALUES RETURNING id, server").fetchone()
            return self._send(201, {"id": row[0], "server_port": int(row[1])})
        except psycopg.Error as err:
            return self._send(503, {"error": "database unavailable", "detail": str(err).splitlines()[0]})

    def _key_blocked(self) -> bool:
        key = self.headers.get("X-API-Key")
        if not key or not REDIS_URL:
            return False
        fingerprint = hashlib.sha256(key.encode()).hexdigest()
        return bool(_redis().sismember(BLOCKED_KEYS, fingerprint))


_REDIS: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _REDIS
    if _REDIS is None:
        assert REDIS_URL is not None, "callers check DRP_APP_REDIS_URL first"
        _REDIS = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    return _REDIS


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["DRP_APP_PORT"])), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(json.dumps({"event": "listening", "port": server.server_port}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
