"""The example Prometheus rules and Alertmanager routing agree with the playbook and the receiver: every
runbook trigger the playbook classifies has an alert rule that keeps the labels its runbook input reads,
and Alertmanager sends it, authenticated, to the receiver's path."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from models.playbook import load_playbook
from starters.alerts import PATH
from workers.metrics import OUTCOMES, RTO

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy/prometheus/rules.yml"
ALERTMANAGER = ROOT / "deploy/alertmanager/alertmanager.yml"


def rules(group: str) -> dict[str, dict]:
    groups = {g["name"]: g for g in yaml.safe_load(RULES.read_text())["groups"]}
    return {r["alert"]: r for r in groups[group]["rules"]}


def test_every_playbook_trigger_has_a_rule_routed_to_the_receiver():
    playbook = load_playbook(ROOT / "playbook.yaml")
    triggers = rules("drp-runbook-triggers")
    config = yaml.safe_load(ALERTMANAGER.read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    classified = [r for r in playbook.classification.rules if "alertname" in r.match]
    assert classified
    for rule in classified:
        names = [a for a in triggers if re.fullmatch(rule.match["alertname"], a)]
        assert names, f"no alert rule for the playbook trigger {rule.match} ({rule.procedure})"
        for name in names:
            expr = triggers[name]["expr"]
            for label in (rule.input_from_labels or {}).values():
                assert label in expr, f"{name} drops the label {label!r} the {rule.procedure} input reads"
            route = next(
                r
                for r in config["route"]["routes"]
                if any(re.fullmatch(m.split("=~", 1)[1].strip('"'), name) for m in r["matchers"])
            )
            hook = receivers[route["receiver"]]["webhook_configs"][0]
            assert hook["url"].endswith(PATH) and hook["send_resolved"] is True
            assert hook["http_config"]["authorization"]["type"] == "Bearer"
    # drp's own alerts never go to the receiver.
    assert not any(name in str(config["route"]["routes"]) for name in rules("drp-self"))


def test_self_alerts_use_the_metrics_drp_exports():
    text = RULES.read_text()
    assert f"{OUTCOMES}_total" in text and "drp_receiver_requests_total" in text
    assert RTO.startswith("drp_")


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool comes with Debian's prometheus-alertmanager")
def test_alertmanager_config_is_valid():
    done = subprocess.run(["amtool", "check-config", str(ALERTMANAGER)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_exposes_metrics_and_the_codec_server(monkeypatch):
    from tests.test_compose import SERVICES, resolve
    from workers.settings import TemporalSettings

    worker = SERVICES["drp-worker"]
    assert worker["environment"]["DRP_METRICS__WORKER_BIND_ADDRESS"].endswith(":9464")
    assert "9464:9464" in worker["ports"]
    codec = SERVICES["drp-codec"]
    assert codec["command"] == ["drp", "codec", "serve"] and "8888:8888" in codec["ports"]
    for key in [k for k in __import__("os").environ if k.startswith("DRP_")]:
        monkeypatch.delenv(key)
    for key, value in codec["environment"].items():
        monkeypatch.setenv(key, resolve(value))
    settings = TemporalSettings()
    assert settings.codec_server.port == 8888 and settings.codec_server.bearer_token is not None
    assert settings.codec_server.cors_origins == ["http://localhost:8080"]  # the compose Web UI's origin
    assert all(s.get("env_file") for s in (SERVICES["drp-worker"], SERVICES["drp-alerts"], codec))


def test_compose_runs_the_server_image_with_schema_setup_namespace_and_health():
    from tests.test_compose import COMPOSE, SERVICES

    text = yaml.safe_dump(COMPOSE)
    assert "auto-setup" not in text and "tctl" not in text  # deprecated image, retired CLI
    assert SERVICES["temporal"]["image"].startswith("temporalio/server:")
    schema = " ".join(SERVICES["temporal-schema"]["command"])
    for db, name in (("temporal", "postgresql/v12/temporal"), ("temporal_visibility", "postgresql/v12/visibility")):
        assert f"--db {db} setup-schema -v 0.0" in schema
        assert f"--db {db} update-schema --schema-name {name}" in schema
    assert SERVICES["temporal-schema"]["environment"]["SQL_PLUGIN"] == SERVICES["temporal"]["environment"]["DB"]
    assert SERVICES["temporal"]["depends_on"]["temporal-schema"]["condition"] == "service_completed_successfully"
    dynamic = SERVICES["temporal"]["environment"]["DYNAMIC_CONFIG_FILE_PATH"]
    mount = next(v for v in SERVICES["temporal"]["volumes"] if "dynamicconfig" in v)
    host_dir, container_dir = mount.split(":")[:2]
    assert dynamic == f"config/dynamicconfig/{Path(dynamic).name}" and container_dir.endswith("config/dynamicconfig")
    config = yaml.safe_load((ROOT / host_dir / Path(dynamic).name).read_text())
    assert all(isinstance(v, list) and "value" in v[0] for v in config.values())
    admin = " ".join(SERVICES["temporal-admin-tools"]["command"])
    assert "temporal operator cluster health" in admin and "temporal operator namespace create" in admin
    for service in ("drp-worker", "drp-alerts"):
        assert SERVICES[service]["depends_on"]["temporal-admin-tools"]["condition"] == "service_completed_successfully"
