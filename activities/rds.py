"""RdsActivities: DatabaseFailover's Amazon RDS target (playbook 4.2's `aws rds promote-read-replica`).

The worker settings choose the target: with `rds` set, DatabaseFailover
checks and promotes this read replica and repoints the application at its
endpoint; without it, the self-managed standby (ReplicationActivities).
"""

from botocore.exceptions import ClientError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from adapters.aws import promote_read_replica, replica_lag_seconds
from adapters.errors import refused
from models.config import RdsSettings
from models.errors import ErrorKind
from models.failover import LagCheck, Promoted, StandbyStatus


class RdsActivities:
    def __init__(self, config: RdsSettings | None, rds, cloudwatch):
        self.config = config
        self.rds, self.cloudwatch = rds, cloudwatch

    @property
    def settings(self) -> RdsSettings:
        """The RDS settings; the RDS path runs only when they are set (database_target)."""
        if self.config is None:
            raise refused(ErrorKind.FailoverNotConfigured, "this worker has no `rds` settings")
        return self.config

    @activity.defn
    def database_target(self) -> str:
        """ "rds" when this worker has RDS settings (the failover promotes an RDS read replica), else
        "self-managed" (the settings' streaming standby).
        """
        return "rds" if self.config else "self-managed"

    @activity.defn
    def check_rds_replica(self, req: LagCheck) -> StandbyStatus:
        """The replica exists, and its CloudWatch ReplicaLag is within the limit (unless overridden)."""
        try:
            instance = self.rds.describe_db_instances(DBInstanceIdentifier=self.settings.replica_id)["DBInstances"][0]
        except ClientError as err:
            if err.response["Error"]["Code"] == "DBInstanceNotFound":
                raise ApplicationError(
                    f"RDS instance {self.settings.replica_id!r} not found in {self.settings.region}",
                    type=ErrorKind.UnknownReplica,
                    non_retryable=True,
                ) from err
            raise
        lag = replica_lag_seconds(self.cloudwatch, self.settings.replica_id)
        if lag is not None and lag > req.max_lag_seconds and not req.override:
            raise ApplicationError(
                f"replica {self.settings.replica_id} lags {lag:.0f}s (allowed "
                f"{req.max_lag_seconds:.0f}s); start again with override_lag=true if a person "
                "accepts that loss",
                type=ErrorKind.StandbyLagging,
                non_retryable=True,
            )
        endpoint = instance.get("Endpoint") or {}
        return StandbyStatus(
            host=endpoint.get("Address", ""),
            port=endpoint.get("Port", 5432),
            in_recovery=bool(instance.get("ReadReplicaSourceDBInstanceIdentifier")),
            streaming=True,
            timeline=0,
            receive_lsn=None,
            replay_lsn=None,
            primary_reachable=False,
            lag_seconds=lag,
        )

    @activity.defn
    def promote_rds(self) -> Promoted:
        """Promote the RDS read replica and wait until it is available; a second call finds it promoted
        (`already_primary`). UnknownReplica (non-retryable) when the instance does not exist.
        """
        promoted = promote_read_replica(self.rds, self.settings.replica_id)
        return Promoted(
            timeline=0, promoted_at_lsn="n/a (RDS)", lost_bytes=None, already_primary=promoted.already_promoted
        )
