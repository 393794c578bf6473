"""playbook.yaml: the shipped file is valid; a wrong value names field and file, and nothing starts."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from models.playbook import PlaybookError, Severity, load_playbook
from workers.main import build_activities
from workers.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK = ROOT / "playbook.yaml"


def write_variant(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(PLAYBOOK.read_text())
    mutate(raw)
    path = tmp_path / "playbook.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_playbook_carries_the_documented_targets():
    playbook = load_playbook(PLAYBOOK)
    objectives = playbook.objectives_for("db-corruption")
    assert objectives.rto.total_seconds() == 2 * 3600 and objectives.rpo.total_seconds() == 300
    assert playbook.recovery_objectives.rto["accidental_data_deletion"].total_seconds() == 1800
    assert playbook.sla.monthly_downtime_budget.total_seconds() == 43 * 60 + 12
    assert playbook.severities[Severity.P0].status_update_every.total_seconds() == 900
    assert set(playbook.severities) == set(Severity)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (
            lambda raw: raw["recovery_objectives"]["rto"].update(database_corruption="2 hours"),
            "recovery_objectives.rto.database_corruption",
        ),
        (lambda raw: raw["severities"].pop("P2"), "severities: missing P2"),
        (lambda raw: raw["sla"].update(availability_percent=120), "sla.availability_percent"),
        (lambda raw: raw["procedures"]["db-corruption"].update(rto="nonexistent"), "procedures.db-corruption.rto"),
        (lambda raw: raw["severities"]["P0"].update(respose_team=["cto"]), "severities.P0.respose_team"),
        (
            lambda raw: raw["severities"]["P0"]["notify"].update(status_update=["slak"]),
            "severities.P0.notify.status_update: 'slak' not in communication.channels",
        ),
        (
            lambda raw: raw["severities"]["P1"]["approvers"].update({"*": ["janitor"]}),
            "severities.P1.approvers.*: 'janitor' not in any person's roles",
        ),
        (
            lambda raw: raw["severities"]["P2"].update(approvers={"db-corruption": ["on_call_engineer"]}),
            'needs a "*" entry',
        ),
        (lambda raw: raw["escalation"]["levels"][2].update(after="10m"), "level 3 must follow level 2 and come later"),
        (
            lambda raw: raw["classification"]["rules"][0].update(procedure="db-corrupt"),
            "classification.rules.0.procedure: 'db-corrupt' is not a procedure",
        ),
        (
            lambda raw: raw["classification"]["rules"][0]["match"].update(alertname="Postgres("),
            "is not a regular expression",
        ),
        (lambda raw: raw["communication"]["channels"]["dba_email"].pop("to"), "an email channel needs `to` recipients"),
    ],
)
def test_wrong_value_is_an_error_naming_the_field_and_the_file(tmp_path, mutate, field):
    path = write_variant(tmp_path, mutate)
    with pytest.raises(PlaybookError) as err:
        load_playbook(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_unreadable_and_non_yaml_files_are_clear_errors(tmp_path):
    with pytest.raises(PlaybookError, match="cannot read"):
        load_playbook(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("severities: [unclosed")
    with pytest.raises(PlaybookError, match="not valid YAML"):
        load_playbook(bad)


def test_worker_refuses_to_start_on_a_wrong_playbook(tmp_path):
    path = write_variant(tmp_path, lambda raw: raw["recovery_objectives"]["rpo"].update(database="soon"))
    settings = Settings(
        postgres={"data_dir": tmp_path / "pg"},
        platform={"kind": "local", "local": {"app_spec": tmp_path / "app.json"}},
        app={"health_url": "http://x/health", "critical_url": "http://x/"},
        playbook_path=path,
    )
    with pytest.raises(PlaybookError, match="recovery_objectives.rpo.database"):
        build_activities(settings)


def test_cli_check_exits_2_with_the_reason(tmp_path):
    path = write_variant(tmp_path, lambda raw: raw["sla"].update(p99_latency="fast"))
    proc = subprocess.run(
        [sys.executable, "-m", "starters.cli", "playbook", "check", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2
    assert "sla.p99_latency" in proc.stderr and str(path) in proc.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "starters.cli", "playbook", "check"], capture_output=True, text=True, cwd=ROOT
    )
    assert ok.returncode == 0, ok.stderr
