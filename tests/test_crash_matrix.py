"""Crash at every step (issue 9): every runbook, its worker process SIGKILLed at an activity boundary or in
the middle of a long activity (tests/crash_worker.py, tests/crash.py), a new worker finishes the run.

Each case asserts the run ends with the result an undisturbed run has (same steps, same data), that no
side effect was done twice, counted on the real systems (barman restore records and S3 backups,
PostgreSQL timelines, the demo app's start lines in its log, drp.reinsertions, Route53 change batches and
RDS calls through a counting proxy in front of moto, the SQS queue subscribed to SNS, the Statuspage
fake's requests, kmock's request log) and that no acknowledged write was lost.

The default run is a representative subset: every runbook at one `scheduled`, one `completed` and one
`mid` point, plus Temporal server restarts. `DRP_CRASH_MATRIX=full` runs every point of every runbook
(`returned` included: the activity did its work and the worker died before reporting it). Set
`DRP_CRASH_REPORT=file.jsonl` to collect the matrix (BENCHMARKS.md's table is made from it).
"""

import asyncio
import io
import json
import os
import uuid
from datetime import UTC, datetime, timedelta

import boto3
import httpx
import kmock as kmock_module
import psycopg
import pytest
from kubernetes import client as k8s
from temporalio.service import RPCError

from models.db_corruption import DatabaseCorruptionInput
from models.deletion import AccidentalDeletionInput
from models.failover import DatabaseFailbackInput, DatabaseFailoverInput
from models.region import RegionFailbackInput, RegionFailoverInput
from stack.corrupt import corrupt_table
from stack.stack import DATABASE
from starters.accidental_deletion import api_key_fingerprint, start_accidental_deletion
from starters.db_corruption import start_db_corruption
from starters.db_failback import start_db_failback
from starters.db_failover import start_db_failover
from starters.region_failback import start_region_failback
from starters.region_failover import start_region_failover
from tests.conftest import (
    CREDS,
    activity_attempts,
    approve_when_asked,
    own_stack,
    query_timed_out,
    row_counts,
    running_worker,
)
from tests.crash import Case, Crash, case, points, reporting
from tests.fakes import FakeStatuspage
from tests.test_accidental_deletion import LEAKED_KEY, ROLE, Writer, analyst, snapshot  # noqa: F401 (fixture)
from tests.test_db_failover import AcknowledgedWriter
from tests.test_kubernetes_platform import api_client, fake_deployment_controller
from tests.test_region_failover import (
    BACKUP,
    NAME,
    NS,
    AwsProxy,
    Health,
    deploy_backup,
    raw_settings,
    record,
    replica_lag,
)

FULL = os.environ.get("DRP_CRASH_MATRIX") == "full"
HB = timedelta(seconds=10)  # the runs' heartbeat timeout: how soon a dead worker's long activity is retried


def matrix(default: list[str], full: list[str]) -> list[Case]:
    """The default run: one run crashed at each of `default`'s points in turn (in the order the run reaches
    them: each kill starts the next worker generation). DRP_CRASH_MATRIX=full: one run per point of `full`."""
    return [case(*default)] if not FULL else [Case([p]) for p in points(*full)]


def app_starts(log) -> int:
    """How many times the demo app started: one `listening` line per start in its log."""
    try:
        return sum('"event": "listening"' in line for line in log.read_text().splitlines())
    except OSError:
        return 0


def timeline(server) -> int:
    """A primary's current timeline (its WAL file name's; pg_control's changes only at the next checkpoint)."""
    with server.connect() as conn:
        return int(conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0][:8], 16)


def backup_infos(stack) -> int:
    """Every base backup barman-cloud ever started in the stack's bucket (a backup.info per backup, DONE or not)."""
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=stack.moto_url, **CREDS)
    bucket, _, prefix = stack.barman().destination.removeprefix("s3://").partition("/")
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    return sum(k.endswith("/backup.info") for k in keys)


# --- DatabaseCorruptionRecovery ------------------------------------------------------------------------------

