"""RegionActivities: playbook 4.1's failover-to-backup.sh, one idempotent step at a time.

AWS (RDS, Route53, CloudWatch, SNS) through boto3 clients and the backup
region's Kubernetes cluster through the official client are all built by the
worker and handed in. Steps 3-6 run on the backup region's task queue.
"""

import time

import httpx
from botocore.exceptions import ClientError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import statuspage
from activities.platforms import KubernetesPlatform
from models.config import FailoverSettings
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


class RegionActivities:
    def __init__(self, config: FailoverSettings | None, rds: dict, cloudwatch: dict, route53, sns,
                 clusters: dict[str, KubernetesPlatform], http: httpx.Client):
        self.config = config
        self.rds, self.cloudwatch, self.route53, self.sns = rds, cloudwatch, route53, sns
        self.clusters = clusters
        self.http = http

    @activity.defn
    def plan_region_failover(self, inp: RegionFailoverInput) -> RegionPlan:
        """Check that everything the failover will touch exists; change nothing."""
        return self._plan(inp.backup_region, replica_must_exist=True)

    @activity.defn
    def plan_region_failback(self, inp: RegionFailbackInput) -> FailbackPlan:
        """The way home: the serving region's promoted instance must exist; the home region be configured."""
        serving = self._plan(inp.serving_region, replica_must_exist=True)
        home = self._plan(self.config.primary_region, replica_must_exist=False)  # the failback creates it
        return FailbackPlan(home=home, serving_region=inp.serving_region, serving_instance=serving.replica_id,
                            serving_task_queue=serving.task_queue)

    def _plan(self, region_name: str, replica_must_exist: bool) -> RegionPlan:
        if self.config is None:
            raise _bad("FailoverNotConfigured", "this worker has no `failover` settings (regions, hosted zone)")
        region = self.config.regions.get(region_name)
        if region is None:
            raise _bad("UnknownRegion", f"region {region_name!r} is not configured; known: "
                                        f"{', '.join(sorted(self.config.regions)) or 'none'}")
        if replica_must_exist and self.config.database == "rds":
            try:
                self.rds[region_name].describe_db_instances(DBInstanceIdentifier=region.rds_replica_id)
            except ClientError as err:
                if err.response["Error"]["Code"] == "DBInstanceNotFound":
                    raise _bad("UnknownReplica", f"RDS instance {region.rds_replica_id!r} not found in "
                                                 f"{region_name}") from err
                raise
        try:
            self.route53.get_hosted_zone(Id=self.config.hosted_zone_id)
        except ClientError as err:
            if err.response["Error"]["Code"] == "NoSuchHostedZone":
                raise _bad("UnknownHostedZone", f"hosted zone {self.config.hosted_zone_id!r} not found") from err
            raise
        return RegionPlan(backup_region=region_name, task_queue=region.task_queue, database=self.config.database,
                          primary_health_url=self.config.primary_health_url,
                          max_lag_seconds=self.config.max_replica_lag_seconds,
                          replica_id=region.rds_replica_id, hosted_zone_id=self.config.hosted_zone_id,
                          record_name=self.config.record_name,
                          new_target=region.load_balancer_dns or ", ".join(region.load_balancer_ips),
                          deployment=f"{region.kubernetes.namespace}/{region.kubernetes.deployment}",
                          replicas=region.replicas, health_url=region.health_url)

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
            source = self.rds[plan.serving_region].describe_db_instances(
                DBInstanceIdentifier=plan.serving_instance)["DBInstances"][0]["DBInstanceArn"]
            home.create_db_instance_read_replica(DBInstanceIdentifier=plan.home.replica_id,
                                                 SourceDBInstanceIdentifier=source)
            created = True
        home.get_waiter("db_instance_available").wait(DBInstanceIdentifier=plan.home.replica_id,
                                                       WaiterConfig={"Delay": 5, "MaxAttempts": 360})
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
                raise _bad("PrimaryHealthy", f"primary appears healthy ({req.url} answered {status} on check {n} of "
                                             f"{req.checks}); aborting failover, nothing was changed")
            activity.heartbeat(f"check {n}/{req.checks}: {status or 'no answer'}")
            if n < req.checks:
                time.sleep(req.spacing_seconds)
        return req.checks

    @activity.defn
    def replica_lag(self, req: LagRequest) -> float | None:
        """The replica's newest ReplicaLag datapoint (CloudWatch); refuse a lagging replica unless overridden."""
        lag = replica_lag_seconds(self.cloudwatch[req.region], req.replica_id)
        if lag is not None and lag > req.max_lag_seconds and not req.override:
            raise _bad("ReplicaLagging", f"replica {req.replica_id} lags {lag:.0f}s (allowed {req.max_lag_seconds:.0f}s)"
                                         "; promoting it would lose those writes. Start again with override_lag=true "
                                         "if a person accepts that loss.")
        return lag

    @activity.defn
    def promote_rds_replica(self, req: RegionRequest) -> RdsPromoted:
        """aws rds promote-read-replica + wait db-instance-available (re-run safe)."""
        return promote_read_replica(self.rds[req.region], self.config.regions[req.region].rds_replica_id)

    @activity.defn
    def switch_dns(self, req: RegionRequest) -> DnsSwitched:
        """UPSERT the API record to the backup load balancer and wait until INSYNC (UPSERT is idempotent)."""
        region = self.config.regions[req.region]
        record = {"Name": self.config.record_name, "Type": "A"}
        if region.load_balancer_ips:
            record.update(TTL=60, ResourceRecords=[{"Value": ip} for ip in region.load_balancer_ips])
        else:
            record["AliasTarget"] = {"HostedZoneId": region.load_balancer_zone_id,
                                     "DNSName": region.load_balancer_dns, "EvaluateTargetHealth": True}
        try:
            change = self.route53.change_resource_record_sets(
                HostedZoneId=self.config.hosted_zone_id,
                ChangeBatch={"Comment": f"drp failover {req.incident_id}",
                             "Changes": [{"Action": "UPSERT", "ResourceRecordSet": record}]})["ChangeInfo"]
        except ClientError as err:
            if err.response["Error"]["Code"] in ("InvalidChangeBatch", "InvalidInput"):
                raise _bad("DnsChangeRejected", f"Route53 rejected the change of {self.config.record_name}: "
                                                f"{err.response['Error']['Message']}") from err
            raise
        while change["Status"] != "INSYNC":
            activity.heartbeat(f"change {change['Id']} {change['Status']}")
            time.sleep(2)
            change = self.route53.get_change(Id=change["Id"])["ChangeInfo"]
        return DnsSwitched(change_id=change["Id"], status=change["Status"], record=record)

    @activity.defn
    def scale_region(self, req: RegionRequest) -> None:
        self.clusters[req.region].start(self.config.regions[req.region].replicas, activity.heartbeat)

    @activity.defn
    def check_region_health(self, req: RegionRequest) -> int:
        """The backup region's health endpoint answers 200; retried until the step's deadline."""
        url = self.config.regions[req.region].health_url
        try:
            status = self.http.get(url, timeout=10).status_code
        except httpx.HTTPError as err:
            raise ApplicationError(f"{url}: {err}", type="RegionUnhealthy") from err
        if status != 200:
            raise ApplicationError(f"{url} answered {status}", type="RegionUnhealthy")
        return status

    @activity.defn
    def notify_failover(self, req: RegionRequest) -> Notified | None:
        """SNS to the on-call topic, and the status page incident opened (or updated on a retry)."""
        message_id = status_page_id = None
        if self.config.sns_topic_arn:
            message_id = self.sns.publish(
                TopicArn=self.config.sns_topic_arn, Subject=f"FAILOVER COMPLETED: now serving from {req.region}",
                Message=f"Incident {req.incident_id}: traffic now routed to {req.region}.")["MessageId"]
        if self.config.status_page_url and self.config.status_page_token:
            status_page_id = statuspage.open_or_update(
                self.http, self.config.status_page_url, self.config.status_page_token.get_secret_value(),
                req.incident_id, f"Service failover to {req.region}",
                f"We have failed over to our infrastructure in {req.region}. Service is restored.")
        if message_id is None and status_page_id is None:
            return None
        return Notified(message_id=message_id, status_page_incident=status_page_id)


