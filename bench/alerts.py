"""Benchmark: the alert receiver on the embedded stack (its worker running as a separate process).

    bash scripts/bench.sh alerts [--rate 50 --seconds 10 --latency-runs 20]

1. Alert to runbook started: a PostgresDataCorruption webhook (the playbook's rule: P0,
   db-corruption) is posted; the time from sending it to the runbook's first activity
   being scheduled (from the runbook's history) is measured, one alert at a time.
2. Throughput: `rate` webhooks per second for `seconds`, 5 notifications per alert group
   (the first opens an incident, the rest join it); every response time is recorded. The
   same load is then sent straight to Temporal as signal-with-start calls (what the
   receiver does after authentication and validation): the ratio of the two p99s is the
   receiver's own cost, comparable across noisy runs.
Both run twice, on two fresh stacks: once with the stack's SQLite pragmas for the embedded Temporal
server (Stack.temporal_sqlite_pragmas) and once with SQLite's defaults; the ratio of the receiver's
p99s is the pragmas' effect, comparable across noisy runs.
Target: p99 under 500 ms at 50 alerts/s.
"""

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
from aiohttp import web
from temporalio.service import RPCError

from adapters.processes import free_port
from models.alerts import AlertmanagerWebhook
from models.config import AlertReceiverSettings
from stack.stack import DATABASE, Stack
from starters.alerts import PATH, build_app, deliver
from workers.temporal_client import connect

TOKEN = "bench-token"


def webhook(alertname: str, group: str, **labels: str) -> dict:
    now = datetime.now(UTC).isoformat()
    all_labels = {"alertname": alertname, **labels}
    return {
        "version": "4",
        "groupKey": group,
        "status": "firing",
        "receiver": "drp",
        "groupLabels": all_labels,
        "commonLabels": all_labels,
        "commonAnnotations": {"summary": f"{alertname} (bench)"},
        "externalURL": "",
        "alerts": [
            {
                "status": "firing",
                "labels": all_labels,
                "annotations": {},
                "startsAt": now,
                "fingerprint": uuid.uuid4().hex[:16],
            }
        ],
    }


def percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    if not ordered:
        return {"n": 0}
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "n": len(ordered),
        "p50_ms": round(pick(0.5) * 1000, 1),
        "p95_ms": round(pick(0.95) * 1000, 1),
        "p99_ms": round(pick(0.99) * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


async def first_activity_scheduled(client, workflow_id: str, timeout: float = 30) -> float:
    async with asyncio.timeout(timeout):
        while True:
            try:
                async for e in client.get_workflow_handle(workflow_id).fetch_history_events():
                    if e.HasField("activity_task_scheduled_event_attributes"):
                        return e.event_time.ToDatetime(tzinfo=UTC).timestamp()
            except Exception:  # not started yet
                pass
            await asyncio.sleep(0.02)


async def alert_to_runbook(client, http: httpx.AsyncClient, url: str, runs: int) -> dict:
    """Latency of `runs` alerts, one at a time; returns once every runbook they started has ended, so
    their work (pg_amcheck and a dump of every table) does not load the throughput phase."""
    samples, runbooks = [], []
    for _ in range(runs):
        body = webhook("PostgresDataCorruption", f"bench-{uuid.uuid4().hex}", datname=DATABASE)
        sent = time.time()
        answer = await http.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        answer.raise_for_status()
        incident = answer.json()["incident_id"]
        runbooks.append(f"db-corruption-{incident}")
        samples.append(await first_activity_scheduled(client, runbooks[-1]) - sent)
    async with asyncio.timeout(600):
        await asyncio.gather(*(client.get_workflow_handle(r).result() for r in runbooks), return_exceptions=True)
    return percentiles(samples)


async def paced(rate: float, seconds: float, send) -> tuple[list[float], float, int]:
    """Call `send(i)` `rate` times a second for `seconds`.

    Returns each successful call's duration (s), the achieved rate (calls/s) and how many calls failed
    (an RPC deadline or a 5xx: Alertmanager would retry those)."""
    latencies: list[float] = []
    failed = 0

    async def timed(i: int) -> None:
        nonlocal failed
        t = time.perf_counter()
        try:
            await send(i)
        except (RPCError, httpx.HTTPError):
            failed += 1
        else:
            latencies.append(time.perf_counter() - t)

    start, tasks = time.perf_counter(), []
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(timed(i)))
    await asyncio.gather(*tasks)
    return latencies, len(tasks) / (time.perf_counter() - start), failed


async def measure(label: str, pragmas: tuple[str, ...], args) -> dict:
    """One fresh stack whose Temporal server runs with these SQLite pragmas: both measurements."""
    state = Path(tempfile.mkdtemp(prefix="drp-bench-alerts-"))
    os.chmod(state, 0o755)
    stack = Stack(state, companies=200, task_queue="drp-bench")
    stack.temporal_sqlite_pragmas = pragmas
    runner = None
    try:
        stack.up(with_worker=True, log=lambda *_: None)
        client = await connect(stack.temporal_address)
        runner = web.AppRunner(build_app(client, AlertReceiverSettings(bearer_token=TOKEN), stack.task_queue))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}{PATH}"
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as http:
            latency = await alert_to_runbook(client, http, url, args.latency_runs)
            run = uuid.uuid4().hex[:6]

            async def via_receiver(i: int) -> None:
                body = webhook("BenchLoad", f"load-{run}-{i // 5}", severity="info")
                (await http.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"})).raise_for_status()

            async def straight_to_temporal(i: int) -> None:
                await deliver(
                    client,
                    AlertmanagerWebhook.model_validate(webhook("BenchLoad", f"direct-{run}-{i // 5}", severity="info")),
                    stack.task_queue,
                )

            receiver_lat, receiver_rate, receiver_failed = await paced(args.rate, args.seconds, via_receiver)
            direct_lat, direct_rate, direct_failed = await paced(args.rate, args.seconds, straight_to_temporal)
        receiver, direct = percentiles(receiver_lat), percentiles(direct_lat)
        result = {
            "temporal_sqlite": label,
            "alert_to_runbook_first_activity": latency,
            "receiver": {**receiver, "failed": receiver_failed, "achieved_per_s": round(receiver_rate, 1)},
            "signal_with_start_only": {**direct, "failed": direct_failed, "achieved_per_s": round(direct_rate, 1)},
            "p99_ratio_receiver_over_direct": round(receiver["p99_ms"] / direct["p99_ms"], 2),
        }
        print(json.dumps(result, indent=2), flush=True)
        return result
    finally:
        if runner:
            await runner.cleanup()
        stack.down(log=lambda *_: None)
        shutil.rmtree(state, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the comparison run on SQLite's default pragmas"
    )
    args = parser.parse_args()
    print(json.dumps({"load_average_at_start": os.getloadavg()}), flush=True)
    tuned = await measure("wal, synchronous=normal", Stack.temporal_sqlite_pragmas, args)
    if not args.no_baseline:
        baseline = await measure("SQLite defaults", (), args)
        print(
            json.dumps(
                {
                    "receiver_p99_ratio_defaults_over_tuned": round(
                        baseline["receiver"]["p99_ms"] / tuned["receiver"]["p99_ms"], 2
                    ),
                    "load_average_at_end": os.getloadavg(),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