CORRUPTION_STEPS = [
    "assess",
    "approve",
    "stop application",
    "seal primary",
    "restore base backup",
    "replay WAL",
    "verify restore",
    "swap in restored data",
    "start application",
    "verify application",
    "rebuild standby",
    "post-recovery base backup",
]
CORRUPTION_ACTIVITIES = [
    "approvers_for",
    "objectives_for",
    "cluster",
    "assess_database",
    "stop_application",
    "seal_primary",
    "restore_base_backup",
    "replay_wal",
    "verify_restored",
    "swap_in_restored",
    "start_application",
    "check_application",
    "rejoin_as_standby",
    "take_base_backup",
]
CORRUPTION_DEFAULT = [
    "completed:seal_primary",
    "scheduled:restore_base_backup",
    "mid:swap_in_restored+restart",
    "mid:take_base_backup",
]
CORRUPTION_LONG = [
    "assess_database",
    "seal_primary",
    "restore_base_backup",
    "replay_wal",
    "swap_in_restored",
    "rejoin_as_standby",
    "take_base_backup",
]


def full_points(activities: list[str], long: list[str], quick_returned: list[str]) -> list[str]:
    return (
        ["none"]
        + [f"scheduled:{a}" for a in activities]
        + [f"completed:{a}" for a in activities]
        + [f"mid:{a}" for a in long]
        + [f"returned:{a}" for a in quick_returned]
    )


@pytest.mark.parametrize(
    "point",
    matrix(
        CORRUPTION_DEFAULT,
        full_points(
            CORRUPTION_ACTIVITIES, CORRUPTION_LONG, ["stop_application", "start_application", "verify_restored"]
        ),
    ),
    ids=str,
)
async def test_db_corruption_recovery(stack, client, tmp_path, point):
    before = row_counts(stack)
    primary = stack.postgres()
    corrupt_table(primary, DATABASE, "filings")
    inc = f"CM-{uuid.uuid4().hex[:8]}"
    app_log = stack.logs / "app.log"
    starts0, backups0 = app_starts(app_log), backup_infos(stack)
    queue = f"cm-{uuid.uuid4().hex[:8]}"
    wid = f"db-corruption-{inc}"
    async with Crash(
        client, stack, {**stack.worker_settings(), "task_queue": queue}, [queue], tmp_path, point, wid
    ) as crash:
        handle = await start_db_corruption(
            client, DatabaseCorruptionInput(incident_id=inc, database=DATABASE, heartbeat_timeout=HB), queue
        )
        crash.watch(handle)
        await crash.approve(handle, "restore", approver="bob")
        result = await crash.result(handle)
        attempts = await crash.attempts(handle)
    job = json.loads(primary.data_dir.with_name(f"primary.restore-{inc}.job.json").read_text())
    damaged = [p for p in stack.pg_dir.iterdir() if p.name.endswith(f".damaged-{inc}")]
    counts = {
        "restores launched": job["launches"],
        "app starts": app_starts(app_log) - starts0,
        "base backups": backup_infos(stack) - backups0,
        "promotions (timelines)": result.timeline - result.followed_timeline,
        "damaged dirs kept": len(damaged),
    }
    with reporting("DatabaseCorruptionRecovery", point, crash.crashed, attempts, counts):
        assert result.outcome == "recovered"
        assert [s.name for s in result.steps] == CORRUPTION_STEPS
        assert {t: result.recovered_row_counts[t] for t in before} == before == row_counts(stack)  # no data lost
        assert timeline(primary) == result.timeline
        assert result.standby.startswith("streaming from the new primary")
        assert counts == {
            "restores launched": 1,
            "app starts": 1,
            "base backups": 1,
            "promotions (timelines)": 1,
            "damaged dirs kept": 1,
        }, counts


# --- AccidentalDeletionRecovery ------------------------------------------------------------------------------

DELETION_STEPS = [
    "identify",
    "contain",
    "archive current WAL",
    "restore side instance",
    "replay to just before the deletion",
    "extract deleted rows",
    "approve re-insert",
    "re-insert",
    "verify",
    "tear down side instance",
    "approve lifting containment",
    "lift containment",
]
DELETION_ACTIVITIES = [
    "approvers_for",
    "objectives_for",
    "cluster",
    "identify_deletions",
    "contain",
    "archive_current_wal",
    "restore_base_backup",
    "replay_wal",
    "extract_deleted_rows",
    "reinsert_rows",
    "verify_reinserted",
    "remove_side_instance",
    "lift_containment",
]
DELETION_DEFAULT = ["completed:contain", "scheduled:replay_wal", "mid:reinsert_rows"]
DELETION_LONG = ["archive_current_wal", "restore_base_backup", "replay_wal", "extract_deleted_rows", "reinsert_rows"]
SECTORS = iter(
    [
        "Energy",
        "Materials",
        "Technology",
        "Consumer",
        "Telecom",
        "Utilities",
        "Healthcare",
        "Financials",
        "Industrials",
        "Real Estate",
    ]
    * 20
)


