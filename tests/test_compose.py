"""docker-compose.temporal.yml cannot run here; check it agrees with the code."""

import re
from pathlib import Path

import pytest
import yaml

from stack.stack import SEARCH_ATTRIBUTES
from workers.settings import ReceiverSettings, Settings

COMPOSE = yaml.safe_load((Path(__file__).resolve().parent.parent / "docker-compose.temporal.yml").read_text())
SERVICES = COMPOSE["services"]


def resolve(value: str) -> str:
    """${VAR:-default} -> default, ${VAR:?msg} -> a placeholder (it must be set in production)."""
    return re.sub(
        r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)?\}",
        lambda m: m.group(2) if m.group(2) is not None else f"<{m.group(1)}>",
        str(value),
    )


def test_services_and_ports():
    assert {
        "temporal",
        "temporal-postgresql",
        "temporal-ui",
        "temporal-admin-tools",
        "drp-worker",
        "drp-alerts",
    } <= set(SERVICES)
    assert "7233:7233" in SERVICES["temporal"]["ports"]
    assert SERVICES["temporal"]["environment"]["DB"] == "postgres12"
    assert SERVICES["temporal"]["environment"]["POSTGRES_SEEDS"] == "temporal-postgresql"
    assert SERVICES["temporal-ui"]["environment"]["TEMPORAL_ADDRESS"] == "temporal:7233"


def test_admin_tools_register_the_search_attributes_the_workflows_set():
    command = " ".join(SERVICES["temporal-admin-tools"]["command"])
    for name in SEARCH_ATTRIBUTES:
        assert name in command


@pytest.mark.parametrize("service", ["drp-worker", "drp-alerts"])
def test_service_environment_is_a_complete_valid_settings(monkeypatch, service):
    env = {k: resolve(v) for k, v in SERVICES[service]["environment"].items()}
    assert all(k.startswith("DRP_") for k in env)
    for key in list(__import__("os").environ):
        if key.startswith("DRP_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = (Settings if service == "drp-worker" else ReceiverSettings)()
    assert settings.temporal_address == "temporal:7233"
    assert settings.temporal_address.split(":")[0] in SERVICES
    if service == "drp-worker":
        assert settings.platform.kind == "kubernetes" and settings.platform.kubernetes.deployment
        assert settings.postgres.password.get_secret_value() == "<DRP_POSTGRES_PASSWORD>"
        assert settings.notify.smtp_password.get_secret_value() == "<DRP_SMTP_PASSWORD>"
    else:
        assert settings.alerts.bearer_token.get_secret_value() == "<DRP_ALERTS_TOKEN>"
    # Every variable is read by Settings: none is silently ignored by a typo.
    used = set()
    for key in env:
        path = key.removeprefix("DRP_").lower().split("__")
        node = settings
        for part in path:
            assert hasattr(node, part), f"{key} does not name a Settings field"
            node = getattr(node, part)
        used.add(key)
    assert used == set(env)
