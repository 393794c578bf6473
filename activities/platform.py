"""PlatformActivities: stop, start and check the application, wherever it runs."""

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from adapters.platforms import AppPlatform
from models.errors import ErrorKind
from models.failover import RepointRequest, WriteCheck
from models.platform import AppHealth, AppStopped, StartAppRequest, StopAppRequest


class PlatformActivities:
    def __init__(
        self,
        platform: AppPlatform,
        http: httpx.Client,
        health_url: str,
        critical_url: str,
        write_check_url: str | None = None,
    ):
        self.platform = platform
        self.http = http
        self.health_url = health_url
        self.critical_url = critical_url
        self.write_check_url = write_check_url

    @activity.defn
    def stop_application(self, req: StopAppRequest) -> AppStopped:
        """Stop serving (local process stopped, or Deployment scaled to 0 with its replica count kept in an
        annotation) and wait until it is gone; returns the replica count from before the incident, also on a
        retry. Heartbeats while waiting. Non-retryable: KubernetesNotFound, KubernetesForbidden.
        """
        return AppStopped(replicas_before=self.platform.stop(req.incident_id, activity.heartbeat))

    @activity.defn
    def start_application(self, req: StartAppRequest) -> None:
        """Run `req.replicas` instances and wait until they are ready (heartbeats while waiting); idempotent.
        KubernetesTimeout (retryable) when they are not ready in time.
        """
        self.platform.start(req.replicas, activity.heartbeat)

    @activity.defn
    def check_application(self) -> AppHealth:
        """/health and the critical endpoint must both answer 200; retried until they do."""
        try:
            health = self.http.get(self.health_url)
            critical = self.http.get(self.critical_url)
        except httpx.HTTPError as err:
            raise ApplicationError(f"application not answering: {err}", type=ErrorKind.AppUnhealthy) from err
        if health.status_code != 200 or critical.status_code != 200:
            raise ApplicationError(
                f"application unhealthy: {self.health_url} -> {health.status_code}, "
                f"{self.critical_url} -> {critical.status_code}",
                type=ErrorKind.AppUnhealthy,
            )
        items = critical.json()
        return AppHealth(
            health_status=health.status_code,
            critical_status=critical.status_code,
            critical_items=len(items) if isinstance(items, list) else 0,
        )

    @activity.defn
    def repoint_application(self, req: RepointRequest) -> None:
        """Point the application at another PostgreSQL host and port; takes effect at its next start. Idempotent."""
        self.platform.repoint(req.host, req.port)

    @activity.defn
    def check_write(self) -> WriteCheck:
        """One write through the application; retried until it succeeds."""
        if not self.write_check_url:
            raise ApplicationError("no app.write_check_url configured", type=ErrorKind.NoWriteCheck, non_retryable=True)
        try:
            resp = self.http.post(self.write_check_url)
        except httpx.HTTPError as err:
            raise ApplicationError(f"application not answering: {err}", type=ErrorKind.AppUnhealthy) from err
        if resp.status_code != 201:
            raise ApplicationError(
                f"write through the application failed: {resp.status_code} {resp.text[:200]}",
                type=ErrorKind.AppUnhealthy,
            )
        return WriteCheck(status=resp.status_code, served_by_port=resp.json()["server_port"])