@pytest.mark.parametrize(
    "point",
    matrix(
        DELETION_DEFAULT,
        full_points(DELETION_ACTIVITIES, DELETION_LONG, ["contain", "lift_containment", "remove_side_instance"]),
    ),
    ids=str,
)
async def test_accidental_deletion_recovery(stack, client, analyst, tmp_path, point):  # noqa: F811
    primary = stack.postgres()
    base = 1_000_000 + uuid.uuid4().int % 10_000 * 100
    ids = list(range(base, base + 30))
    with primary.connect(DATABASE) as conn:  # the rows the accident deletes
        for i in ids:
            conn.execute(
                "INSERT INTO companies (id, name, ticker, sector) VALUES (%s, %s, %s, 'Crash')",
                (i, f"Crash {i}", f"C{i}"),
            )
    doomed = snapshot(stack, "companies", f"id IN ({','.join(map(str, ids))})")
    assert len(doomed) == len(ids)
    writer = Writer(stack, first_id=20_000_000 + (base - 1_000_000) * 10)  # production keeps writing
    writer.start()
    window_start = datetime.now(UTC) - timedelta(seconds=1)
    with psycopg.connect(**analyst) as conn:
        conn.execute("DELETE FROM companies WHERE sector = 'Crash' AND id = ANY(%s)", (ids,))
    inc = f"CD-{uuid.uuid4().hex[:8]}"
    queue = f"cd-{uuid.uuid4().hex[:8]}"
    side_job = primary.data_dir.with_name(f"primary.side-{inc}.job.json")
    try:
        async with Crash(
            client,
            stack,
            {**stack.worker_settings(), "task_queue": queue},
            [queue],
            tmp_path,
            point,
            f"accidental-deletion-{inc}",
        ) as crash:
            handle = await start_accidental_deletion(
                client,
                AccidentalDeletionInput(
                    incident_id=inc,
                    database=DATABASE,
                    window_start=window_start,
                    table="companies",
                    role=ROLE,
                    api_key_sha256=api_key_fingerprint(LEAKED_KEY),
                    heartbeat_timeout=HB,
                ),
                queue,
            )
            crash.watch(handle)
            await crash.approve(handle, "re-insert", approver="bob")
            launches = json.loads(side_job.read_text())["launches"]  # the side instance still exists here
            await crash.approve(handle, "lift containment", approver="bob")
            result = await crash.result(handle)
            attempts = await crash.attempts(handle)
    finally:
        writer.stop.set()
        writer.join()
    with primary.connect(DATABASE) as conn:
        reinsertions = conn.execute("SELECT count(*) FROM drp.reinsertions WHERE incident_id = %s", (inc,)).fetchone()[
            0
        ]
        containment = conn.execute(
            "SELECT count(*), count(restored_at) FROM drp.containment WHERE incident_id = %s", (inc,)
        ).fetchone()
        can_delete = conn.execute("SELECT has_table_privilege(%s, 'public.companies', 'DELETE')", (ROLE,)).fetchone()[0]
    live = snapshot(stack, "metrics", "metric = 'live'")
    counts = {
        "side restores launched": launches,
        "re-insert transactions": reinsertions,
        "rows re-inserted": sum(result.reinserted.inserted_by_table.values()),
        "privileges revoked/given back": f"{containment[0]}/{containment[1]}",
        "acknowledged writes lost": len(set(writer.written) - set(live)),
    }
    with reporting("AccidentalDeletionRecovery", point, crash.crashed, attempts, counts):
        assert [s.name for s in result.steps] == DELETION_STEPS
        assert snapshot(stack, "companies", f"id IN ({','.join(map(str, ids))})") == doomed  # every row back as it was
        assert result.reinserted.conflicts_by_table == {} and result.containment_lifted and can_delete
        assert (
            httpx.get(f"{stack.app_url}/api/v1/companies?limit=1", headers={"X-API-Key": LEAKED_KEY}).status_code == 200
        )
        assert not [p for p in stack.pg_dir.iterdir() if ".side-" in p.name]
        assert containment[0] == containment[1] > 0
        assert counts["side restores launched"] == 1 and reinsertions == 1 and counts["rows re-inserted"] == len(ids)
        assert counts["acknowledged writes lost"] == 0 and writer.written


