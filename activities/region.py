"""RegionActivities: playbook 4.1's failover-to-backup.sh, one idempotent step at a time.

AWS (RDS, Route53, CloudWatch, SNS) through boto3 clients and the backup
region's Kubernetes cluster through the official client are all built by the
worker and handed in. Steps 3-6 run on the backup region's task queue.
"""

import time
from typing import Any

import httpx
from botocore.exceptions import ClientError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from adapters import statuspage
from adapters.aws import (
    describe_instance,
    in_zone,
    promote_read_replica,
    replica_lag_seconds,
    same_record,
)
from adapters.errors import refused
from adapters.pgserver import PgServer
from adapters.platforms import KubernetesPlatform
from models.config import FailoverSettings
from models.errors import ErrorKind
from models.region import (
    DnsSwitched,
    FailbackPlan,
    HomeReplica,
    LagRequest,
    Notified,
    PrimaryCheck,
    RdsPromoted,
    RegionFailbackInput,
    RegionFailoverInput,
    RegionPlan,
    RegionRequest,
)

SNS_LEDGER_PREFIX = "drp:notify:region-sns:"
SNS_LEDGER_TTL = 30 * 86400


class RegionActivities:
    def __init__(
        self,
        config: FailoverSettings | None,
        rds: dict,
        cloudwatch: dict,
        route53,
        sns,
        clusters: dict[str, KubernetesPlatform],
        http: httpx.Client,
        standby: PgServer | None = None,
        ledger=None,
    ):
        self.config = config
        self.ledger = ledger  # Redis (settings `redis_url`), if any: remembers the SNS messages already sent
        self.standby = standby  # the self-managed path's streaming standby (settings `standby`), if any
        self.rds, self.cloudwatch, self.route53, self.sns = rds, cloudwatch, route53, sns
        self.clusters = clusters
        self.http = http

    @property
    def settings(self) -> FailoverSettings:
        """The failover settings; a worker without them refuses every region step (non-retryable)."""
        if self.config is None:
            raise refused(
                ErrorKind.FailoverNotConfigured, "this worker has no `failover` settings (regions, hosted zone)"
            )
        return self.config

    @activity.defn
    def plan_region_failover(self, inp: RegionFailoverInput) -> RegionPlan:
        """Check that everything the failover will touch exists; change nothing."""
        return self._plan(inp.backup_region, replica_must_exist=True)

    @activity.defn
    def plan_region_failback(self, inp: RegionFailbackInput) -> FailbackPlan:
        """The way home: the serving region's promoted instance must exist; the home region be configured.

        A self-managed failover promoted the settings' streaming standby: there is no RDS instance to
        replicate home, so this runbook refuses at once and names the one that brings that database home."""
        if self.config is not None and self.config.database == "self-managed":
            raise refused(
                ErrorKind.FailbackNotSupported,
                f"RegionFailback replicates an RDS instance home, but failover.database is self-managed: "
                f"the failover promoted the streaming standby, and no RDS instance exists to replicate. "
                f"Nothing was changed. The database comes home with DatabaseFailback (python -m "
                f"starters.db_failback --incident {inp.incident_id}: rewinds the old primary and switches "
                f"back); then point {self.settings.record_name} home and scale the regions.",
            )
        serving = self._plan(inp.serving_region, replica_must_exist=True)
        home = self._plan(self.settings.primary_region, replica_must_exist=False)  # the failback creates it
        return FailbackPlan(
            home=home,
            serving_region=inp.serving_region,
            serving_instance=serving.replica_id,
            serving_task_queue=serving.task_queue,
        )

    def _plan(self, region_name: str, replica_must_exist: bool) -> RegionPlan:
        if self.config is None:
            raise refused(
                ErrorKind.FailoverNotConfigured, "this worker has no `failover` settings (regions, hosted zone)"
            )
        region = self.settings.regions.get(region_name)
        if region is None:
            raise refused(
                ErrorKind.UnknownRegion,
                f"region {region_name!r} is not configured; known: "
                f"{', '.join(sorted(self.settings.regions)) or 'none'}",
            )
        replica_id = region.rds_replica_id
        if self.settings.database == "self-managed":
            if self.standby is None:
                raise refused(
                    ErrorKind.NoStandby,
                    "failover.database is self-managed but this worker has no standby "
                    "(settings: standby.port, standby.data_dir); nothing was changed",
                )
            replica_id = f"the standby {self.standby.host}:{self.standby.port}"
        elif replica_must_exist:
            describe_instance(self.rds[region_name], region.rds_replica_id, region_name)
        try:
            zone = self.route53.get_hosted_zone(Id=self.settings.hosted_zone_id)["HostedZone"]
        except ClientError as err:
            if err.response["Error"]["Code"] == "NoSuchHostedZone":
                raise refused(
                    ErrorKind.UnknownHostedZone, f"hosted zone {self.settings.hosted_zone_id!r} not found"
                ) from err
            raise
        if not in_zone(self.settings.record_name, zone["Name"]):
            raise refused(
                ErrorKind.RecordOutsideZone,
                f"record {self.settings.record_name!r} is not in hosted zone "
                f"{zone['Name'].rstrip('.')!r} ({self.settings.hosted_zone_id}): Route53 "
                "would reject the change; fix failover.record_name or hosted_zone_id. "
                "Nothing was changed.",
            )
        return RegionPlan(
            backup_region=region_name,
            task_queue=region.task_queue,
            database=self.settings.database,
            primary_health_url=self.settings.primary_health_url,
            max_lag_seconds=self.settings.max_replica_lag_seconds,
            replica_id=replica_id,
            hosted_zone_id=self.settings.hosted_zone_id,
            record_name=self.settings.record_name,
            new_target=region.load_balancer_dns or ", ".join(region.load_balancer_ips),
            deployment=f"{region.kubernetes.namespace}/{region.kubernetes.deployment}",
            replicas=region.replicas,
            health_url=region.health_url,
        )

    @activity.defn
    def create_home_replica(self, plan: FailbackPlan) -> HomeReplica:
        """A read replica of the serving instance in the home region (re-run safe: an existing one is kept)."""
        home = self.rds[plan.home.backup_region]
        try:
            home.describe_db_instances(DBInstanceIdentifier=plan.home.replica_id)
            created = False
        except ClientError as err:
            if err.response["Error"]["Code"] != "DBInstanceNotFound":
                raise
            source = describe_instance(self.rds[plan.serving_region], plan.serving_instance, plan.serving_region)[
                "DBInstanceArn"
            ]
            home.create_db_instance_read_replica(
                DBInstanceIdentifier=plan.home.replica_id, SourceDBInstanceIdentifier=source
            )
            created = True
        home.get_waiter("db_instance_available").wait(
            DBInstanceIdentifier=plan.home.replica_id, WaiterConfig={"Delay": 5, "MaxAttempts": 360}
        )
        return HomeReplica(replica_id=plan.home.replica_id, created=created)

    @activity.defn
    def scale_down_region(self, req: RegionRequest) -> int:
        """After traffic has left a region: its Deployment to 0 (the replica count is kept for later)."""
        return self.clusters[req.region].stop(req.incident_id, activity.heartbeat)

    @activity.defn
    def verify_primary_down(self, req: PrimaryCheck) -> int:
        """The primary's health endpoint must fail every check; one success aborts the failover."""
        for n in range(1, req.checks + 1):
            try:
                status = self.http.get(req.url, timeout=10).status_code
            except httpx.HTTPError:
                status = None
            if status is not None and status < 400:
                raise refused(
                    ErrorKind.PrimaryHealthy,
                    f"primary appears healthy ({req.url} answered {status} on check {n} of "
                    f"{req.checks}); aborting failover, nothing was changed",
                )
            activity.heartbeat(f"check {n}/{req.checks}: {status or 'no answer'}")
            if n < req.checks:
                time.sleep(req.spacing_seconds)
        return req.checks

    @activity.defn
    def replica_lag(self, req: LagRequest) -> float | None:
        """The replica's newest ReplicaLag datapoint (CloudWatch); refuse a lagging replica unless overridden."""
        lag = replica_lag_seconds(self.cloudwatch[req.region], req.replica_id)
        if lag is not None and lag > req.max_lag_seconds and not req.override:
            raise refused(
                ErrorKind.ReplicaLagging,
                f"replica {req.replica_id} lags {lag:.0f}s (allowed {req.max_lag_seconds:.0f}s)"
                "; promoting it would lose those writes. Start again with override_lag=true "
                "if a person accepts that loss.",
            )
        return lag

    @activity.defn
    def promote_rds_replica(self, req: RegionRequest) -> RdsPromoted:
        """aws rds promote-read-replica + wait db-instance-available (re-run safe)."""
        return promote_read_replica(self.rds[req.region], self.settings.regions[req.region].rds_replica_id)

    @activity.defn
    def switch_dns(self, req: RegionRequest) -> DnsSwitched:
        """Point the API record at the region's load balancer and wait until Route53 reports INSYNC.

        One change batch per step, however often it is retried: the submitted change's Id is kept in
        the heartbeat details, so a retry (worker killed, heartbeat timeout) waits on that change; a
        retry that finds no Id but the record already at the target submits nothing either. Every
        new batch would restart Route53's propagation wait."""
        region = self.settings.regions[req.region]
        record: dict[str, Any] = {"Name": self.settings.record_name, "Type": "A"}
        if region.load_balancer_ips:
            record.update(TTL=60, ResourceRecords=[{"Value": ip} for ip in region.load_balancer_ips])
        else:
            record["AliasTarget"] = {
                "HostedZoneId": region.load_balancer_zone_id,
                "DNSName": region.load_balancer_dns,
                "EvaluateTargetHealth": True,
            }
        earlier = _submitted_change(activity.info().heartbeat_details, record)
        if earlier is not None:
            return self._wait_insync({"Id": earlier, "Status": "PENDING"}, record, resumed=True)
        if same_record(self._current_record(), record):
            activity.logger.info("%s already points at the target; no change submitted", self.settings.record_name)
            return DnsSwitched(change_id=None, status="CURRENT", record=record, already_current=True)
        try:
            change = self.route53.change_resource_record_sets(
                HostedZoneId=self.settings.hosted_zone_id,
                ChangeBatch={
                    "Comment": f"drp failover {req.incident_id}",
                    "Changes": [{"Action": "UPSERT", "ResourceRecordSet": record}],
                },
            )["ChangeInfo"]
        except ClientError as err:
            if err.response["Error"]["Code"] in ("InvalidChangeBatch", "InvalidInput", "NoSuchHostedZone"):
                raise refused(
                    ErrorKind.DnsChangeRejected,
                    f"Route53 rejected the change of {self.settings.record_name}: {err.response['Error']['Message']}",
                ) from err
            raise
        return self._wait_insync(change, record, resumed=False)

    def _wait_insync(self, change: dict, record: dict, resumed: bool) -> DnsSwitched:
        while True:
            # Heartbeat first: the Id must be on the server before anything else can go wrong.
            activity.heartbeat({"change_id": change["Id"], "status": change["Status"], "record": record})
            if change["Status"] == "INSYNC":
                return DnsSwitched(change_id=change["Id"], status=change["Status"], record=record, resumed=resumed)
            time.sleep(2)
            change = self.route53.get_change(Id=change["Id"])["ChangeInfo"]

    def _publish_once(self, req: RegionRequest) -> str:
        key = f"{SNS_LEDGER_PREFIX}{req.incident_id}:{req.region}"
        recorded = self.ledger.get(key) if self.ledger is not None else None
        sent = (recorded.decode() if isinstance(recorded, bytes) else recorded) or _sent_message(
            activity.info().heartbeat_details
        )
        if sent:
            activity.logger.info("SNS message %s was sent by an earlier attempt; not sent again", sent)
            return sent
        message_id = self.sns.publish(
            TopicArn=self.settings.sns_topic_arn,
            Subject=f"FAILOVER COMPLETED: now serving from {req.region}",
            Message=f"Incident {req.incident_id}: traffic now routed to {req.region}.",
        )["MessageId"]
        activity.heartbeat({"sns_message_id": message_id})
        if self.ledger is not None:
            self.ledger.set(key, message_id, ex=SNS_LEDGER_TTL)
        return message_id

    def _current_record(self) -> dict | None:
        name = self.settings.record_name.rstrip(".").lower()
        sets = self.route53.list_resource_record_sets(
            HostedZoneId=self.settings.hosted_zone_id, StartRecordName=name, StartRecordType="A", MaxItems="1"
        )["ResourceRecordSets"]
        if sets and sets[0]["Name"].rstrip(".").lower() == name and sets[0]["Type"] == "A":
            return sets[0]
        return None

    @activity.defn
    def scale_region(self, req: RegionRequest) -> None:
        """Scale the region's Deployment to its configured replicas and wait until they are ready
        (heartbeats); idempotent. Runs on that region's task queue.
        """
        self.clusters[req.region].start(self.settings.regions[req.region].replicas, activity.heartbeat)

    @activity.defn
    def check_region_health(self, req: RegionRequest) -> int:
        """The backup region's health endpoint answers 200; retried until the step's deadline."""
        url = self.settings.regions[req.region].health_url
        try:
            status = self.http.get(url, timeout=10).status_code
        except httpx.HTTPError as err:
            raise ApplicationError(f"{url}: {err}", type=ErrorKind.RegionUnhealthy) from err
        if status != 200:
            raise ApplicationError(f"{url} answered {status}", type=ErrorKind.RegionUnhealthy)
        return status

    @activity.defn
    def notify_failover(self, req: RegionRequest) -> Notified | None:
        """SNS to the on-call topic, and the status page incident opened (or updated on a retry).

        Re-run safe: the SNS message is sent once per incident and region however often the step is
        retried (a status page call that failed, a worker killed after the publish): its MessageId is kept
        in the Redis ledger (when `redis_url` is set) and in the heartbeat details, and a retry that finds
        it sends nothing. Only a crash between SNS accepting the message and that record can repeat it."""
        message_id = status_page_id = None
        if self.settings.sns_topic_arn:
            message_id = self._publish_once(req)
        if self.settings.status_page_url and self.settings.status_page_token:
            status_page_id = statuspage.open_or_update(
                self.http,
                self.settings.status_page_url,
                self.settings.status_page_token.get_secret_value(),
                req.incident_id,
                f"Service failover to {req.region}",
                f"We have failed over to our infrastructure in {req.region}. Service is restored.",
            )
        if message_id is None and status_page_id is None:
            return None
        return Notified(message_id=message_id, status_page_incident=status_page_id)


def _sent_message(details) -> str | None:
    for detail in details or ():
        if isinstance(detail, dict) and detail.get("sns_message_id"):
            return detail["sns_message_id"]
    return None


def _submitted_change(details, record: dict) -> str | None:
    """The Id of the change an earlier attempt of this step submitted for this record (heartbeat details)."""
    last = details[-1] if details else None
    if isinstance(last, dict) and last.get("change_id") and last.get("record") == record:
        return last["change_id"]
    return None
