"""The one description of every runbook: procedure name, workflow type, input model, workflow-ID rule and
how a starter labels it.

Read by the worker (its workflow list), the Incident (the child it starts and that child's ID), the
playbook's validation (procedures and alert rules name registered runbooks), `drp start`, `drp approve`,
the starter scripts and the demo. Adding a runbook: its models, workflow, activities and starter
modules, and one `RunbookSpec` in `RUNBOOKS` below.

Pure data (stdlib + the input models): workflow code imports it inside the sandbox, so it must not
import workflow or activity modules. The workflow class is named by its import path and loaded only
by the worker (`load()`); tests/test_runbooks.py checks each path against its workflow type.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models import db_corruption, deletion, failover, region
from models.inputs import RunbookInput


@dataclass(frozen=True)
class RunbookSpec:
    procedure: str  # the playbook's procedure name, the Procedure search attribute, `drp start NAME`
    workflow_type: str  # the name registered with Temporal (@workflow.defn(name=...)): never renamed
    workflow_class: str  # "module:Class", imported by the worker only
    input_model: type[RunbookInput]
    describe: Callable[[Any], str]  # the Web UI's summary of a run, from its input
    aliases: tuple[str, ...] = field(default=())  # older `drp start` names, still accepted

    def workflow_id(self, incident_id: str) -> str:
        """Business-key ID: one incident never runs the same runbook twice at once."""
        return f"{self.procedure}-{incident_id}"

    def summary(self, inp: RunbookInput) -> str:
        return f"{inp.severity.value} {self.describe(inp)} ({inp.incident_id})"

    def load(self) -> type:
        """The workflow class (imports the workflow module, and with it its activities)."""
        module, _, name = self.workflow_class.partition(":")
        return getattr(importlib.import_module(module), name)


RUNBOOKS: tuple[RunbookSpec, ...] = (
    RunbookSpec(
        db_corruption.PROCEDURE,
        "DatabaseCorruptionRecovery",
        "workflows.db_corruption:DatabaseCorruptionRecovery",
        db_corruption.DatabaseCorruptionInput,
        lambda i: f"database corruption recovery of {i.database}",
    ),
    RunbookSpec(
        deletion.PROCEDURE,
        "AccidentalDeletionRecovery",
        "workflows.accidental_deletion:AccidentalDeletionRecovery",
        deletion.AccidentalDeletionInput,
        lambda i: f"accidental deletion recovery in {i.database}",
        aliases=("deletion",),
    ),
    RunbookSpec(
        failover.PROCEDURE,
        "DatabaseFailover",
        "workflows.db_failover:DatabaseFailover",
        failover.DatabaseFailoverInput,
        lambda i: "database failover to the standby",
        aliases=("failover",),
    ),
    RunbookSpec(
        failover.FAILBACK,
        "DatabaseFailback",
        "workflows.db_failback:DatabaseFailback",
        failover.DatabaseFailbackInput,
        lambda i: "database failback to the original primary",
        aliases=("failback",),
    ),
    RunbookSpec(
        region.PROCEDURE,
        "RegionFailover",
        "workflows.region_failover:RegionFailover",
        region.RegionFailoverInput,
        lambda i: f"region failover to {i.backup_region}",
    ),
    RunbookSpec(
        region.FAILBACK,
        "RegionFailback",
        "workflows.region_failback:RegionFailback",
        region.RegionFailbackInput,
        lambda i: f"region failback from {i.serving_region}",
    ),
)

BY_PROCEDURE: dict[str, RunbookSpec] = {r.procedure: r for r in RUNBOOKS}
BY_NAME: dict[str, RunbookSpec] = {**{a: r for r in RUNBOOKS for a in r.aliases}, **BY_PROCEDURE}


class UnknownRunbook(KeyError):
    pass


def runbook(name: str) -> RunbookSpec:
    """The runbook a procedure name (or an older alias) names."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise UnknownRunbook(f"unknown procedure {name!r}: one of {', '.join(BY_PROCEDURE)}") from None
