"""Request counts and latencies of an aiohttp service (the alert receiver), served at GET /metrics.

`drp_receiver_requests_total{path, method, status}` and
`drp_receiver_request_duration_seconds{path, method}` (histogram), in a registry of the app's own, so
two receivers in one process (tests) do not collide.
"""

import time

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

METRICS_PATH = "/metrics"


def instrument(app: web.Application, prefix: str = "drp_receiver") -> CollectorRegistry:
    registry = CollectorRegistry()
    requests = Counter(f"{prefix}_requests", "HTTP requests answered", ["path", "method", "status"], registry=registry)
    latency = Histogram(
        f"{prefix}_request_duration_seconds", "time to answer an HTTP request", ["path", "method"], registry=registry
    )
    known = {r.resource.canonical for r in app.router.routes() if r.resource is not None}

    @web.middleware
    async def measure(request: web.Request, handler):
        path = request.path if request.path in known else "other"  # bounded label values
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as err:
            status = err.status
            raise
        finally:
            if path != METRICS_PATH:
                requests.labels(path, request.method, str(status)).inc()
                latency.labels(path, request.method).observe(time.perf_counter() - started)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.middlewares.append(measure)
    app.router.add_get(METRICS_PATH, metrics)
    return registry
