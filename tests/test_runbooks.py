"""The runbook registry, the error kinds and the layering between packages: fast, no servers."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from models.errors import NON_RETRYABLE, RETRYABLE, ErrorKind
from models.inputs import RunbookInput
from models.playbook import PlaybookError, Severity, load_playbook
from models.runbooks import BY_PROCEDURE, RUNBOOKS, UnknownRunbook, runbook
from workers.main import WORKFLOWS
from workflows import _options as opt

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("spec", RUNBOOKS, ids=lambda s: s.procedure)
def test_each_registered_runbook_names_its_workflow_class_and_input(spec):
    cls = spec.load()
    definition = cls.__temporal_workflow_definition
    assert definition.name == spec.workflow_type
    assert cls in WORKFLOWS
    assert issubclass(spec.input_model, RunbookInput)
    # The run method takes the registered input model: what the CLI validates is what the workflow reads.
    assert definition.arg_types == [spec.input_model]
    assert spec.workflow_id("INC-1") == f"{spec.procedure}-INC-1"


def test_the_worker_runs_every_runbook_the_incident_lock_and_nothing_twice():
    names = [w.__temporal_workflow_definition.name for w in WORKFLOWS]
    assert sorted(names) == sorted(["Incident", "DatabaseLock", *(s.workflow_type for s in RUNBOOKS)])


def test_procedure_names_and_older_aliases_resolve_to_one_description():
    assert runbook("deletion") is runbook("accidental-deletion") is BY_PROCEDURE["accidental-deletion"]
    assert runbook("failover").procedure == "db-failover" and runbook("failback").procedure == "db-failback"
    with pytest.raises(UnknownRunbook, match="db-corruption"):
        runbook("restore-everything")


def test_the_base_input_holds_the_common_fields_and_runbooks_keep_their_defaults():
    assert {"incident_id", "severity", "approval_timeout", "heartbeat_timeout"} <= set(RunbookInput.model_fields)
    failback = BY_PROCEDURE["db-failback"].input_model(incident_id="INC-1")
    assert failback.severity == Severity.P2 and failback.approval_timeout.total_seconds() == 4 * 3600
    corruption = BY_PROCEDURE["db-corruption"].input_model(incident_id="INC-1", database="app")
    assert corruption.severity == Severity.P0 and corruption.heartbeat_timeout.total_seconds() == 30
    with pytest.raises(ValidationError):  # still frozen and strict about unknown fields
        BY_PROCEDURE["db-corruption"].input_model(incident_id="INC-1", database="app", databse="typo")


def test_a_starter_summary_comes_from_the_registry():
    spec = BY_PROCEDURE["region-failover"]
    inp = spec.input_model(incident_id="INC-7", backup_region="us-west-2")
    assert spec.summary(inp) == "P0 region failover to us-west-2 (INC-7)"


def _playbook_variant(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((ROOT / "playbook.yaml").read_text())
    mutate(raw)
    (tmp_path / "templates").symlink_to(ROOT / "templates")
    path = tmp_path / "playbook.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_playbook_may_only_name_registered_runbooks(tmp_path):
    def unknown(raw):
        raw["procedures"]["db-restore"] = {"rto": "database_corruption", "rpo": "database"}

    with pytest.raises(PlaybookError, match="procedures.db-restore: not a runbook"):
        load_playbook(_playbook_variant(tmp_path, unknown))


def test_an_older_playbook_naming_the_workflow_type_still_loads_when_it_agrees(tmp_path):
    def named(raw):
        raw["procedures"]["db-corruption"]["workflow"] = "DatabaseCorruptionRecovery"

    assert load_playbook(_playbook_variant(tmp_path, named)).procedures["db-corruption"].workflow


def test_a_playbook_naming_another_workflow_type_is_refused(tmp_path):
    def wrong(raw):
        raw["procedures"]["db-corruption"]["workflow"] = "DatabaseFailover"

    with pytest.raises(PlaybookError, match="procedures.db-corruption.workflow"):
        load_playbook(_playbook_variant(tmp_path, wrong))


def test_the_non_retryable_list_is_derived_from_the_error_kinds():
    assert opt.NON_RETRYABLE == NON_RETRYABLE
    assert set(NON_RETRYABLE) == {k.value for k in ErrorKind} - {k.value for k in RETRYABLE}
    assert "UnknownDatabase" in NON_RETRYABLE and "ArchiveUnreachable" not in NON_RETRYABLE
    for options in (opt.quick(), {"retry_policy": opt.RETRY}):
        assert options["retry_policy"].non_retryable_error_types == NON_RETRYABLE


def test_no_error_type_is_spelled_as_a_string_literal():
    """Raise sites use ErrorKind: a misspelled literal would be retried instead of failing at once."""
    offenders = []
    for folder in ("activities", "adapters", "workflows", "starters", "workers", "stack"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"(?<![\w_])type=[\"']", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def _imported_by(module: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout.split()
    return {m.split(".")[0] for m in out if m.startswith(("activities", "workflows", "adapters"))}


@pytest.mark.parametrize("module", ["starters.cli", "workers.settings", "workers.clients", "stack.stack"])
def test_settings_the_stack_and_the_cli_do_not_import_activities(module):
    assert "activities" not in _imported_by(module)


def test_adapters_import_neither_activities_nor_workflows():
    modules = " ".join(f"adapters.{p.stem}" for p in sorted((ROOT / "adapters").glob("*.py")) if p.stem != "__init__")
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; import {', '.join(modules.split())}; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert not {m for m in out.stdout.split() if m.startswith(("activities", "workflows"))}


def test_activities_hold_only_activity_classes():
    """activities/ modules define classes whose public methods are activities, and private helpers."""
    import importlib
    import inspect

    for path in sorted((ROOT / "activities").glob("*.py")):
        if path.stem == "__init__":
            continue
        module = importlib.import_module(f"activities.{path.stem}")
        own = [obj for _, obj in inspect.getmembers(module) if getattr(obj, "__module__", None) == module.__name__]
        classes = [c for c in own if inspect.isclass(c)]
        assert classes and all(c.__name__.endswith("Activities") for c in classes), path.name
        public_functions = [f.__name__ for f in own if inspect.isfunction(f) and not f.__name__.startswith("_")]
        assert not public_functions, f"{path.name}: move {public_functions} to adapters/"


def test_every_activity_and_workflow_handler_says_what_it_does():
    """Activities, workflow runs, signals, queries and updates carry a docstring (what, units, errors)."""
    import ast

    handlers = ("activity.defn", "workflow.run", "workflow.update", "workflow.signal", "workflow.query")
    missing = []
    for path in sorted([*(ROOT / "activities").glob("*.py"), *(ROOT / "workflows").glob("*.py")]):
        for cls in [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)]:
            for fn in cls.body:
                if (
                    isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
                    and any(ast.unparse(d).startswith(handlers) for d in fn.decorator_list)
                    and not ast.get_docstring(fn)
                ):
                    missing.append(f"{path.relative_to(ROOT)}: {cls.name}.{fn.name}")
    assert not missing, "\n".join(missing)
