"""`drp stack up | status | down`: the embedded local environment.

Everything lives under one state folder and runs on local ports chosen once
and remembered in stack.json, so `up` after `down` finds the same addresses.
PostgreSQL data lives in a pg/ subfolder owned by the unprivileged server
user when we are root.
"""

import json
import os
import pwd
import secrets
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import LiteralString, cast

import boto3
import httpx
from psycopg import sql
from pydantic import BaseModel, Field

from adapters.audit import install_audit_log
from adapters.barman import BarmanCloud
from adapters.pgserver import PgServer, embedded_bin_dir, one
from adapters.platforms import LocalAppSpec, LocalProcessPlatform
from adapters.processes import ProcessTable, free_port, port_open, wait_for_port
from adapters.replication import has_diverged
from adapters.sealing import describe_seal, read_seal

DATABASE = "corporate_intel"
AUDITED_TABLES = ("public.companies", "public.filings", "public.metrics")
STANDBY_NAME = "drp_standby"
APP_ROLE = "app_user"
BUCKET = "drp-backups"
ONCALL_TOPIC = "drp-oncall"  # SNS (moto): the on-call pager channel of the embedded stack
SEARCH_ATTRIBUTES = ("IncidentId", "Procedure", "Severity", "IncidentStatus")
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def default_state_dir() -> Path:
    if os.geteuid() == 0:  # the server user must reach the data dir: not under /root
        return Path("/var/lib/drp/stack")
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "drp" / "stack"


class Ports(BaseModel):
    temporal: int
    temporal_ui: int
    moto: int
    postgres: int
    app: int
    redis: int = Field(default_factory=free_port)
    standby: int = Field(default_factory=free_port)
    mailbox: int = Field(default_factory=free_port)


class StackConfig(BaseModel):
    """What `up` decided once: ports and generated passwords (stack.json, mode 600)."""

    ports: Ports
    pg_password: str
    app_password: str
    os_user: str | None
    companies: int = 500
    synchronous_standby: bool = False


