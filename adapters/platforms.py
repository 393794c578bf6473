"""Where the application runs: a port with two adapters.

The runbooks only say "stop the application" and "start it with N replicas";
the local process platform (the embedded stack) and Kubernetes (production)
decide what that means. Both are idempotent and remember the replica count from
before the incident, so a retried stop after a crash never loses it.
"""

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from kubernetes.client import ApiClient, AppsV1Api, CoreV1Api
from kubernetes.client.exceptions import ApiException
from temporalio.exceptions import ApplicationError

from adapters.processes import ProcessTable, wait_for_port
from models.errors import ErrorKind

REPLICAS_ANNOTATION = "drp.dev/replicas-before-incident"

Heartbeat = Callable[..., None]


class AppPlatform(Protocol):
    def stop(self, incident_id: str, heartbeat: Heartbeat) -> int:
        """Stop serving; return the replica count from before the incident."""
        ...

    def start(self, replicas: int, heartbeat: Heartbeat) -> None:
        """Run `replicas` instances and wait until they are ready."""
        ...

    def repoint(self, host: str, port: int) -> None:
        """Point the application at another database server (takes effect at the next start)."""


@dataclass(frozen=True)
class LocalAppSpec:
    """How the stack runs the demo app as a local process (stack/app.json)."""

    argv: list[str]
    env: dict[str, str]
    port: int
    log: Path
    run_dir: Path

    @classmethod
    def load(cls, path: Path) -> "LocalAppSpec":
        raw = json.loads(Path(path).read_text())
        return cls(
            argv=raw["argv"], env=raw["env"], port=raw["port"], log=Path(raw["log"]), run_dir=Path(raw["run_dir"])
        )

    def save(self, path: Path) -> None:
        path.write_text(
            json.dumps(
                {
                    "argv": self.argv,
                    "env": self.env,
                    "port": self.port,
                    "log": str(self.log),
                    "run_dir": str(self.run_dir),
                },
                indent=2,
            )
        )
        os.chmod(path, 0o600)  # holds the app's database password


class LocalProcessPlatform:
    """One local process stands for the Deployment; it has one replica when up."""

    NAME = "app"

    def __init__(self, spec_path: Path):
        self.spec_path = Path(spec_path)

    @property
    def spec(self) -> LocalAppSpec:
        """Read on every use: another worker may have repointed the application."""
        return LocalAppSpec.load(self.spec_path)

    @property
    def processes(self) -> ProcessTable:
        return ProcessTable(self.spec.run_dir)

    def stop(self, incident_id: str, heartbeat: Heartbeat) -> int:
        self.processes.stop(self.NAME)
        return 1

    def start(self, replicas: int, heartbeat: Heartbeat) -> None:
        if replicas < 1:
            return
        self.processes.spawn(self.NAME, self.spec.argv, self.spec.log, env={**os.environ, **self.spec.env})
        wait_for_port(self.spec.port, timeout=30, what="the application")

    def repoint(self, host: str, port: int) -> None:
        spec = self.spec
        dsn = re.sub(r"\bhost=\S+", f"host={host}", spec.env["DRP_APP_DSN"])
        dsn = re.sub(r"\bport=\S+", f"port={port}", dsn)
        replace(spec, env={**spec.env, "DRP_APP_DSN": dsn}).save(self.spec_path)


class KubernetesPlatform:
    """Scales a Deployment with the official client; pods are awaited, not assumed."""

    def __init__(
        self, api: ApiClient, namespace: str, deployment: str, poll_seconds: float = 1.0, timeout_seconds: float = 600
    ):
        self.apps = AppsV1Api(api)
        self.core = CoreV1Api(api)
        self.namespace, self.deployment = namespace, deployment
        self.poll_seconds, self.timeout_seconds = poll_seconds, timeout_seconds

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ApiException as err:
            where = f"deployment {self.namespace}/{self.deployment}"
            if err.status == 404:
                raise ApplicationError(
                    f"{what}: {where} not found; check the namespace and deployment name in the worker settings",
                    type=ErrorKind.KubernetesNotFound,
                    non_retryable=True,
                ) from err
            if err.status in (401, 403):
                raise ApplicationError(
                    f"{what}: access to {where} denied ({err.status} {err.reason}); grant the "
                    "worker's service account get/patch on deployments and list on pods",
                    type=ErrorKind.KubernetesForbidden,
                    non_retryable=True,
                ) from err
            raise  # 409, 5xx, timeouts: retry

    def _deployment(self) -> Any:  # V1Deployment; its generated model types every field Optional
        return self._call("read", self.apps.read_namespaced_deployment, self.deployment, self.namespace)

    def stop(self, incident_id: str, heartbeat: Heartbeat) -> int:
        dep = self._deployment()
        annotations = dep.metadata.annotations or {}
        if REPLICAS_ANNOTATION in annotations:  # a previous attempt already recorded it
            before = int(annotations[REPLICAS_ANNOTATION])
        else:
            before = dep.spec.replicas or 0
        body = {"metadata": {"annotations": {REPLICAS_ANNOTATION: str(before)}}, "spec": {"replicas": 0}}
        self._call("scale to 0", self.apps.patch_namespaced_deployment, self.deployment, self.namespace, body)
        selector = ",".join(f"{k}={v}" for k, v in (dep.spec.selector.match_labels or {}).items())
        self._wait(
            "pods to terminate",
            heartbeat,
            lambda: (
                not self._call(
                    "list pods", self.core.list_namespaced_pod, self.namespace, label_selector=selector
                ).items
            ),
        )
        return before

    def repoint(self, host: str, port: int) -> None:
        """Set POSTGRES_HOST / POSTGRES_PORT on the Deployment's first container (playbook 4.2's `set env`)."""
        dep = self._deployment()
        container = dep.spec.template.spec.containers[0].name
        env = [{"name": "POSTGRES_HOST", "value": host}, {"name": "POSTGRES_PORT", "value": str(port)}]
        body = {"spec": {"template": {"spec": {"containers": [{"name": container, "env": env}]}}}}
        self._call("set env", self.apps.patch_namespaced_deployment, self.deployment, self.namespace, body)

    def start(self, replicas: int, heartbeat: Heartbeat) -> None:
        body = {"metadata": {"annotations": {REPLICAS_ANNOTATION: None}}, "spec": {"replicas": replicas}}
        self._call("scale up", self.apps.patch_namespaced_deployment, self.deployment, self.namespace, body)
        self._wait(
            f"{replicas} ready replicas", heartbeat, lambda: (self._deployment().status.ready_replicas or 0) >= replicas
        )

    def _wait(self, what: str, heartbeat: Heartbeat, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout_seconds
        while not done():
            if time.monotonic() > deadline:
                raise ApplicationError(
                    f"timed out after {self.timeout_seconds:.0f}s waiting for {what} "
                    f"of {self.namespace}/{self.deployment}",
                    type=ErrorKind.KubernetesTimeout,
                )
            heartbeat(f"waiting for {what}")
            time.sleep(self.poll_seconds)
