"""RDS and CloudWatch calls the failover runbooks share: promote a read replica, describe an instance, read
ReplicaLag; Route53 record comparison.
"""

import time

from botocore.exceptions import ClientError

from adapters.errors import refused
from models.errors import ErrorKind
from models.region import (
    RdsPromoted,
)


def promote_read_replica(rds, replica_id: str) -> RdsPromoted:
    """aws rds promote-read-replica, then wait until available; a second call finds it promoted."""
    already = False
    try:
        rds.promote_read_replica(DBInstanceIdentifier=replica_id)
    except ClientError as err:
        if err.response["Error"]["Code"] == "DBInstanceNotFound":
            raise refused(ErrorKind.UnknownReplica, f"RDS instance {replica_id!r} not found") from err
        if err.response["Error"]["Code"] != "InvalidDBInstanceState":
            raise
        already = True  # "not a read replica": promoted by an earlier attempt
    rds.get_waiter("db_instance_available").wait(
        DBInstanceIdentifier=replica_id, WaiterConfig={"Delay": 5, "MaxAttempts": 120}
    )
    instance = rds.describe_db_instances(DBInstanceIdentifier=replica_id)["DBInstances"][0]
    return RdsPromoted(
        replica_id=replica_id,
        endpoint=(instance.get("Endpoint") or {}).get("Address"),
        port=(instance.get("Endpoint") or {}).get("Port", 5432),
        already_promoted=already,
    )


def describe_instance(rds, instance_id: str, region: str) -> dict:
    """One RDS instance; one that does not exist is an operator's error, never retried."""
    try:
        return rds.describe_db_instances(DBInstanceIdentifier=instance_id)["DBInstances"][0]
    except ClientError as err:
        if err.response["Error"]["Code"] in ("DBInstanceNotFound", "DBInstanceNotFoundFault"):
            raise refused(ErrorKind.UnknownReplica, f"RDS instance {instance_id!r} not found in {region}") from err
        raise


def in_zone(record_name: str, zone_name: str) -> bool:
    """Whether a record name lies in a hosted zone (the apex or below it), as Route53 decides it."""
    record, zone = record_name.rstrip(".").lower(), zone_name.rstrip(".").lower()
    return record == zone or record.endswith("." + zone)


def same_record(current: dict | None, wanted: dict) -> bool:
    if current is None:
        return False
    if "AliasTarget" in wanted:
        alias = current.get("AliasTarget") or {}
        return (
            alias.get("DNSName", "").rstrip(".").lower() == wanted["AliasTarget"]["DNSName"].rstrip(".").lower()
            and alias.get("HostedZoneId") == wanted["AliasTarget"]["HostedZoneId"]
        )
    return "AliasTarget" not in current and sorted(r["Value"] for r in current.get("ResourceRecords", [])) == sorted(
        r["Value"] for r in wanted["ResourceRecords"]
    )


def replica_lag_seconds(cloudwatch, replica_id: str) -> float | None:
    """The newest CloudWatch ReplicaLag datapoint of the last ten minutes (None: no data)."""
    stats = cloudwatch.get_metric_statistics(
        Namespace="AWS/RDS",
        MetricName="ReplicaLag",
        Statistics=["Maximum"],
        Period=60,
        Dimensions=[{"Name": "DBInstanceIdentifier", "Value": replica_id}],
        StartTime=time.time() - 600,
        EndTime=time.time() + 60,
    )
    points = sorted(stats.get("Datapoints", []), key=lambda p: p["Timestamp"])
    return points[-1]["Maximum"] if points else None