# --- DatabaseFailover / DatabaseFailback ---------------------------------------------------------------------

FAILOVER_STEPS = [
    "check standby",
    "approve",
    "stop application",
    "fence old primary",
    "promote standby",
    "repoint application",
    "start application",
    "verify a write",
]
FAILOVER_ACTIVITIES = [
    "approvers_for",
    "objectives_for",
    "cluster",
    "database_target",
    "check_standby",
    "stop_application",
    "fence_primary",
    "promote_standby",
    "repoint_application",
    "start_application",
    "check_write",
]
FAILBACK_STEPS = [
    "rejoin old primary as standby",
    "wait for catch-up",
    "approve",
    "stop application",
    "fence current primary",
    "promote old primary",
    "repoint and start application",
    "verify a write",
    "rejoin former standby",
]
FAILBACK_ACTIVITIES = [
    "approvers_for",
    "cluster",
    "rejoin_as_standby",
    "await_catch_up",
    "stop_application",
    "fence_primary",
    "promote_standby",
    "repoint_application",
    "start_application",
    "check_write",
    "rejoin_as_standby#2",
]


@pytest.fixture(scope="module")
def pair():
    # asynchronous, as tests/test_region_failover.py's pg_pair: DatabaseFailback on a synchronous pair waits in its
    # write check on a standby it rejoins only after that check (a known DatabaseFailback issue, not a crash one)
    with own_stack("drp-test-crash-", companies=20) as s:
        yield s


def serving(pair):
    """Which server of the pair is the writable primary now."""
    for name, server in (("primary", pair.postgres()), ("standby", pair.standby())):
        if server.is_running():
            with server.connect() as conn:
                if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    return name
    return None


async def ensure_serving(pair, client, want: str) -> None:
    """Put the pair in the topology a case starts from with an undisturbed run of the other runbook (the
    cases alternate, so normally there is nothing to do)."""
    if serving(pair) == want:
        return
    async with running_worker(client, pair) as queue:
        if want == "standby":
            handle = await start_db_failover(
                client, DatabaseFailoverInput(incident_id=f"SET-{uuid.uuid4().hex[:6]}"), queue
            )
        else:
            handle = await start_db_failback(
                client, DatabaseFailbackInput(incident_id=f"SET-{uuid.uuid4().hex[:6]}"), queue
            )
        await approve_when_asked(handle, approver="bob", reason="set up the crash case")
        await handle.result()
    assert serving(pair) == want


def acknowledged_present(server, ids: list[int]) -> int:
    with server.connect(DATABASE) as conn:
        return len({r[0] for r in conn.execute("SELECT id FROM app_write_checks WHERE id = ANY(%s)", (ids,))})


# Neither has an activity that heartbeats in every run: promote_standby does only while the standby still
# lacks the fenced primary's last WAL, and rejoin_as_standby only while it rewinds or copies (after the
# failover case the old primary is already a configured standby: it just starts). Their in-activity point
# is `returned`: the work done, the result never reported, so the retry runs it again.
FAILOVER_DEFAULT = ["scheduled:fence_primary", "returned:promote_standby", "completed:repoint_application"]
FAILBACK_DEFAULT = ["returned:rejoin_as_standby", "completed:fence_primary+restart", "scheduled:promote_standby"]


def failover_points() -> list:
    """Failover and failback cases alternate, so that each leaves the pair where the next one starts."""
    over = matrix(
        FAILOVER_DEFAULT,
        full_points(
            FAILOVER_ACTIVITIES,
            [],
            ["stop_application", "fence_primary", "promote_standby", "repoint_application", "start_application"],
        ),
    )
    back = matrix(
        FAILBACK_DEFAULT,
        full_points(
            FAILBACK_ACTIVITIES,
            ["rejoin_as_standby", "rejoin_as_standby#2", "await_catch_up"],
            ["stop_application", "start_application", "repoint_application"],
        ),
    )
    cases = []
    for i in range(max(len(over), len(back))):
        cases += [pytest.param("DatabaseFailover", c, id=f"DatabaseFailover: {c}") for c in over[i : i + 1]]
        cases += [pytest.param("DatabaseFailback", c, id=f"DatabaseFailback: {c}") for c in back[i : i + 1]]
    return cases