def promote_read_replica(rds, replica_id: str) -> RdsPromoted:
    """aws rds promote-read-replica, then wait until available; a second call finds it promoted."""
    already = False
    try:
        rds.promote_read_replica(DBInstanceIdentifier=replica_id)
    except ClientError as err:
        if err.response["Error"]["Code"] == "DBInstanceNotFound":
            raise _bad("UnknownReplica", f"RDS instance {replica_id!r} not found") from err
        if err.response["Error"]["Code"] != "InvalidDBInstanceState":
            raise
        already = True  # "not a read replica": promoted by an earlier attempt
    rds.get_waiter("db_instance_available").wait(DBInstanceIdentifier=replica_id,
                                                  WaiterConfig={"Delay": 5, "MaxAttempts": 120})
    instance = rds.describe_db_instances(DBInstanceIdentifier=replica_id)["DBInstances"][0]
    return RdsPromoted(replica_id=replica_id, endpoint=(instance.get("Endpoint") or {}).get("Address"),
                       port=(instance.get("Endpoint") or {}).get("Port", 5432), already_promoted=already)


def replica_lag_seconds(cloudwatch, replica_id: str) -> float | None:
    """The newest CloudWatch ReplicaLag datapoint of the last ten minutes (None: no data)."""
    stats = cloudwatch.get_metric_statistics(
        Namespace="AWS/RDS", MetricName="ReplicaLag", Statistics=["Maximum"], Period=60,
        Dimensions=[{"Name": "DBInstanceIdentifier", "Value": replica_id}],
        StartTime=time.time() - 600, EndTime=time.time() + 60)
    points = sorted(stats.get("Datapoints", []), key=lambda p: p["Timestamp"])
    return points[-1]["Maximum"] if points else None


def _bad(kind: str, message: str) -> ApplicationError:
    return ApplicationError(message, type=kind, non_retryable=True)
