"""Inputs and outputs of the PostgreSQL and backup activities."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

from models.identifiers import DatabaseName, IncidentId
from models.times import Timestamp


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True)


class AssessRequest(_Msg):
    database: DatabaseName


class Assessment(_Msg):
    database: str
    server_reachable: bool
    corrupted_tables: list[str] = []
    findings: list[str] = []
    checksum_failures: int = 0
    amcheck_available: bool = False

    @property
    def corrupted(self) -> bool:
        return not self.server_reachable or bool(self.corrupted_tables) or bool(self.findings)


class SealRequest(_Msg):
    incident_id: IncidentId
    database: DatabaseName
    skip_tables: list[str] = []


class SealResult(_Msg):
    was_running: bool
    archived_through: str | None = None
    row_counts: dict[str, int] = {}
    last_commit_at: Timestamp | None = None


class RestoreRequest(_Msg):
    incident_id: IncidentId
    purpose: Literal["restore", "side"] = "restore"  # a swap candidate, or a read-only side instance
    backup_id: str | None = None  # default: the newest completed backup


class RestoreResult(_Msg):
    restore_dir: str
    backup_id: str
    launches: int


class ReplayRequest(_Msg):
    incident_id: IncidentId
    restore_dir: str
    must_reach_segment: str | None = None  # the last WAL segment the sealed primary archived
    # Side instance: stop just before this transaction commits and stay paused, read-only.
    target_xid: int | None = None


class ReplayResult(_Msg):
    port: int
    timeline: int
    end_lsn: str
    last_commit_at: Timestamp | None = None


class VerifyRequest(_Msg):
    database: DatabaseName
    port: int
    baseline_row_counts: dict[str, int] = {}
    expected_row_counts: dict[str, int] = {}


class VerifyResult(_Msg):
    row_counts: dict[str, int]
    checks: list[str]


class SwapRequest(_Msg):
    incident_id: IncidentId
    restore_dir: str


class SwapResult(_Msg):
    data_dir: str
    damaged_dir: str


class TeardownRequest(_Msg):
    incident_id: IncidentId


class BackupRequest(_Msg):
    incident_id: IncidentId


class BackupResult(_Msg):
    backup_id: str