@pytest.mark.parametrize("runbook, point", failover_points())
async def test_db_failover_and_failback(pair, stack, client, tmp_path, runbook, point):
    failover = runbook == "DatabaseFailover"
    await ensure_serving(pair, client, "primary" if failover else "standby")
    primary, standby = pair.postgres(), pair.standby()
    current, other = (primary, standby) if failover else (standby, primary)
    timeline0 = timeline(current)
    starts0 = app_starts(pair.logs / "app.log")
    writer = AcknowledgedWriter(current)
    if failover:  # commits until the fence stops the current primary (the standby is synchronous)
        writer.start()
        async with asyncio.timeout(300):
            while len(writer.acknowledged) < 5:
                await asyncio.sleep(0.05)
    else:  # the failback waits for the old primary to catch up: writes made before it, on the serving one
        with current.connect(DATABASE) as conn:
            writer.acknowledged = [
                conn.execute("INSERT INTO app_write_checks DEFAULT VALUES RETURNING id").fetchone()[0]
                for _ in range(25)
            ]
    inc = f"CF-{uuid.uuid4().hex[:8]}"
    queue = f"cf-{uuid.uuid4().hex[:8]}"
    wid = f"db-failover-{inc}" if failover else f"db-failback-{inc}"
    try:
        # the pair has no Temporal of its own: its workers use the session's
        settings = {**pair.worker_settings(), "task_queue": queue, "temporal_address": stack.temporal_address}
        async with Crash(client, stack, settings, [queue], tmp_path, point, wid) as crash:
            if failover:
                handle = await start_db_failover(
                    client, DatabaseFailoverInput(incident_id=inc, heartbeat_timeout=HB), queue
                )
            else:
                handle = await start_db_failback(
                    client, DatabaseFailbackInput(incident_id=inc, heartbeat_timeout=HB), queue
                )
            crash.watch(handle)
            await crash.approve(handle, approver="bob")
            result = await crash.result(handle)
            attempts = await crash.attempts(handle)
    finally:
        if writer.is_alive():
            await asyncio.to_thread(writer.join, 120)
    # the server now serving must be the other one, one timeline further: promoted exactly once
    counts = {
        "promotions (timelines)": timeline(other) - timeline0,
        "app starts": app_starts(pair.logs / "app.log") - starts0,
        "acknowledged writes lost": len(writer.acknowledged) - acknowledged_present(other, writer.acknowledged),
    }
    with reporting(runbook, point, crash.crashed, attempts, counts):
        assert [s.name for s in result.steps] == (FAILOVER_STEPS if failover else FAILBACK_STEPS)
        assert serving(pair) == ("standby" if failover else "primary")
        assert result.write_check.served_by_port == other.port
        assert counts == {"promotions (timelines)": 1, "app starts": 1, "acknowledged writes lost": 0}, counts
        if failover:
            assert not current.is_running() and (current.data_dir / "standby.signal").exists()
        else:
            with standby.connect() as conn:
                in_recovery, sender = conn.execute(
                    "SELECT pg_is_in_recovery(), (SELECT sender_port FROM pg_stat_wal_receiver)"
                ).fetchone()
            assert in_recovery and sender == primary.port  # the original topology is back


# --- RegionFailover / RegionFailback (moto, kmock, Statuspage fake) ------------------------------------------

REGION_STEPS = [
    "plan",
    "verify primary is down",
    "check replica lag",
    "approve",
    "promote replica",
    "switch DNS",
    "scale backup region",
    "verify backup region",
    "notify",
]
REGION_DEFAULT = [
    "mid:verify_primary_down",
    "completed:promote_rds_replica+restart",
    "scheduled:switch_dns",
    "returned:notify_failover",
]
REGION_ACTIVITIES = [
    "approvers_for",
    "objectives_for",
    "plan_region_failover",
    "verify_primary_down",
    "replica_lag",
    "promote_rds_replica",
    "switch_dns",
    "scale_region",
    "check_region_health",
    "notify_failover",
]
FAILBACK_REGION_STEPS = [
    "plan",
    "create home replica",
    "approve",
    "promote home replica",
    "switch DNS home",
    "scale home region",
    "verify home region",
    "scale serving region down",
    "notify",
]
FAILBACK_REGION_DEFAULT = ["scheduled:create_home_replica", "mid:switch_dns", "completed:scale_region"]
FAILBACK_REGION_ACTIVITIES = [
    "approvers_for",
    "plan_region_failback",
    "create_home_replica",
    "promote_rds_replica",
    "switch_dns",
    "scale_region",
    "check_region_health",
    "scale_down_region",
    "notify_failover",
]


