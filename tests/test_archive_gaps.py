"""Issue 10's remaining gaps, each through the operator's door (`drp start`, `drp approve` as subprocesses,
SQL from other clients), each counting the acknowledged writes and looking at the archive:

- a primary found crashed with WAL it never archived (`.ready`, and the partly written last segment);
- logical-replication apply workers writing through the seal (a subscription to another server);
- the archive failing during the replay (an S3 proxy that answers WAL reads with 500 for a while).
"""

import asyncio
import contextlib
import http.client
import os
import pwd
import shutil
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from adapters.barman import ARCHIVE_UNREADABLE
from adapters.pgserver import PgServer, embedded_bin_dir, run_as
from adapters.processes import free_port
from adapters.timelines import waldump_end
from models.db_corruption import CorruptionRecoveryResult
from models.deletion import DeletionRecoveryResult
from models.failover import DatabaseFailbackResult, DatabaseFailoverResult
from stack.corrupt import corrupt_table
from stack.stack import DATABASE, STANDBY_NAME
from tests.conftest import activity_attempts, own_stack, running_worker, wait_for_approval_gate
from tests.test_recovery_safety import wal_keys

ROOT = Path(__file__).resolve().parent.parent
RESULTS = {
    "db-corruption": CorruptionRecoveryResult,
    "deletion": DeletionRecoveryResult,
    "failover": DatabaseFailoverResult,
    "failback": DatabaseFailbackResult,
}


def incident() -> str:
    return f"AG-{uuid.uuid4().hex[:8]}"


