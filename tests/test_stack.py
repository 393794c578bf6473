"""The embedded stack as `drp stack up` leaves it."""

import os
import subprocess
import sys
from pathlib import Path

from adapters.processes import free_port
from stack.stack import DATABASE

ROOT = Path(__file__).resolve().parent.parent


def test_every_part_is_up_and_postgres_archives_wal_with_checksums(stack):
    status = {part: health for part, _address, health in stack.status()}
    assert status["temporal"] == status["temporal web ui"] == status["s3 (moto)"] == status["demo app"] == "up"
    assert status["smtp mailbox"] == "up"
    assert status["postgres"].startswith("up (wal archived") and "archive failures 0" in status["postgres"]
    assert status["worker"] == "down"  # tests run their own workers
    with stack.postgres().connect(DATABASE) as conn:
        assert conn.execute("SHOW data_checksums").fetchone()[0] == "on"
        assert conn.execute("SELECT archived_count FROM pg_stat_archiver").fetchone()[0] > 0
    assert stack.barman().list_backups(), "a first base backup is in S3"


def test_postgres_runs_as_an_unprivileged_user_when_we_are_root(stack):
    uid = int(
        next(
            line
            for line in Path(f"/proc/{stack.postgres().postmaster_pid()}/status").read_text().splitlines()
            if line.startswith("Uid:")
        ).split()[1]
    )
    assert uid != 0 if os.geteuid() == 0 else uid == os.geteuid()


def test_the_demo_app_serves_the_playbook_endpoints(stack):
    import httpx

    assert httpx.get(f"{stack.app_url}/health").json() == {"status": "ok"}
    ids = [c["id"] for c in httpx.get(f"{stack.app_url}/api/v1/companies?limit=5").json()]
    assert len(ids) == 5 and ids == sorted(ids)
    assert httpx.get(f"{stack.app_url}/api/v1/companies?limit=0").status_code == 400
    assert 'http_requests_total{path="/health",code="200"}' in httpx.get(f"{stack.app_url}/metrics").text


def drp(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "starters.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=60, env=env
    )


def test_cli_installs_the_audit_log_idempotently(stack):
    env = {**os.environ, "DRP_SETTINGS_FILE": str(stack.settings_file)}
    with stack.postgres().connect(DATABASE) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS audited_later (id int PRIMARY KEY)")
    for _ in range(2):
        done = drp("audit", "install", "--database", DATABASE, "--tables", "public.audited_later", env=env)
        assert done.returncode == 0, done.stderr
    with stack.postgres().connect(DATABASE) as conn:
        conn.execute("INSERT INTO audited_later VALUES (1)")
        conn.execute("DELETE FROM audited_later")
        actions = [
            r[0]
            for r in conn.execute("SELECT action FROM audit_log WHERE table_name = 'public.audited_later' ORDER BY id")
        ]
        conn.execute("DROP TABLE audited_later")
    assert actions == ["INSERT", "DELETE"]


def test_cli_status_and_operator_mistakes(stack):
    status = drp("--state-dir", str(stack.state_dir), "stack", "status")
    assert status.returncode == 0 and stack.ui_url in status.stdout, status.stderr[-2000:]
    empty = drp("--state-dir", str(stack.state_dir), "approve", "INC-1", "--by", "alice", "--reason", " ")
    assert empty.returncode == 2 and "reason must not be empty" in empty.stderr
    unknown = drp("--state-dir", str(stack.state_dir), "approve", "NO-SUCH-INCIDENT", "--by", "a", "--reason", "b")
    assert unknown.returncode == 2 and "no recovery run found" in unknown.stderr
    bad = drp(
        "--state-dir", str(stack.state_dir), "start", "db-corruption", "--incident", "bad id", "--database", DATABASE
    )
    assert bad.returncode == 2 and "incident_id" in bad.stderr


def test_cli_answers_in_one_line_when_there_is_nothing_to_talk_to(stack, tmp_path):
    """No stack in the state folder, no Temporal at the address, a decision for a run that has finished:
    one line naming what is missing, exit 2, and nothing created."""
    nowhere = tmp_path / "no-stack"
    status = drp("--state-dir", str(nowhere), "stack", "status")
    assert status.returncode == 2 and f"no stack in {nowhere}" in status.stderr, status.stderr
    assert not nowhere.exists()  # status does not invent a stack (it used to write a stack.json with new ports)

    dead = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "DRP_SETTINGS_FILE": str(stack.settings_file), "DRP_TEMPORAL_ADDRESS": dead}
    unreachable = drp("incident", "status", "INC-ANY", env=env)
    assert unreachable.returncode == 2, unreachable.stderr
    assert unreachable.stderr.strip().splitlines() == [
        f"drp: cannot reach Temporal at {dead}: is it running? (`drp stack status` for the embedded stack; "
        "DRP_TEMPORAL_ADDRESS or --temporal for another)"
    ]
