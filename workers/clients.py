"""Clients built from Settings (Kubernetes, the application platform, Redis, S3): for the worker and the CLI,
which must not import the activities to read a report."""

import os

from adapters.platforms import AppPlatform, KubernetesPlatform, LocalProcessPlatform
from models.config import KubernetesPlatformSettings
from workers.settings import PlatformSettings, Settings


def build_kubernetes(k: KubernetesPlatformSettings) -> KubernetesPlatform:
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    if k.api_url:
        configuration = k8s.Configuration()
        configuration.host = k.api_url
        api = k8s.ApiClient(configuration)
    elif k.kubeconfig is None and k.context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        # In a pod (deploy/kubernetes): the service account's token and CA, as the RBAC there grants.
        configuration = k8s.Configuration()
        k8s_config.load_incluster_config(client_configuration=configuration)
        api = k8s.ApiClient(configuration)
    else:
        api = k8s_config.new_client_from_config(
            config_file=str(k.kubeconfig) if k.kubeconfig else None, context=k.context
        )
    return KubernetesPlatform(api, k.namespace, k.deployment)


def build_platform(settings: PlatformSettings) -> AppPlatform:
    if settings.kind == "local":
        if settings.local is None:
            raise ValueError("platform.kind is 'local' but platform.local.app_spec is not set")
        return LocalProcessPlatform(settings.local.app_spec)
    if settings.kubernetes is None:
        raise ValueError("platform.kind is 'kubernetes' but platform.kubernetes is not set")
    return build_kubernetes(settings.kubernetes)


def build_redis(settings: Settings):
    import redis

    if settings.redis_url is None:
        return None
    return redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=5)


def build_s3(settings: Settings):
    import boto3

    b = settings.backup
    return boto3.client("s3", region_name=b.aws_region, **b.boto3_kwargs(b.endpoint_url))