class CountingProxy(AwsProxy):
    """AwsProxy (Route53 change batches) that also counts the RDS and SNS calls that change something."""

    COUNTED = ("PromoteReadReplica", "CreateDBInstanceReadReplica", "Publish")

    def __init__(self, upstream: str):
        self.actions: list[str] = []
        outer = self
        super().__init__(upstream)
        forward = self.server.RequestHandlerClass._forward

        def counting(handler):
            body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
            for action in outer.COUNTED:
                if f"Action={action}&".encode() in body + b"&":
                    outer.actions.append(action)
            connection, handler.rfile = handler.rfile, io.BytesIO(body)  # AwsProxy's forward reads the body
            try:
                return forward(handler)
            finally:
                handler.rfile = connection

        cls = self.server.RequestHandlerClass
        cls.do_GET = cls.do_POST = cls.do_PUT = cls.do_DELETE = counting

    def count(self, action: str) -> int:
        return self.actions.count(action)


def sqs_messages(world) -> list[dict]:
    out = []
    while True:
        got = world["sqs"].receive_message(QueueUrl=world["queue"], MaxNumberOfMessages=10, WaitTimeSeconds=0)
        if not got.get("Messages"):
            return out
        out += got["Messages"]
        for m in got["Messages"]:
            world["sqs"].delete_message(QueueUrl=world["queue"], ReceiptHandle=m["ReceiptHandle"])


async def scale_patches(kmock) -> list[int]:
    return [
        r.data["spec"]["replicas"]
        for r in kmock["patch"]
        if "status" not in (r.data or {}) and "spec" in (r.data or {})
    ]


@pytest.mark.parametrize(
    "point",
    matrix(
        REGION_DEFAULT,
        full_points(
            REGION_ACTIVITIES,
            ["verify_primary_down", "switch_dns"],
            ["promote_rds_replica", "switch_dns", "scale_region", "notify_failover"],
        ),
    ),
    ids=str,
)
async def test_region_failover(stack, client, aws, world, kmock, tmp_path, point):
    primary, backup = Health(None), Health(200)
    status_page = FakeStatuspage()
    proxy = CountingProxy(aws)
    await deploy_backup(kmock)
    replica_lag(world, 1)
    stop = asyncio.Event()
    controller = asyncio.create_task(fake_deployment_controller(kmock, stop, NS, NAME))
    queue = f"cr-{uuid.uuid4().hex[:8]}"
    raw = raw_settings(stack, proxy.url, world, kmock, primary, backup, queue, status_page=status_page)
    inc = f"CR-{world['tag']}"
    try:
        async with Crash(
            client,
            stack,
            raw,
            [queue, raw["failover"]["regions"][BACKUP]["task_queue"]],
            tmp_path,
            point,
            f"region-failover-{inc}",
        ) as crash:
            handle = await start_region_failover(
                client,
                RegionFailoverInput(
                    incident_id=inc,
                    backup_region=BACKUP,
                    health_checks=3,
                    heartbeat_timeout=HB,
                    health_check_spacing=timedelta(milliseconds=200),
                ),
                queue,
            )
            crash.watch(handle)
            await crash.approve(handle)
            result = await crash.result(handle)
            attempts = await crash.attempts(handle)
    finally:
        stop.set()
        await controller
        primary.close()
        backup.close()
        proxy.close()
        status_page.close()
    messages = sqs_messages(world)
    patches = await scale_patches(kmock)
    counts = {
        "RDS promotions": proxy.count("PromoteReadReplica"),
        "Route53 change batches": len(proxy.changes),
        "SNS messages": len(messages),
        "Statuspage incidents opened": len(status_page.incidents),
        "Statuspage POSTs": sum(c.startswith("POST") for c in status_page.calls),
        "k8s scale patches": len(patches),
    }
    with reporting("RegionFailover", point, crash.crashed, attempts, counts):
        assert [s.name for s in result.steps] == REGION_STEPS
        [dns] = record(world)
        assert dns["AliasTarget"]["DNSName"].rstrip(".") == "backup-lb.us-west-2.elb.amazonaws.com"
        dep = await asyncio.to_thread(k8s.AppsV1Api(api_client(kmock)).read_namespaced_deployment, NAME, NS)
        assert dep.spec.replicas == 4 and set(patches) == {4}
        assert result.promoted.replica_id == world["replica"]
        assert {k: v for k, v in counts.items() if k != "k8s scale patches"} == {
            "RDS promotions": 1,
            "Route53 change batches": 1,
            "SNS messages": 1,
            "Statuspage incidents opened": 1,
            "Statuspage POSTs": 1,
        }, counts