class Stack:
    # The embedded Temporal server keeps its state in one SQLite file through one connection, so
    # every persistence write waits for the one before it. SQLite's defaults (rollback journal,
    # synchronous=FULL) fsync several times per write; write-ahead logging with synchronous=NORMAL
    # fsyncs at checkpoints only, and a killed server process loses nothing committed (only an OS
    # crash can lose the last writes: https://www.sqlite.org/pragma.html#pragma_synchronous).
    # An alert storm on SQLite's defaults: see BENCHMARKS.md, "Alert receiver".
    temporal_sqlite_pragmas: tuple[str, ...] = ("journal_mode=wal", "synchronous=normal")

    def __init__(
        self,
        state_dir: Path | None = None,
        companies: int = 500,
        task_queue: str = "drp-recovery",
        synchronous_standby: bool = False,
    ):
        self.state_dir = Path(state_dir or default_state_dir()).resolve()
        self.task_queue = task_queue
        self.config = self._load_or_create_config(companies, synchronous_standby)
        self.processes = ProcessTable(self.state_dir / "run")

    # --- layout ------------------------------------------------------------

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pg_dir(self) -> Path:
        return self.state_dir / "pg"

    @property
    def settings_file(self) -> Path:
        return self.state_dir / "settings.json"

    @property
    def app_spec_file(self) -> Path:
        return self.state_dir / "app.json"

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.config.ports.temporal}"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.temporal_ui}"

    @property
    def moto_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.moto}"

    @property
    def mailbox_dir(self) -> Path:
        return self.state_dir / "mailbox"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.config.ports.redis}/0"

    @property
    def app_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.app}"

    def _load_or_create_config(self, companies: int, synchronous_standby: bool) -> StackConfig:
        path = self.state_dir / "stack.json"
        if path.exists():
            config = StackConfig.model_validate_json(path.read_text())  # parts added since get ports now
        else:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.state_dir, 0o755)
            config = StackConfig(
                ports=Ports(
                    temporal=free_port(),
                    temporal_ui=free_port(),
                    moto=free_port(),
                    postgres=free_port(),
                    app=free_port(),
                ),
                pg_password=secrets.token_urlsafe(18),
                app_password=secrets.token_urlsafe(18),
                os_user="drp-postgres" if os.geteuid() == 0 else None,
                companies=companies,
                synchronous_standby=synchronous_standby,
            )
        path.write_text(config.model_dump_json(indent=2))
        os.chmod(path, 0o600)
        return config

    # --- the parts -----------------------------------------------------------

    def barman(self) -> BarmanCloud:
        return BarmanCloud(
            bin_dir=Path(sys.executable).parent,
            destination=f"s3://{BUCKET}/{DATABASE}",
            server_name="primary",
            endpoint_url=self.moto_url,
            credentials_env=DUMMY_AWS,
        )

    def postgres(self) -> PgServer:
        return PgServer(
            bin_dir=embedded_bin_dir(),
            data_dir=self.pg_dir / "primary",
            port=self.config.ports.postgres,
            os_user=self.config.os_user,
            password=self.config.pg_password,
            server_env=DUMMY_AWS,
        )

    def standby(self) -> PgServer:
        return self.postgres().at(self.pg_dir / "standby", port=self.config.ports.standby)

    def app_dsn(self) -> str:
        return (
            f"host=127.0.0.1 port={self.config.ports.postgres} dbname={DATABASE} user={APP_ROLE} "
            f"password={self.config.app_password} connect_timeout=3"
        )

    def app_platform(self) -> LocalProcessPlatform:
        return LocalProcessPlatform(self.app_spec_file)

    def worker_settings(self) -> dict:
        return {
            "temporal_address": self.temporal_address,
            "task_queue": self.task_queue,
            "postgres": {
                "port": self.config.ports.postgres,
                "password": self.config.pg_password,
                "data_dir": str(self.postgres().data_dir),
                "os_user": self.config.os_user,
            },
            "backup": {
                "destination": self.barman().destination,
                "server_name": "primary",
                "endpoint_url": self.moto_url,
                "aws_access_key_id": DUMMY_AWS["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": DUMMY_AWS["AWS_SECRET_ACCESS_KEY"],
            },
            "standby": {"port": self.config.ports.standby, "data_dir": str(self.standby().data_dir)},
            "platform": {"kind": "local", "local": {"app_spec": str(self.app_spec_file)}},
            "redis_url": self.redis_url,
            "evidence_destination": f"s3://{BUCKET}/evidence",
            "reports_destination": f"s3://{BUCKET}/reports",
            # Email to the stack's mailbox, pages to SNS in moto. Slack and Statuspage are SaaS: until their
            # settings are given, the incident timeline records those messages as not configured.
            "notify": {
                "smtp_host": "127.0.0.1",
                "smtp_port": self.config.ports.mailbox,
                "sns_topic_arn": f"arn:aws:sns:us-east-1:123456789012:{ONCALL_TOPIC}",
                "aws_endpoint_url": self.moto_url,
            },
            "app": {
                "health_url": f"{self.app_url}/health",
                "critical_url": f"{self.app_url}/api/v1/companies?limit=10",
                "write_check_url": f"{self.app_url}/api/v1/write-check",
            },
        }

    # --- up ------------------------------------------------------------------

    def up(self, with_worker: bool = True, with_temporal: bool = True, log=print) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.settings_file.write_text(json.dumps(self.worker_settings(), indent=2))
        os.chmod(self.settings_file, 0o600)
        self._up_moto(log)
        self._up_redis(log)
        self._up_mailbox(log)
        seal = read_seal(self.postgres().data_dir)
        if seal is None:
            self._up_postgres(log)
        else:  # a recovery holds production: starting it (or the app on it) would undo the seal's guarantees
            log(f"postgres       left stopped: {describe_seal(seal)}")
        if with_temporal:
            self._up_temporal(log)
        if seal is None:
            self._up_app(log)
        if with_worker:
            self._up_worker(log)

    def _up_moto(self, log) -> None:
        port = self.config.ports.moto
        self.processes.spawn(
            "moto",
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            self.logs / "moto.log",
        )
        wait_for_port(port, what="moto server")
        s3 = boto3.client(
            "s3",
            endpoint_url=self.moto_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        if BUCKET not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
            s3.create_bucket(Bucket=BUCKET)
        boto3.client(
            "sns",
            endpoint_url=self.moto_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_topic(Name=ONCALL_TOPIC)  # idempotent
        log(f"s3, sns (moto) {self.moto_url}  bucket {BUCKET}, topic {ONCALL_TOPIC}")

    def _up_mailbox(self, log) -> None:
        """A real SMTP server (aiosmtpd) that files every incident email in a Maildir."""
        port = self.config.ports.mailbox
        self.processes.spawn(
            "mailbox",
            [
                sys.executable,
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                f"127.0.0.1:{port}",
                "-c",
                "aiosmtpd.handlers.Mailbox",
                str(self.mailbox_dir),
            ],
            self.logs / "mailbox.log",
        )
        wait_for_port(port, what="SMTP mailbox")
        log(f"smtp mailbox   127.0.0.1:{port}  maildir {self.mailbox_dir}")

    def _up_redis(self, log) -> None:
        port = self.config.ports.redis
        self.processes.spawn(
            "redis",
            [
                str(Path(sys.executable).parent / "redis-server"),
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--dir",
                str(self.state_dir),
                "--save",
                "60 1",
                "--dbfilename",
                "redis.rdb",
            ],
            self.logs / "redis.log",
        )
        wait_for_port(port, what="redis")
        log(f"redis          {self.redis_url}")

    def _ensure_os_user(self) -> None:
        user = self.config.os_user
        if not user:
            return
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user], check=True
            )
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.pg_dir, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        os.chmod(self.pg_dir, 0o700)

    def _up_postgres(self, log) -> None:
        self._ensure_os_user()
        pg = self.postgres()
        fresh = not (pg.data_dir / "PG_VERSION").exists()
        if fresh:
            self._initdb(pg)
        pg.start()
        pg.wait_ready()
        if fresh:
            self._seed(pg)
        if not self.barman().list_backups():  # fresh, or moto (in memory) was restarted
            log("taking a base backup to S3 ...")
            self.base_backup()
        log(f"postgres 18    127.0.0.1:{pg.port}  db {DATABASE}  data {pg.data_dir}")
        self._up_standby(pg, log)

    def _up_standby(self, primary: PgServer, log) -> None:
        """A streaming standby of the primary (synchronous if the stack was created so)."""
        standby = self.standby()
        if not (standby.data_dir / "PG_VERSION").exists():
            primary.create_standby(standby.data_dir, STANDBY_NAME)
            if self.config.synchronous_standby:
                with primary.connect() as conn:
                    conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
                    conn.execute("SELECT pg_reload_conf()")
        standby.start()
        mode = "synchronous" if self.config.synchronous_standby else "asynchronous"
        log(f"standby        127.0.0.1:{standby.port}  {mode} streaming  data {standby.data_dir}")

    def _initdb(self, pg: PgServer) -> None:
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        pwfile = self.pg_dir / ".pwfile"
        pwfile.write_text(self.config.pg_password + "\n")
        if self.config.os_user:
            info = pwd.getpwnam(self.config.os_user)
            os.chown(pwfile, info.pw_uid, info.pw_gid)
        os.chmod(pwfile, 0o600)
        try:
            pg.tool(
                "initdb",
                "-D",
                str(pg.data_dir),
                "-k",
                "-U",
                pg.superuser,
                f"--pwfile={pwfile}",
                "-A",
                "scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                timeout=120,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        archive_command = self.barman().archive_command().replace("'", "''")
        with open(pg.data_dir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# --- drp embedded stack ---\n"
                "unix_socket_directories = ''\n"
                "wal_level = replica\n"
                "archive_mode = on\n"
                f"archive_command = '{archive_command}'\n"
                "archive_timeout = 60s          # RPO target 5m: close a WAL segment at least every minute\n"
                "track_commit_timestamp = on    # lets a recovery report its newest recovered commit\n"
                "max_wal_senders = 10\n"
                "wal_keep_size = 256MB\n"
                "shared_buffers = 128MB\n"
                "log_line_prefix = '%m [%p] '\n"
            )

    def _seed(self, pg: PgServer) -> None:
        seed = resources.files("stack").joinpath("seed.sql").read_text()
        with pg.connect() as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(APP_ROLE), sql.Literal(self.config.app_password)
                )
            )
        with pg.connect(DATABASE) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
            conn.execute(
                cast(LiteralString, seed.replace(":companies", str(int(self.config.companies))))
            )  # our own file
            install_audit_log(conn, [(schema, name) for schema, _, name in (t.partition(".") for t in AUDITED_TABLES)])
            conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(AUDITED_TABLES)} TO {APP_ROLE}")
            conn.execute(f"GRANT SELECT, INSERT ON app_write_checks TO {APP_ROLE}")
            conn.execute(f"GRANT USAGE ON SEQUENCE app_write_checks_id_seq TO {APP_ROLE}")

    def base_backup(self) -> None:
        pg, barman = self.postgres(), self.barman()
        proc = subprocess.run(
            barman.backup_argv(pg.host, pg.port, pg.superuser),
            env={**barman.env(), "PGPASSWORD": self.config.pg_password},
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"barman-cloud-backup failed: {proc.stderr.strip()[-2000:]}")

    def _up_temporal(self, log) -> None:
        ports = self.config.ports
        argv = [
            str(Path(sys.executable).parent / "temporal"),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(ports.temporal),
            "--ui-port",
            str(ports.temporal_ui),
            "--db-filename",
            str(self.state_dir / "temporal.db"),
            "--ui-disable-news-fetch",
            "--log-level",
            "warn",
        ]
        for pragma in self.temporal_sqlite_pragmas:
            argv += ["--sqlite-pragma", pragma]
        for name in SEARCH_ATTRIBUTES:
            argv += ["--search-attribute", f"{name}=Keyword"]
        self.processes.spawn("temporal", argv, self.logs / "temporal.log")
        wait_for_port(ports.temporal, what="Temporal")
        wait_for_port(ports.temporal_ui, what="Temporal Web UI")
        log(f"temporal       {self.temporal_address}  web ui {self.ui_url}")

    def restart_temporal(self) -> None:
        """Stop and start the Temporal server on the same port and store (for durability drills)."""
        self.processes.stop("temporal")
        self._up_temporal(log=lambda *_: None)

    def _up_app(self, log) -> None:
        spec = LocalAppSpec(
            argv=[sys.executable, "-m", "stack.demoapp"],
            env={
                "DRP_APP_DSN": self.app_dsn(),
                "DRP_APP_PORT": str(self.config.ports.app),
                "DRP_APP_REDIS_URL": self.redis_url,
                "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            },
            port=self.config.ports.app,
            log=self.logs / "app.log",
            run_dir=self.processes.run_dir,
        )
        spec.save(self.app_spec_file)
        self.app_platform().start(1, heartbeat=lambda *_: None)
        log(f"demo app       {self.app_url}/health")

    def _up_worker(self, log) -> None:
        env = {
            **os.environ,
            "DRP_SETTINGS_FILE": str(self.settings_file),
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        }
        self.processes.spawn("worker", [sys.executable, "-m", "workers.main"], self.logs / "worker.log", env=env)
        log(f"worker         task queue {self.task_queue}  log {self.logs / 'worker.log'}")

    # --- status / down ---------------------------------------------------------

    def status(self) -> list[tuple[str, str, str]]:
        """(part, address, health) for each part."""
        ports, pg = self.config.ports, self.postgres()
        rows = [
            ("temporal", self.temporal_address, "up" if port_open(ports.temporal) else "down"),
            ("temporal web ui", self.ui_url, "up" if port_open(ports.temporal_ui) else "down"),
            ("s3 (moto)", self.moto_url, "up" if port_open(ports.moto) else "down"),
            ("redis", self.redis_url, "up" if port_open(ports.redis) else "down"),
            ("smtp mailbox", f"127.0.0.1:{ports.mailbox}", "up" if port_open(ports.mailbox) else "down"),
            ("postgres", f"127.0.0.1:{ports.postgres}", self._pg_health(pg)),
            ("standby", f"127.0.0.1:{ports.standby}", self._standby_health()),
            ("demo app", f"{self.app_url}/health", _http_health(f"{self.app_url}/health")),
            ("worker", self.task_queue, "up" if self.processes.pid("worker") else "down"),
        ]
        return rows

    def _pg_health(self, pg: PgServer) -> str:
        seal = read_seal(pg.data_dir)
        if not pg.is_running():
            return describe_seal(seal) if seal else "down"
        try:
            with pg.connect(DATABASE) as conn:
                archived, failed = one(conn.execute("SELECT archived_count, failed_count FROM pg_stat_archiver"))
            return f"up (wal archived {archived}, archive failures {failed})"
        except Exception as err:  # noqa: BLE001 (status reports any failure)
            return f"unhealthy: {str(err).splitlines()[0]}"

    def _standby_health(self) -> str:
        standby = self.standby()
        if not standby.is_running():
            return "down"
        try:
            with standby.connect("template1") as conn:
                in_recovery, streaming = one(
                    conn.execute(
                        "SELECT pg_is_in_recovery(), EXISTS (SELECT 1 FROM pg_stat_wal_receiver "
                        "WHERE status = 'streaming')"
                    )
                )
        except Exception as err:  # noqa: BLE001 (status reports any failure)
            return f"unhealthy: {str(err).splitlines()[0]}"
        if not in_recovery:
            return "up (promoted)"
        if streaming:
            return "up (streaming)"
        return "up (diverged: needs rebuild)" if has_diverged(standby, self.postgres()) else "up (not streaming)"

    def down(self, log=print) -> None:
        for name in ("worker", "app", "temporal"):
            if self.processes.stop(name):
                log(f"stopped {name}")
        for name, server in (("standby", self.standby()), ("postgres", self.postgres())):
            if server.is_running():
                server.stop()
                log(f"stopped {name}")
        if self.processes.stop("redis"):
            log("stopped redis")
        if self.processes.stop("mailbox"):
            log("stopped mailbox")
        if self.processes.stop("moto"):
            log("stopped moto (S3 contents are in memory and are gone)")


def _http_health(url: str) -> str:
    try:
        resp = httpx.get(url, timeout=2)
        return "up" if resp.status_code == 200 else f"unhealthy ({resp.status_code})"
    except httpx.HTTPError:
        return "down"
