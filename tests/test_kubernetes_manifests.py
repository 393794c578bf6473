"""deploy/kubernetes agrees with the code: every DRP_* variable the manifests set is a Settings field,
each overlay's environment builds valid Settings for the worker, the receiver and the codec server,
and the worker's Role grants exactly the API calls the Kubernetes platform adapter makes (derived
from the adapter's source), nothing more.

kustomize itself cannot run here (no binary from a package registry is pinned); the test applies the
two features the manifests use — resources and configMapGenerator literals with behavior: merge —
reading the YAML with the kubernetes client's yaml (PyYAML)."""

import ast
import json
import os
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from workers.settings import ReceiverSettings, Settings, TemporalSettings

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy/kubernetes"
OVERLAYS = sorted(p.parent for p in (KUBE / "overlays").glob("*/kustomization.yaml"))


def build(directory: Path) -> tuple[list[dict], dict[str, str]]:
    """(objects, the drp-settings ConfigMap's data) of a kustomization directory."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects, settings = [], {}
    for resource in k.get("resources", []):
        path = directory / resource
        if path.is_dir():
            more, base_settings = build(path)
            objects += more
            settings.update(base_settings)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for generator in k.get("configMapGenerator", []):
        assert generator["name"] == "drp-settings"
        literals = dict(line.split("=", 1) for line in generator["literals"])
        if generator.get("behavior") == "merge":
            settings.update(literals)
        else:
            settings = literals
    return objects, settings


def containers(objects: list[dict]) -> dict[str, dict]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
        for d in objects
        if d["kind"] == "Deployment"
    }


def field_exists(model: type[BaseModel], path: list[str]) -> bool:
    """Whether DRP_A__B__C names a field of the Settings classes (a dict field takes any key)."""
    name, rest = path[0], path[1:]
    field = model.model_fields.get(name)
    if field is None:
        return False
    if not rest:
        return True
    for candidate in _types(field.annotation):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel) and field_exists(candidate, rest):
            return True
        if typing.get_origin(candidate) is dict and len(rest) == 1:
            return True
    return False


def _types(annotation) -> list:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [t for a in typing.get_args(annotation) for t in _types(a)]
    return [annotation]


def env_names(container: dict, settings: dict[str, str]) -> set[str]:
    return set(settings) | {e["name"] for e in container.get("env", [])}


def secret_values(container: dict, settings: dict[str, str]) -> dict[str, str]:
    """Stand-ins for the Secret's values, of the right shape."""
    import base64

    key = base64.b64encode(b"k" * 32).decode()
    shapes = {"encryption-keys": json.dumps({settings["DRP_ENCRYPTION__KEY_ID"]: key})}
    return {
        e["name"]: shapes.get(e["valueFrom"]["secretKeyRef"]["key"], "stand-in")
        for e in container.get("env", [])
        if "valueFrom" in e
    }


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_variable_is_a_setting_and_each_process_accepts_its_environment(overlay, monkeypatch):
    objects, settings = build(overlay)
    deployments = containers(objects)
    assert set(deployments) == {"drp-worker", "drp-alert-receiver", "drp-codec-server"}
    for name, container in deployments.items():
        assert container["envFrom"] == [{"configMapRef": {"name": "drp-settings"}}]
        for var in env_names(container, settings):
            assert var.startswith("DRP_"), var
            path = var.removeprefix("DRP_").lower().split("__")
            assert any(field_exists(kind, path) for kind in (Settings, ReceiverSettings)), (
                f"{overlay.name}: {var} is not a field of Settings or ReceiverSettings"
            )
        for var in list(os.environ):
            if var.startswith("DRP_"):
                monkeypatch.delenv(var)
        for var, value in {**settings, **secret_values(container, settings)}.items():
            monkeypatch.setenv(var, value)
        kind = {"drp-worker": Settings, "drp-alert-receiver": ReceiverSettings, "drp-codec-server": TemporalSettings}[
            name
        ]
        parsed = kind()  # what the process reads at start: it must validate
        assert parsed.encryption.enabled and parsed.encryption.key_id in parsed.encryption.keys
        if name == "drp-worker":
            assert parsed.platform.kind == "kubernetes" and parsed.metrics.worker_bind_address
            assert str(parsed.metrics.worker_bind_address).endswith(":9464")
        if name == "drp-alert-receiver":
            assert parsed.alerts is not None and parsed.alerts.bearer_token is not None
        if name == "drp-codec-server":
            assert parsed.codec_server is not None and parsed.codec_server.bearer_token is not None
    queues = {o.name: build(o)[1]["DRP_TASK_QUEUE"] for o in OVERLAYS}
    assert len(set(queues.values())) == len(OVERLAYS), queues  # one queue per region


def adapter_calls() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every Kubernetes API call the platform adapter makes: the
    `self.apps.<method>` / `self.core.<method>` calls in the class KubernetesPlatform, wherever it lives."""
    sources = [
        p
        for d in ("activities", "adapters")
        for p in (ROOT / d).rglob("*.py")
        if "class KubernetesPlatform" in p.read_text()
    ]
    assert sources, "KubernetesPlatform not found"
    groups = {"apps": "apps", "core": ""}
    verbs = {
        "read": "get",
        "list": "list",
        "patch": "patch",
        "create": "create",
        "delete": "delete",
        "replace": "update",
        "watch": "watch",
    }
    calls = set()
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"
                and node.value.attr in groups
            ):
                verb, _, kind = node.attr.partition("_namespaced_")
                assert kind, f"{source}: {node.attr} is not a namespaced call; extend this test"
                resource = kind.removesuffix("_status").removesuffix("_scale")
                calls.add((groups[node.value.attr], resource + "s", verbs[verb]))
    return calls


def test_the_worker_role_grants_exactly_what_the_adapter_calls():
    objects, settings = build(KUBE / "base")
    role = next(o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "drp-worker")
    granted = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert granted == adapter_calls()
    for rule in role["rules"]:
        if rule["resources"] == ["deployments"]:
            assert rule["resourceNames"] == [settings["DRP_PLATFORM__KUBERNETES__DEPLOYMENT"]]
    binding = next(o for o in objects if o["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == "drp-worker" and binding["subjects"][0]["name"] == "drp-worker"
    worker = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "drp-worker")
    assert worker["spec"]["template"]["spec"]["serviceAccountName"] == "drp-worker"
    for other in ("drp-alert-receiver", "drp-codec-server"):
        spec = next(o for o in objects if o["metadata"]["name"] == other and o["kind"] == "Deployment")
        assert spec["spec"]["template"]["spec"]["serviceAccountName"] == "drp-service"  # no API token mounted
