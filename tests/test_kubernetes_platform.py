"""The Kubernetes adapter over real HTTP against kmock's Kubernetes emulator.

No Kubernetes API server can run here. kmock stores and serves objects like
one, but it has no controllers: `fake_deployment_controller` below plays the
Deployment controller's part (pods go when replicas drop to 0, readyReplicas
follows spec.replicas), and is named as the fake it is.
"""

import asyncio

import pytest
from kubernetes import client as k8s
from temporalio.exceptions import ApplicationError

from adapters.platforms import REPLICAS_ANNOTATION, KubernetesPlatform

NS, NAME = "prod", "corporate-intel-api"
LABELS = {"app": "corporate-intel"}


def api_client(kmock) -> k8s.ApiClient:
    configuration = k8s.Configuration()
    configuration.host = str(kmock.url).rstrip("/")
    return k8s.ApiClient(configuration)


def platform(kmock, **kwargs) -> KubernetesPlatform:
    return KubernetesPlatform(api_client(kmock), NS, NAME, poll_seconds=0.05, timeout_seconds=120, **kwargs)


async def deploy(kmock, replicas: int) -> None:
    apps, core = k8s.AppsV1Api(api_client(kmock)), k8s.CoreV1Api(api_client(kmock))
    await asyncio.to_thread(
        apps.create_namespaced_deployment,
        NS,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": LABELS},
                "template": {
                    "metadata": {"labels": LABELS},
                    "spec": {"containers": [{"name": "api", "image": "api:1"}]},
                },
            },
            "status": {"readyReplicas": replicas},
        },
    )
    for i in range(replicas):
        await asyncio.to_thread(
            core.create_namespaced_pod,
            NS,
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{NAME}-{i}", "namespace": NS, "labels": LABELS}},
        )


async def fake_deployment_controller(kmock, stop: asyncio.Event, ns: str = NS, name: str = NAME) -> None:
    """FAKE: stands in for the Deployment controller kmock does not have."""
    apps, core = k8s.AppsV1Api(api_client(kmock)), k8s.CoreV1Api(api_client(kmock))
    while not stop.is_set():
        dep = await asyncio.to_thread(apps.read_namespaced_deployment, name, ns)
        try:
            pods = (await asyncio.to_thread(core.list_namespaced_pod, ns)).items
        except k8s.ApiException as err:  # kmock knows no pods resource until a pod was created
            if err.status != 404:
                raise
            pods = []
        if dep.spec.replicas == 0:
            for pod in pods:
                await asyncio.to_thread(core.delete_namespaced_pod, pod.metadata.name, ns)
        await asyncio.to_thread(
            apps.patch_namespaced_deployment, name, ns, {"status": {"readyReplicas": dep.spec.replicas}}
        )
        await asyncio.sleep(0.2)


async def test_scale_to_zero_waits_for_pods_and_scale_up_restores_the_replica_count(kmock):
    await deploy(kmock, replicas=3)
    stop = asyncio.Event()
    controller = asyncio.create_task(fake_deployment_controller(kmock, stop))
    beats: list[str] = []
    try:
        before = await asyncio.to_thread(platform(kmock).stop, "INC-1", beats.append)
        assert before == 3
        pods = await asyncio.to_thread(k8s.CoreV1Api(api_client(kmock)).list_namespaced_pod, NS)
        assert pods.items == []  # stop returned only once the pods were gone
        assert beats and "pods to terminate" in beats[0]

        # A retried stop after a crash still knows the count from before the incident.
        assert await asyncio.to_thread(platform(kmock).stop, "INC-1", beats.append) == 3

        await asyncio.to_thread(platform(kmock).start, before, beats.append)
        dep = await asyncio.to_thread(k8s.AppsV1Api(api_client(kmock)).read_namespaced_deployment, NAME, NS)
        assert dep.spec.replicas == 3 and dep.status.ready_replicas == 3
        assert REPLICAS_ANNOTATION not in (dep.metadata.annotations or {})
    finally:
        stop.set()
        await controller
    patches = [r for r in kmock["patch"] if "status" not in (r.data or {})]
    assert [p.data["spec"]["replicas"] for p in patches] == [0, 0, 3]


async def test_missing_deployment_is_a_clear_non_retryable_error(kmock):
    with pytest.raises(ApplicationError) as err:
        await asyncio.to_thread(platform(kmock).stop, "INC-1", lambda *_: None)
    assert err.value.non_retryable and err.value.type == "KubernetesNotFound"
    assert f"deployment {NS}/{NAME} not found" in err.value.message


async def test_forbidden_is_a_clear_non_retryable_error(kmock):
    await deploy(kmock, replicas=1)
    kmock["patch"] << 403
    with pytest.raises(ApplicationError) as err:
        await asyncio.to_thread(platform(kmock).stop, "INC-1", lambda *_: None)
    assert err.value.non_retryable and err.value.type == "KubernetesForbidden"
    assert "grant the worker's service account" in err.value.message
