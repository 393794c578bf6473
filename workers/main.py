"""The worker: Settings -> clients -> activities -> Worker.

`python -m workers.main` (or `drp worker`) reads Settings from the
environment / DRP_SETTINGS_FILE, refuses to start on an invalid playbook, and
polls the recovery task queue until SIGTERM.
"""

import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import structlog
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import (
    SandboxedWorkflowRunner,
    SandboxRestrictions,
)

from activities.backup import BackupActivities
from activities.deletion import DeletionActivities
from activities.locks import LockActivities
from activities.notify import NotifyActivities
from activities.platform import PlatformActivities
from activities.playbook import PlaybookActivities
from activities.postgres import PostgresActivities
from activities.rds import RdsActivities
from activities.region import RegionActivities
from activities.replication import ReplicationActivities
from activities.report import ReportActivities
from models.playbook import load_playbook
from models.runbooks import RUNBOOKS
from workers.clients import build_kubernetes, build_platform, build_redis, build_s3
from workers.logging import LoggingInterceptor, configure_logging
from workers.metrics import RunbookMetricsInterceptor
from workers.settings import Settings
from workers.temporal_client import connect
from workflows.database_lock import DatabaseLock
from workflows.incident import Incident

# The incident, the per-database lock, and every registered runbook (models/runbooks.py).
WORKFLOWS = [Incident, DatabaseLock, *(spec.load() for spec in RUNBOOKS)]


def build_region_activities(settings: Settings, http: httpx.Client) -> RegionActivities:
    """AWS clients per region (RDS, CloudWatch), Route53 and SNS, and each backup region's cluster."""
    import boto3

    f = settings.failover
    if f is None:
        return RegionActivities(None, {}, {}, None, None, {}, http)
    b = settings.backup
    creds = b.boto3_kwargs(f.aws_endpoint_url)
    return RegionActivities(
        f,
        rds={r: boto3.client("rds", region_name=r, **creds) for r in f.regions},
        cloudwatch={r: boto3.client("cloudwatch", region_name=r, **creds) for r in f.regions},
        route53=boto3.client("route53", region_name=b.aws_region, **creds),
        sns=boto3.client("sns", region_name=b.aws_region, **creds),
        clusters={r: build_kubernetes(cfg.kubernetes) for r, cfg in f.regions.items()},
        http=http,
        standby=settings.postgres.server(standby=settings.standby) if settings.standby else None,
        ledger=build_redis(settings),
    )


def build_rds_activities(settings: Settings) -> RdsActivities:
    import boto3

    r = settings.rds
    if r is None:
        return RdsActivities(None, None, None)
    creds = settings.backup.boto3_kwargs(r.aws_endpoint_url)
    return RdsActivities(
        r, boto3.client("rds", region_name=r.region, **creds), boto3.client("cloudwatch", region_name=r.region, **creds)
    )


def build_notify_activities(settings: Settings, playbook, redis, http: httpx.Client) -> NotifyActivities:
    import boto3

    n = settings.notify
    sns = None
    if n.sns_topic_arn:
        sns = boto3.client("sns", region_name=n.sns_region, **settings.backup.boto3_kwargs(n.aws_endpoint_url))
    return NotifyActivities(playbook, n, redis, http, sns)


def build_activities(settings: Settings, client: Client | None = None) -> list:
    playbook = load_playbook(settings.playbook_path)
    server = settings.production_server()
    barman = settings.backup.barman()
    postgres = PostgresActivities(server)
    backup = BackupActivities(server, barman)
    http = httpx.Client(timeout=10)
    region = build_region_activities(settings, http)
    platform = PlatformActivities(
        build_platform(settings.platform),
        http,
        settings.app.health_url,
        settings.app.critical_url,
        settings.app.write_check_url,
    )
    standby = settings.standby_server()
    rds = build_rds_activities(settings)
    replication = ReplicationActivities(server, standby)
    s3, redis = build_s3(settings), build_redis(settings)
    deletion = DeletionActivities(server, barman, redis, s3, settings.evidence_destination)
    playbook_activities = PlaybookActivities(playbook)
    locks = LockActivities(client, server, barman.server_name)
    return [
        locks.cluster,
        locks.holder,
        playbook_activities.objectives_for,
        playbook_activities.approvers_for,
        playbook_activities.plan_incident,
        build_notify_activities(settings, playbook, redis, http).send_notification,
        ReportActivities(playbook, s3, settings.reports_destination).write_report,
        postgres.assess_database,
        postgres.seal_primary,
        postgres.verify_restored,
        postgres.archive_current_wal,
        backup.restore_base_backup,
        backup.replay_wal,
        backup.swap_in_restored,
        backup.take_base_backup,
        backup.remove_side_instance,
        backup.stop_restore,
        postgres.reopen_production,
        deletion.identify_deletions,
        deletion.contain,
        deletion.extract_deleted_rows,
        deletion.reinsert_rows,
        deletion.verify_reinserted,
        deletion.lift_containment,
        platform.stop_application,
        platform.start_application,
        platform.check_application,
        platform.repoint_application,
        platform.check_write,
        replication.check_standby,
        replication.fence_primary,
        replication.promote_standby,
        replication.await_catch_up,
        replication.rejoin_as_standby,
        rds.database_target,
        rds.check_rds_replica,
        rds.promote_rds,
        region.plan_region_failover,
        region.verify_primary_down,
        region.replica_lag,
        region.promote_rds_replica,
        region.switch_dns,
        region.scale_region,
        region.check_region_health,
        region.notify_failover,
        region.plan_region_failback,
        region.create_home_replica,
        region.scale_down_region,
    ]


def workflow_runner() -> SandboxedWorkflowRunner:
    """The sandbox the worker runs workflows in; the replay test (tests/test_replay.py) uses the same."""
    # models/ is stdlib + pydantic only: passing it through the sandbox keeps one class per model,
    # so an activity's result can be embedded in a workflow's result as it is.
    return SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules("models"))


def build_worker(client: Client, settings: Settings, executor: ThreadPoolExecutor) -> Worker:
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=WORKFLOWS,
        activities=build_activities(settings, client),
        activity_executor=executor,
        interceptors=[LoggingInterceptor(), RunbookMetricsInterceptor()],
        workflow_runner=workflow_runner(),
        sticky_queue_schedule_to_start_timeout=settings.sticky_queue_timeout,
    )


async def run(settings: Settings) -> None:
    log = structlog.get_logger()
    client = await connect(settings=settings, metrics=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with ThreadPoolExecutor(max_workers=16) as executor:
        worker = build_worker(client, settings, executor)
        log.info(
            "worker started",
            task_queue=settings.task_queue,
            temporal=settings.temporal_address,
            namespace=settings.temporal_namespace,
            encryption=settings.encryption.enabled,
            metrics=settings.metrics.worker_bind_address,
        )
        async with worker:
            await stop.wait()
    log.info("worker stopped")


def main() -> None:
    settings = Settings()  # pyright: ignore[reportCallIssue] - pydantic-settings reads the fields from the environment
    configure_logging(settings.log_level)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