@pytest.mark.parametrize(
    "point",
    matrix(
        FAILBACK_REGION_DEFAULT,
        full_points(
            FAILBACK_REGION_ACTIVITIES,
            ["switch_dns"],
            [
                "create_home_replica",
                "promote_rds_replica",
                "switch_dns",
                "scale_region",
                "scale_down_region",
                "notify_failover",
            ],
        ),
    ),
    ids=str,
)
async def test_region_failback(stack, client, aws, world, kmock, tmp_path, point):
    primary, backup = Health(None), Health(200)
    proxy = CountingProxy(aws)
    replica_lag(world, 1)
    async with kmock_module.KubernetesEmulator() as home_kmock, kmock_module.Server(home_kmock):
        await deploy_backup(kmock)
        await deploy_backup(home_kmock, replicas=0)
        stop = asyncio.Event()
        controllers = [asyncio.create_task(fake_deployment_controller(k, stop, NS, NAME)) for k in (kmock, home_kmock)]
        queue = f"cb-{uuid.uuid4().hex[:8]}"
        raw = raw_settings(stack, proxy.url, world, kmock, primary, backup, queue, home_kmock=home_kmock)
        inc = f"CB-{world['tag']}"
        queues = [queue] + [r["task_queue"] for r in raw["failover"]["regions"].values()]
        try:
            async with Crash(
                client, stack, raw, queues, tmp_path / "failover", Case(), f"region-failover-{inc}"
            ) as setup:
                failover = await start_region_failover(
                    client, RegionFailoverInput(incident_id=inc, backup_region=BACKUP, health_checks=1), queue
                )
                await setup.approve(failover)
                await setup.result(failover)
            primary.status = 200  # the primary region is back
            sqs_messages(world)
            before = {a: proxy.count(a) for a in CountingProxy.COUNTED}
            changes0, patches0 = len(proxy.changes), len(await scale_patches(home_kmock))
            async with Crash(
                client, stack, raw, queues, tmp_path / "failback", point, f"region-failback-{inc}"
            ) as crash:
                handle = await start_region_failback(
                    client, RegionFailbackInput(incident_id=inc, serving_region=BACKUP, heartbeat_timeout=HB), queue
                )
                crash.watch(handle)
                await crash.approve(handle)
                result = await crash.result(handle)
                attempts = await crash.attempts(handle)
        finally:
            stop.set()
            await asyncio.gather(*controllers)
            primary.close()
            backup.close()
            proxy.close()
        home_dep = await asyncio.to_thread(k8s.AppsV1Api(api_client(home_kmock)).read_namespaced_deployment, NAME, NS)
        home_patches = (await scale_patches(home_kmock))[patches0:]
    away = await asyncio.to_thread(k8s.AppsV1Api(api_client(kmock)).read_namespaced_deployment, NAME, NS)
    counts = {
        "home replicas created": proxy.count("CreateDBInstanceReadReplica") - before["CreateDBInstanceReadReplica"],
        "RDS promotions": proxy.count("PromoteReadReplica") - before["PromoteReadReplica"],
        "Route53 change batches": len(proxy.changes) - changes0,
        "SNS messages": len(sqs_messages(world)),
        "k8s home scale patches": len(home_patches),
    }
    with reporting("RegionFailback", point, crash.crashed, attempts, counts):
        assert [s.name for s in result.steps] == FAILBACK_REGION_STEPS
        [dns] = record(world)
        assert dns["AliasTarget"]["DNSName"].rstrip(".") == "primary-lb.us-east-1.elb.amazonaws.com"
        assert home_dep.spec.replicas == 6 and away.spec.replicas == 0
        east = boto3.client("rds", region_name="us-east-1", endpoint_url=aws, **CREDS)
        assert east.describe_db_instances(DBInstanceIdentifier=result.replica.replica_id)["DBInstances"]
        assert {k: v for k, v in counts.items() if k != "k8s home scale patches"} == {
            "home replicas created": 1,
            "RDS promotions": 1,
            "Route53 change batches": 1,
            "SNS messages": 1,
        }, counts