def drp(stack, queue: str, *args: str, temporal: str | None = None) -> subprocess.CompletedProcess:
    """The operator's command line against the test's worker queue and the session's Temporal."""
    env = {
        **os.environ,
        "DRP_SETTINGS_FILE": str(stack.settings_file),
        "DRP_TASK_QUEUE": queue,
        "DRP_TEMPORAL_ADDRESS": temporal or stack.temporal_address,
    }
    return subprocess.run(
        [sys.executable, "-m", "starters.cli", "--state-dir", str(stack.state_dir), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
        env=env,
    )


async def drp_start(client, stack, queue: str, procedure: str, inc: str, *extra: str, temporal: str | None = None):
    """`drp start PROCEDURE --incident INC ...`; the handle of the run it started. (In a thread: the test's
    worker shares this event loop.)"""
    database = ("--database", DATABASE) if procedure in ("db-corruption", "deletion") else ()
    started = await asyncio.to_thread(
        drp,
        stack,
        queue,
        "start",
        procedure,
        "--incident",
        inc,
        *database,
        "--task-queue",
        queue,
        *extra,
        temporal=temporal,
    )
    assert started.returncode == 0, started.stderr
    return client.get_workflow_handle(started.stdout.split()[-1], result_type=RESULTS[procedure])


async def drp_approve(stack, queue: str, inc: str, temporal: str | None = None, by: str = "alice") -> None:
    """`drp approve` (in a thread: the test's worker shares this event loop), asked again as an operator would
    while the run's workflow task is being retried on a loaded machine ("Workflow Task in failed state", an
    update that timed out); bounded in minutes."""
    deadline = time.monotonic() + 300
    while True:
        approved = await asyncio.to_thread(
            drp, stack, queue, "approve", inc, "--by", by, "--reason", "approved in the test suite", temporal=temporal
        )
        transient = "Workflow Task in failed state" in approved.stderr or "imeout" in approved.stderr
        if approved.returncode == 0 or not transient or time.monotonic() > deadline:
            break
    assert approved.returncode == 0, approved.stderr


async def start_and_approve(client, stack, queue: str, inc: str, procedure: str = "db-corruption", *extra: str):
    handle = await drp_start(client, stack, queue, procedure, inc, *extra)
    await wait_for_approval_gate(handle)
    await drp_approve(stack, queue, inc)
    return handle


def ids_present(server: PgServer, table: str, ids: list[int]) -> set[int]:
    with server.connect(DATABASE) as conn:
        return {r[0] for r in conn.execute(f"SELECT id FROM {table} WHERE id = ANY(%s)", (ids,))}


def test_the_end_of_a_crashed_primary_wal_is_read_where_crash_recovery_would_stop():
    size = 16 * 1024 * 1024
    assert (
        waldump_end(
            "pg_waldump: error: error in WAL record at 0/4002C70: invalid record length at 0/4002C98: "
            "expected at least 24, got 0",
            size,
        )
        == "0/4002C98"
    )
    assert (
        waldump_end('pg_waldump: error: could not find file "0000000200000001000000FF": No such file', size)
        == "1/FF000000"
    )
    assert waldump_end("", size) is None


async def test_wal_a_crashed_primary_never_archived_is_archived_and_replayed(stack, client):
    """The primary's archive_command fails for a while, commits go on (some in complete segments left
    `.ready`, some in the partly written last segment), then it crashes. The recovery must keep every
    acknowledged commit: the `.ready` segments are archived from its pg_wal, the last one read from it
    by restore_command, and the replay is refused unless it reaches the end of that WAL."""
    pg = stack.postgres()
    with pg.connect() as conn:
        conn.execute("ALTER SYSTEM SET archive_command = 'false'")  # the archive fails for a while
        conn.execute("SELECT pg_reload_conf()")
    with pg.connect(DATABASE) as conn:
        acknowledged = [
            conn.execute("INSERT INTO app_write_checks DEFAULT VALUES RETURNING id").fetchone()[0] for _ in range(20)
        ]
        segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]  # complete, .ready
        acknowledged += [
            conn.execute("INSERT INTO app_write_checks DEFAULT VALUES RETURNING id").fetchone()[0] for _ in range(10)
        ]  # only in the current, partly written segment
    ready = pg.data_dir / "pg_wal" / "archive_status" / f"{segment}.ready"
    assert ready.exists()
    assert not any(Path(k).name.startswith(segment) for k in wal_keys(stack))
    pg.stop(mode="immediate")  # the damaged primary crashes
    inc = incident()
    async with running_worker(client, stack) as queue:
        handle = await start_and_approve(client, stack, queue, inc)
        result = await handle.result()
    assert result.outcome == "recovered" and result.data_loss is None
    assert result.rpo_actual.total_seconds() == 0 and segment in result.unarchived_wal
    assert ids_present(pg, "app_write_checks", acknowledged) == set(acknowledged)
    assert any(Path(k).name.startswith(segment) for k in wal_keys(stack))  # the archive is whole again
    damaged = Path(result.damaged_data_dir)
    assert (damaged / "pg_wal" / "archive_status" / f"{segment}.ready").exists()  # evidence left as it was
    with pg.connect() as conn:  # production (the restore) archives with its own archive_command
        assert conn.execute("SHOW archive_command").fetchone()[0] != "false"


def test_a_stopped_primary_whose_wal_cannot_be_read_is_not_called_recovered():
    from models.postgres import SealResult
    from workflows.db_corruption import _data_loss_window, _possible_loss

    unknown = SealResult(was_running=False, timeline=1, wal_end_unknown="pg_wal: no such directory")
    assert "no such directory" in _possible_loss(unknown, None)
    known = SealResult(was_running=False, timeline=1, end_lsn="0/4002C98", local_wal_dir="/x/pg_wal")
    assert _possible_loss(known, None) is None
    from datetime import datetime

    assert _data_loss_window(known, datetime.now(UTC), None).total_seconds() == 0


@contextlib.contextmanager
def publisher_server(stack):
    """Another PostgreSQL server (wal_level = logical) publishing a table `feed`."""
    data = stack.pg_dir / f"publisher-{uuid.uuid4().hex[:6]}"
    data.parent.mkdir(parents=True, exist_ok=True)
    server = PgServer(bin_dir=embedded_bin_dir(), data_dir=data, port=free_port(), os_user=stack.config.os_user)
    if server.os_user and os.geteuid() == 0:
        data.mkdir(mode=0o700)
        user = pwd.getpwnam(server.os_user)
        os.chown(data, user.pw_uid, user.pw_gid)
    server.tool("initdb", "-D", str(data), "-U", server.superuser, "-A", "trust", "--locale=C", timeout=120)
    subprocess.run(
        run_as(server.os_user, ["sh", "-c", 'cat >> "$0"', str(data / "postgresql.conf")]),
        input=b"wal_level = logical\nunix_socket_directories = ''\n",
        check=True,
    )
    server.start()
    try:
        with server.connect() as conn:
            conn.execute("CREATE TABLE feed (id bigint PRIMARY KEY)")
            conn.execute("CREATE PUBLICATION feed_pub FOR TABLE feed")
        yield server
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(data, ignore_errors=True)
        server.log_file.unlink(missing_ok=True)


