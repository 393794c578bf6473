"""Configuration models the activities read (the worker's Settings embeds them).

Here rather than in workers/ so that activities depend on models only, never
on the worker that builds them.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, SecretStr, model_validator


class KubernetesPlatformSettings(BaseModel):
    namespace: str = "default"
    deployment: str = "corporate-intel-api"
    kubeconfig: Path | None = None
    context: str | None = None
    api_url: str | None = None  # instead of a kubeconfig: a plain HTTP API server (kmock in tests)


class RegionSettings(BaseModel):
    """One region the service can fail over to."""

    task_queue: str  # workers running in that region poll it
    health_url: str
    rds_replica_id: str
    kubernetes: KubernetesPlatformSettings
    replicas: int = 10
    load_balancer_dns: str | None = None  # alias target of the API record (Route53 alias to an ELB) ...
    load_balancer_zone_id: str | None = None
    load_balancer_ips: list[str] = []  # ... or plain A record values

    @model_validator(mode="after")
    def _one_record_kind(self) -> "RegionSettings":
        if bool(self.load_balancer_dns and self.load_balancer_zone_id) == bool(self.load_balancer_ips):
            raise ValueError("set either load_balancer_dns + load_balancer_zone_id (alias) or load_balancer_ips (A)")
        return self


class FailoverSettings(BaseModel):
    """playbook 4.1: where traffic goes when the primary region is down, and how it comes home.

    `regions` holds the backup regions and, for the failback, the primary
    region itself (its `rds_replica_id` is the replica a failback creates there)."""

    primary_region: str = "us-east-1"
    primary_health_url: str
    # What a failover promotes: the regions' RDS read replicas, or the self-managed `standby`.
    database: Literal["rds", "self-managed"] = "rds"
    hosted_zone_id: str
    record_name: str = "api.corporate-intel.com"
    regions: dict[str, RegionSettings]
    sns_topic_arn: str | None = None
    status_page_url: str | None = None  # an Atlassian Statuspage-compatible API: .../v1/pages/<page_id>
    status_page_token: SecretStr | None = None
    aws_endpoint_url: str | None = None  # moto in tests; unset in production
    max_replica_lag_seconds: float = 60


class RdsSettings(BaseModel):
    """DatabaseFailover's Amazon RDS target: promote this read replica instead of the self-managed standby."""

    region: str
    replica_id: str
    max_lag_seconds: float = 60
    aws_endpoint_url: str | None = None  # moto in tests


class NotifySettings(BaseModel):
    """Where the playbook's channel kinds deliver. Unset kinds refuse to send (ChannelNotConfigured)."""

    slack_webhook_url: SecretStr | None = None  # a Slack incoming webhook: the URL is the credential
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    email_from: str = "drp@corporate-intel.example"
    sns_topic_arn: str | None = None
    sns_region: str = "us-east-1"
    aws_endpoint_url: str | None = None  # moto in tests
    status_page_api: str | None = None  # Atlassian Statuspage-compatible: https://api.statuspage.io/v1/pages/<page_id>
    status_page_token: SecretStr | None = None
    status_page_public_url: str = "https://status.corporate-intel.com"  # what customers are told to watch
    ledger_ttl_days: int = 30


class AlertReceiverSettings(BaseModel):
    """`drp alerts serve`: Alertmanager authenticates with a bearer token; other senders may sign with HMAC."""

    host: str = "127.0.0.1"
    port: int = 9095
    bearer_token: SecretStr | None = None
    hmac_secret: SecretStr | None = None  # X-DRP-Signature: sha256=<hex HMAC-SHA256 of the body>

    @model_validator(mode="after")
    def _some_authentication(self) -> "AlertReceiverSettings":
        if self.bearer_token is None and self.hmac_secret is None:
            raise ValueError("alerts: set bearer_token or hmac_secret; the receiver never runs unauthenticated")
        return self
