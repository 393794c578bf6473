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
    # UNLOGGED tables come back empty from any restore (PostgreSQL does not WAL-log them).
    unlogged_tables: list[str] = []

    @property
    def corrupted(self) -> bool:
        return not self.server_reachable or bool(self.corrupted_tables) or bool(self.findings)


class SealRequest(_Msg):
    incident_id: IncidentId
    database: DatabaseName
    skip_tables: list[str] = []


class SealResult(_Msg):
    """What the damaged primary held when the runbook stopped it.

    `archived_through`/`end_lsn`: the last WAL segment it archived and the
    position just past it (the replay must reach it). `timeline`: production's
    timeline, which the recovery follows instead of the newest one in the
    archive. `fenced_databases`: databases whose connections the seal closed
    (`ALLOW_CONNECTIONS false`, replayed into the restore, reopened there).
    `sealed_by`: the incident whose run sealed it, when that was an earlier run.
    A primary found stopped (crashed): `end_lsn` is the end of the WAL in its
    own pg_wal (read with pg_waldump), `local_wal_dir` that pg_wal, which the
    replay reads after the archive, and `unarchived_wal` the complete segments
    it never archived (`.ready`); `wal_end_unknown` says why the end could not
    be read (then commits after the archive's end may be lost).
    `disabled_subscriptions`: logical-replication subscriptions the seal
    disabled (`database/name`), enabled again where production runs on.
    """

    was_running: bool
    archived_through: str | None = None
    row_counts: dict[str, int] = {}
    last_commit_at: Timestamp | None = None
    end_lsn: str | None = None
    timeline: int | None = None
    fenced_databases: list[str] = []
    unlogged_tables: list[str] = []
    sealed_by: str | None = None
    local_wal_dir: str | None = None
    unarchived_wal: list[str] = []
    wal_end_unknown: str | None = None
    disabled_subscriptions: list[str] = []


class ProductionState(_Msg):
    """What `reopen_production` found and did: whether production runs, in words for the operator."""

    running: bool
    detail: str


class TimelineBranch(_Msg):
    """One line of a timeline history file: `parent` was left for the next timeline at `switchpoint` (an LSN)."""

    parent: int
    switchpoint: str


class RestoreRequest(_Msg):
    incident_id: IncidentId
    purpose: Literal["restore", "side"] = "restore"  # a swap candidate, or a read-only side instance
    backup_id: str | None = None  # default: the newest completed backup on `timeline`'s history
    # Production's timeline: only backups on its history qualify. None: production's control file says.
    timeline: int | None = None


class Tablespace(_Msg):
    """A tablespace of the restored backup: production's `location`, and the fresh directory it was
    restored into (`restored_to`, beside it), which the swap moves to `location`."""

    name: str
    oid: int
    location: str
    restored_to: str


class RestoreResult(_Msg):
    restore_dir: str
    backup_id: str
    launches: int
    timeline: int | None = None  # the timeline the replay must follow (None: the newest in the archive)
    timeline_history: list[TimelineBranch] = []
    tablespaces: list[Tablespace] = []


class ReplayRequest(_Msg):
    incident_id: IncidentId
    restore_dir: str
    must_reach_segment: str | None = None  # the last WAL segment the sealed primary archived
    must_reach_lsn: str | None = None  # the position just past it: recovery must end at or after it
    # Side instance: stop just before this transaction commits and stay paused, read-only.
    target_xid: int | None = None
    timeline: int | None = None  # recovery_target_timeline; None: production's, from its control file
    reopen_databases: list[str] = []  # fenced by the seal: ALLOW_CONNECTIONS true again once promoted
    # A stopped primary's own pg_wal: its never-archived segments are archived first, and restore_command
    # falls back to it for what the archive lacks (its last, partly written segment). Read, never changed.
    local_wal_dir: str | None = None


class ReplayResult(_Msg):
    port: int
    timeline: int
    end_lsn: str
    last_commit_at: Timestamp | None = None
    followed_timeline: int | None = None  # the recovery_target_timeline it replayed along
    recovery_end_lsn: str | None = None  # where replay ended and the new timeline began


class VerifyRequest(_Msg):
    database: DatabaseName
    port: int
    baseline_row_counts: dict[str, int] = {}
    expected_row_counts: dict[str, int] = {}


class VerifyResult(_Msg):
    row_counts: dict[str, int]
    checks: list[str]
    # Empty after any restore by PostgreSQL's design (their changes are not WAL-logged): not compared.
    unlogged_tables: list[str] = []


class SwapRequest(_Msg):
    incident_id: IncidentId
    restore_dir: str
    tablespaces: list[Tablespace] = []  # swapped together with the data directory
    enable_subscriptions: list[str] = []  # `database/name` the seal disabled: enabled once it is production


class SwapResult(_Msg):
    data_dir: str
    damaged_dir: str
    enabled_subscriptions: list[str] = []


class TeardownRequest(_Msg):
    incident_id: IncidentId


class BackupRequest(_Msg):
    incident_id: IncidentId


class BackupResult(_Msg):
    backup_id: str