async def test_a_subscription_is_disabled_by_the_seal_and_enabled_again_with_every_row(stack, client):
    """A subscription's apply worker is no client session: the fence alone never stopped it, so it kept
    committing after the seal's counts (verification then failed, production left sealed). The seal
    disables it (WAL-logged: the restore has it disabled too), the swap enables it again, and every row
    the publisher acknowledged arrives in the recovered production."""
    pg = stack.postgres()
    with publisher_server(stack) as publisher:
        with pg.connect(DATABASE) as conn:
            conn.execute("CREATE TABLE feed (id bigint PRIMARY KEY)")
            conn.execute(
                f"CREATE SUBSCRIPTION feed_sub CONNECTION 'host={publisher.host} port={publisher.port} "
                f"user={publisher.superuser} dbname=postgres' PUBLICATION feed_pub"
            )
        acknowledged, stop = [], threading.Event()

        def writer():  # the other system keeps writing all through the recovery
            with publisher.connect() as conn:
                n = 0
                while not stop.is_set():
                    n += 1
                    conn.execute("INSERT INTO feed VALUES (%s)", (n,))
                    acknowledged.append(n)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        try:
            async with asyncio.timeout(120):  # the subscription applies before the incident
                while not ids_present(pg, "feed", acknowledged[:50]) or len(acknowledged) < 50:
                    await asyncio.sleep(0.1)
            corrupt_table(pg, DATABASE, "metrics")
            async with running_worker(client, stack) as queue:
                handle = await start_and_approve(client, stack, queue, incident())
                result = await handle.result()
        finally:
            stop.set()
            thread.join(timeout=30)
        assert result.outcome == "recovered" and result.subscriptions == [f"{DATABASE}/feed_sub"]
        with pg.connect(DATABASE) as conn:
            assert conn.execute("SELECT subenabled FROM pg_subscription WHERE subname = 'feed_sub'").fetchone()[0]
        async with asyncio.timeout(300):  # an upper bound: the enabled subscription catches up
            while ids_present(pg, "feed", acknowledged) != set(acknowledged):
                await asyncio.sleep(0.2)
        with pg.connect(DATABASE) as conn:
            conn.execute("DROP SUBSCRIPTION feed_sub")
            conn.execute("DROP TABLE feed")


@pytest.fixture(scope="module")
def sync_pair():
    with own_stack("drp-test-syncfb-", companies=50, synchronous_standby=True) as s:
        yield s