def test_the_default_matrix_covers_every_runbook_at_each_kind_of_point():
    """Issue 9's floor for the default run: every runbook at a scheduled, a completed and a mid point,
    and at least one Temporal server restart."""
    default = {
        "DatabaseCorruptionRecovery": CORRUPTION_DEFAULT,
        "AccidentalDeletionRecovery": DELETION_DEFAULT,
        "DatabaseFailover": FAILOVER_DEFAULT,
        "DatabaseFailback": FAILBACK_DEFAULT,
        "RegionFailover": REGION_DEFAULT,
        "RegionFailback": FAILBACK_REGION_DEFAULT,
        "Incident": INCIDENT_DEFAULT,
    }
    for runbook, specs in default.items():
        kinds = {p.kind for p in points(*specs)}
        # the database failover and failback have no activity that heartbeats in every run: `returned`
        assert {"scheduled", "completed"} <= kinds and kinds & {"mid", "returned"}, runbook
    assert any(p.restart for specs in default.values() for p in points(*specs))


INCIDENT_DEFAULT = ["scheduled:send_notification", "returned:send_notification", "completed:send_notification"]


# --- Incident (the parent workflow: notifications through the Redis delivery ledger) ----------------------


@pytest.mark.parametrize(
    "point",
    matrix(
        INCIDENT_DEFAULT,
        ["none", "scheduled:plan_incident", "completed:plan_incident"]
        + [f"{kind}:send_notification#{n}" for kind in ("scheduled", "returned", "completed") for n in (1, 2, 3, 4)]
        + [
            "scheduled:write_report",
            "returned:write_report",
            "completed:write_report",
            "completed:send_notification#4+restart",
        ],
    ),
    ids=str,
)
async def test_incident(stack, client, notify_world, tmp_path, point):
    import redis

    from models.incident import IncidentInput, ResolveRequest
    from starters.incident import open_incident
    from tests.notify_world import short_playbook
    from tests.test_incident import status_when
    from workflows.incident import Incident

    world = notify_world
    # no cadence or escalation tick during the case: the messages are the opening's and the resolution's
    playbook = short_playbook(tmp_path, status_update_every="1h", status_page_update_every="1h")
    inc, queue = f"INC-CM{uuid.uuid4().hex[:8]}", f"ci-{uuid.uuid4().hex[:8]}"
    raw = {**stack.worker_settings(), "task_queue": queue, "playbook_path": str(playbook), "notify": world.settings}
    async with Crash(client, stack, raw, [queue], tmp_path, point, inc) as crash:
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
        crash.watch(handle)
        if crash.points and crash.points[0].activity == "send_notification":  # the opening's messages
            async with asyncio.timeout(300):
                while not crash.crashed:
                    await asyncio.sleep(0.1)
        await status_when(handle, lambda s: any(e.kind == "message" for e in s.timeline), timeout=300)
        async with asyncio.timeout(300):
            while True:
                try:
                    await handle.execute_update(Incident.resolve, ResolveRequest(by="alice", reason="mitigated"))
                    break
                except RPCError as err:
                    if "no poller" not in str(err).lower() and not query_timed_out(err):
                        raise
                    await asyncio.sleep(0.5)
        result = await crash.result(handle)
        attempts = await crash.attempts(handle)
        retried = sum(a > 1 for a in await activity_attempts(handle, "send_notification"))
    ledger = redis.Redis.from_url(stack.redis_url)
    channels = [k.decode().rsplit("/", 1)[1] for k in ledger.keys(f"drp:notify:{inc}/*")]
    ledgered = {
        "slack": channels.count("incidents_slack"),
        "pager": channels.count("oncall_pager"),
        "mail": sum(c.endswith("_email") for c in channels),
        "status page": sum("status" in c for c in channels),
    }
    received = {
        "slack": len(world.slack.messages),
        "pager": len(world.pages()),
        "mail": len(world.mail.messages),
        "status page": sum(not c.startswith("GET") for c in world.page.calls),
    }
    counts = {f"{c} sent/ledgered": f"{received[c]}/{ledgered[c]}" for c in received}
    with reporting("Incident", point, crash.crashed, attempts, counts):
        assert result.status == "resolved"
        # each delivery once; the only repeat allowed is a message another activity of the dead worker had handed
        # to its provider without reaching the ledger (README, "Incidents"): at most the number retried
        assert all(received[c] >= ledgered[c] for c in received), counts
        assert sum(received.values()) - sum(ledgered.values()) <= retried, (counts, retried)
        assert ledgered["slack"] >= 2 and ledgered["pager"] >= 1  # opened and resolved
