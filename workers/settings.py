"""Worker settings: where the real systems are, read from the environment.

Every field can be set as an environment variable (DRP_ prefix, nested with
double underscores: DRP_POSTGRES__PORT=5432) or in a JSON file named by
DRP_SETTINGS_FILE (the embedded stack writes one). Environment wins over the
file. Secrets are SecretStr: they reach clients, never workflow inputs,
histories or logs.
"""

import os
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, SecretStr
from pydantic_settings import BaseSettings, JsonConfigSettingsSource, SettingsConfigDict

from adapters.barman import BarmanCloud
from adapters.pgserver import PgServer, embedded_bin_dir
from models.config import (
    AlertReceiverSettings,
    FailoverSettings,
    KubernetesPlatformSettings,
    NotifySettings,
    RdsSettings,
)
from models.durations import Duration
from workers.deploy_settings import CodecServerSettings, EncryptionSettings, MetricsSettings, TemporalTlsSettings


class PostgresSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 5432
    superuser: str = "postgres"
    password: SecretStr | None = None
    data_dir: Path
    bin_dir: Path | None = None
    os_user: str | None = "drp-postgres"

    def server(self, server_env: dict[str, str] | None = None, standby: "StandbySettings | None" = None) -> PgServer:
        return PgServer(
            bin_dir=self.bin_dir or embedded_bin_dir(),
            data_dir=standby.data_dir if standby else self.data_dir,
            port=standby.port if standby else self.port,
            os_user=self.os_user,
            host=standby.host if standby else self.host,
            superuser=self.superuser,
            password=self.password.get_secret_value() if self.password else None,
            server_env=server_env or {},
        )


class BackupSettings(BaseModel):
    destination: str = "s3://drp-backups/postgres"
    server_name: str = "primary"
    endpoint_url: str | None = None
    aws_region: str = "us-east-1"
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    barman_bin_dir: Path | None = None

    def credentials_env(self) -> dict[str, str]:
        env = {"AWS_DEFAULT_REGION": self.aws_region}
        if self.aws_access_key_id and self.aws_secret_access_key:
            env["AWS_ACCESS_KEY_ID"] = self.aws_access_key_id.get_secret_value()
            env["AWS_SECRET_ACCESS_KEY"] = self.aws_secret_access_key.get_secret_value()
        return env

    def boto3_kwargs(self, endpoint_url: str | None) -> dict:
        """Credentials (or the default chain when unset) and endpoint for a boto3 client."""
        return {
            "aws_access_key_id": self.aws_access_key_id.get_secret_value() if self.aws_access_key_id else None,
            "aws_secret_access_key": (
                self.aws_secret_access_key.get_secret_value() if self.aws_secret_access_key else None
            ),
            "endpoint_url": endpoint_url,
        }

    def barman(self) -> BarmanCloud:
        import sys

        return BarmanCloud(
            bin_dir=self.barman_bin_dir or Path(sys.executable).parent,
            destination=self.destination,
            server_name=self.server_name,
            endpoint_url=self.endpoint_url,
            credentials_env=self.credentials_env(),
        )


class LocalPlatformSettings(BaseModel):
    app_spec: Path


class PlatformSettings(BaseModel):
    kind: Literal["local", "kubernetes"] = "local"
    local: LocalPlatformSettings | None = None
    kubernetes: KubernetesPlatformSettings | None = None


class AppCheckSettings(BaseModel):
    health_url: str
    critical_url: str
    write_check_url: str | None = None  # POST: the application writes one row and says which server took it


class StandbySettings(BaseModel):
    """A streaming standby of `postgres` (same credentials and OS user)."""

    host: str = "127.0.0.1"
    port: int
    data_dir: Path


class _DrpSettings(BaseSettings):
    """DRP_* variables, then the JSON file named by DRP_SETTINGS_FILE."""

    model_config = SettingsConfigDict(
        env_prefix="DRP_", env_nested_delimiter="__", extra="ignore", hide_input_in_errors=True
    )

    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "drp-recovery"
    # A secured cluster / Temporal Cloud (workers/deploy_settings.py); all read by temporal_client.connect().
    temporal_tls: TemporalTlsSettings | None = None
    temporal_api_key: SecretStr | None = None  # sent as Authorization: Bearer; turns TLS on unless temporal_tls says
    encryption: EncryptionSettings = EncryptionSettings()
    codec_server: CodecServerSettings | None = None
    metrics: MetricsSettings = MetricsSettings()

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        sources = [init_settings, env_settings]
        path = os.environ.get("DRP_SETTINGS_FILE")
        if path:
            sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
        return tuple(sources)


class TemporalSettings(_DrpSettings):
    """Only what connecting to Temporal needs (the CLI, the starters, the codec server)."""


class ReceiverSettings(_DrpSettings):
    """`drp alerts serve` talks only to Temporal: it needs none of the worker's systems."""

    alerts: AlertReceiverSettings | None = None


class Settings(_DrpSettings):
    # How long a workflow waits for the worker that last ran it before any worker may take it:
    # the pause a worker crash adds to a running incident or runbook.
    sticky_queue_timeout: Duration = timedelta(seconds=10)
    playbook_path: Path = Path(__file__).resolve().parent.parent / "playbook.yaml"
    log_level: str = "INFO"
    postgres: PostgresSettings
    backup: BackupSettings = BackupSettings()
    platform: PlatformSettings
    app: AppCheckSettings
    standby: StandbySettings | None = None
    rds: RdsSettings | None = None  # when set, DatabaseFailover promotes this RDS replica
    failover: FailoverSettings | None = None
    redis_url: SecretStr | None = None  # where the application keeps blocked_api_keys
    evidence_destination: str = "s3://drp-backups/evidence"  # recovered rows, as CSV, per incident
    reports_destination: str = "s3://drp-backups/reports"  # post-incident reports, <incident>.md
    notify: NotifySettings = NotifySettings()  # incident messages; the delivery ledger uses redis_url

    def production_server(self) -> PgServer:
        """The production primary, started (when anything here starts it) with the archive's credentials
        in its environment, so its archive_command works whoever started it."""
        return self.postgres.server(server_env=self.backup.credentials_env())

    def standby_server(self) -> PgServer | None:
        """The streaming standby, likewise with the archive's credentials (it archives once promoted)."""
        if self.standby is None:
            return None
        return self.postgres.server(server_env=self.backup.credentials_env(), standby=self.standby)