async def test_failback_with_a_synchronous_standby_completes_and_restores_synchronous_replication(sync_pair, client):
    """After a failover the operator makes the new primary synchronous again (`'*'`: whichever standby
    rejoins). DatabaseFailback rewinds the old primary from it, which copies that setting, then promotes it
    while the former standby is fenced: every commit, the runbook's write check first, waited for a standby
    that did not exist. The promotion pauses synchronous replication (as Patroni does), and once the former
    standby streams again the old primary's own setting comes back, only if that standby confirms."""
    primary, standby = sync_pair.postgres(), sync_pair.standby()
    temporal = client.service_client.config.target_host
    async with running_worker(client, sync_pair) as queue:
        inc = incident()
        failover = await drp_start(client, sync_pair, queue, "failover", inc, temporal=temporal)
        await wait_for_approval_gate(failover)
        await drp_approve(sync_pair, queue, inc, temporal=temporal)
        await failover.result()
    with standby.connect(DATABASE) as conn:  # written on the promoted standby
        acknowledged = [
            conn.execute("INSERT INTO app_write_checks DEFAULT VALUES RETURNING id").fetchone()[0] for _ in range(25)
        ]
    with standby.connect() as conn:
        conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        conn.execute("SELECT pg_reload_conf()")
    async with running_worker(client, sync_pair) as queue:
        inc = incident()
        failback = await drp_start(client, sync_pair, queue, "failback", inc, temporal=temporal)
        await wait_for_approval_gate(failback)
        await drp_approve(sync_pair, queue, inc, temporal=temporal)
        async with asyncio.timeout(900):  # an upper bound: the write check used to wait for ever
            result = await failback.result()
    assert result.promoted.synchronous_paused == STANDBY_NAME  # the old primary's own setting, from before
    assert result.rejoined_standby.synchronous and "restored" in result.rejoined_standby.synchronous
    assert "NOT restored" not in result.rejoined_standby.synchronous
    with primary.connect() as conn:
        assert conn.execute("SHOW synchronous_standby_names").fetchone()[0] == STANDBY_NAME
        assert conn.execute("SELECT application_name, sync_state FROM pg_stat_replication").fetchall() == [
            (STANDBY_NAME, "sync")
        ]
    assert ids_present(primary, "app_write_checks", acknowledged) == set(acknowledged)
    with primary.connect(DATABASE) as conn:  # a commit is confirmed by the synchronous standby
        new = conn.execute("INSERT INTO app_write_checks DEFAULT VALUES RETURNING id").fetchone()[0]
    async with asyncio.timeout(120):
        while not ids_present(standby, "app_write_checks", [new]):
            await asyncio.sleep(0.1)


class FlakyS3(ThreadingHTTPServer):
    """An HTTP proxy in front of moto that answers every read of the WAL archive (`/wals/`) with 500 while
    `failing` is set: the S3 outage a restore_command meets in the field."""

    daemon_threads = True

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://")
        self.failing = threading.Event()
        self.failed = 0
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._body()
        server: FlakyS3 = self.server
        if server.failing.is_set() and self.command == "GET" and "/wals/" in unquote(self.path):
            server.failed += 1
            error = b"<Error><Code>InternalError</Code><Message>injected outage</Message></Error>"
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in ("connection", "transfer-encoding", "content-length", "expect")
        }
        upstream = http.client.HTTPConnection(server.upstream, timeout=600)
        try:
            upstream.request(self.command, self.path, body=body, headers={**headers, "Content-Length": str(len(body))})
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
                self.send_header(key, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


async def test_an_s3_outage_during_the_replay_is_waited_out_and_every_commit_comes_back(stack, client):
    """The archive answers every WAL read with 500 from the start of the recovery until PostgreSQL has
    stopped once on it (restore_command gave up: exit 126, FATAL instead of "end of archive"); then S3
    comes back. The replay step is retried, recovery resumes where it stopped, and every acknowledged
    commit is there; nothing is called recovered with rows missing."""
    from tests.test_recovery_safety import acknowledged_rows, archive_now, present

    acknowledged = acknowledged_rows(stack, 15, "before the outage")
    archive_now(stack)
    acknowledged += acknowledged_rows(stack, 15, "in the last segment")
    corrupt_table(stack.postgres(), DATABASE, "metrics")
    proxy = FlakyS3(stack.moto_url)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    proxy.failing.set()
    inc = incident()
    data_dir = stack.postgres().data_dir
    server_log = data_dir.with_name(f"{data_dir.name}.restore-{inc}.log")
    try:
        async with running_worker(client, stack, backup={"endpoint_url": proxy.url}) as queue:
            handle = await start_and_approve(client, stack, queue, inc)
            async with asyncio.timeout(900):  # an upper bound: PostgreSQL stops on the unreadable archive
                while not (server_log.exists() and ARCHIVE_UNREADABLE in server_log.read_text(errors="replace")):
                    await asyncio.sleep(0.2)
            proxy.failing.clear()  # S3 is back
            result = await handle.result()
            attempts = await activity_attempts(handle, "replay_wal")
    finally:
        proxy.shutdown()
    assert proxy.failed > 0 and max(attempts) >= 2  # the outage was met, and the step went on
    assert result.outcome == "recovered" and result.rpo_actual.total_seconds() == 0
    assert present(stack, acknowledged) == set(acknowledged)
