"""Replay safety: the recorded histories of every workflow type still replay on today's code.

`tests/histories/<WorkflowType>/<workflow ID>.json` were recorded from the end-to-end tests of
the released code (`DRP_RECORD_HISTORIES=1 bash scripts/test.sh`, see CONTRIBUTING.md). A change
that alters the commands a running workflow already issued (an activity added, removed or
reordered, a timer moved, a child started differently) fails here with the workflow ID and the
mismatch; put it behind `workflow.patched("<id>")` instead.
"""

import os
import re
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from workers.logging import LoggingInterceptor
from workers.main import WORKFLOWS, workflow_runner
from workers.metrics import RunbookMetricsInterceptor
from workers.temporal_client import data_converter

HISTORIES = Path(__file__).resolve().parent / "histories"
# Workflow IDs become file names as they are: an ID outside this alphabet is not recorded.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def history_path(workflow_type: str, workflow_id: str) -> Path:
    """Where a run's history is kept; a second run with the same ID gets `~2`, `~3`, ..."""
    if not _SAFE_ID.fullmatch(workflow_id) or not _SAFE_ID.fullmatch(workflow_type):
        raise ValueError(f"cannot name a history file after {workflow_type}/{workflow_id}")
    path, n = HISTORIES / workflow_type / f"{workflow_id}.json", 1
    while path.exists():
        n += 1
        path = HISTORIES / workflow_type / f"{workflow_id}~{n}.json"
    return path


pytestmark = pytest.mark.skipif(
    os.environ.get("DRP_RECORD_HISTORIES") in ("1", "add"), reason="this session records the histories anew"
)


def recorded() -> list[tuple[str, Path]]:
    """(workflow type, file) of every recorded history."""
    return [(p.parent.name, p) for p in sorted(HISTORIES.glob("*/*.json"))]


def load(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(path.stem.split("~")[0], path.read_text())


def replayer() -> Replayer:
    """The worker's own workflows, sandbox, data converter and interceptors."""
    return Replayer(
        workflows=WORKFLOWS,
        workflow_runner=workflow_runner(),
        data_converter=data_converter,
        interceptors=[LoggingInterceptor(), RunbookMetricsInterceptor()],
    )


def test_every_workflow_type_has_recorded_histories():
    types = {t for t, _ in recorded()}
    assert types >= {w.__temporal_workflow_definition.name for w in WORKFLOWS}, (
        "record histories of every workflow type: DRP_RECORD_HISTORIES=1 bash scripts/test.sh"
    )


async def test_recorded_histories_replay_on_the_current_code():
    histories = {p: load(p) for _, p in recorded()}
    files = {h.run_id: p.relative_to(HISTORIES) for p, h in histories.items()}

    async def each():
        for history in histories.values():
            yield history

    results = await replayer().replay_workflows(each(), raise_on_replay_failure=False)
    failures = [
        f"{files[run_id]}: {type(err).__name__}: {_reason(err)}" for run_id, err in results.replay_failures.items()
    ]
    assert not failures, "recorded runs that no longer replay (see CONTRIBUTING.md):\n" + "\n".join(failures)


def _reason(err: Exception) -> str:
    """The SDK's nondeterminism message ("[TMPRL1100] ... does not match ..."), without the wrapping."""
    found = re.search(r"\[TMPRL\d+\][^\"]*", str(err))
    return found.group(0) if found else str(err)
