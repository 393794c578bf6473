"""Every ApplicationError `type` the project raises, in one enum; the non-retryable list is derived from it.

A retry policy names the error types it must not retry (`workflows/_options.py` passes
`NON_RETRYABLE`); a type spelled differently at its raise site would silently be retried for hours.
So raise sites, retry policies and tests all spell a type as `ErrorKind.X`, and a new kind is
non-retryable unless it is listed in `RETRYABLE`.

Stdlib only: workflows, activities, adapters, the CLI and the tests import it.
"""

from enum import StrEnum


class ErrorKind(StrEnum):
    """ApplicationError types; each member's value is its name, which is what Temporal records."""

    # --- retrying cannot fix these: an operator's mistake, a missing setting, a state to look at --
    AmbiguousTable = "AmbiguousTable"
    BadDestination = "BadDestination"
    ChannelNotConfigured = "ChannelNotConfigured"
    ChannelRejected = "ChannelRejected"
    DnsChangeRejected = "DnsChangeRejected"
    FailbackNotSupported = "FailbackNotSupported"
    FailoverNotConfigured = "FailoverNotConfigured"
    KubernetesForbidden = "KubernetesForbidden"
    KubernetesNotFound = "KubernetesNotFound"
    NoAuditLog = "NoAuditLog"
    NoBackup = "NoBackup"
    NoBackupBeforeTarget = "NoBackupBeforeTarget"
    NoBackupOnTimeline = "NoBackupOnTimeline"
    NoCommitTimestamps = "NoCommitTimestamps"
    NoDeletionsFound = "NoDeletionsFound"
    NoPrimaryKey = "NoPrimaryKey"
    NoRedis = "NoRedis"
    NoStandby = "NoStandby"
    NoWriteCheck = "NoWriteCheck"
    NothingToReplay = "NothingToReplay"
    PermissionDenied = "PermissionDenied"
    PrimaryHealthy = "PrimaryHealthy"
    PrimaryRunning = "PrimaryRunning"
    RecordOutsideZone = "RecordOutsideZone"
    ReinsertIncomplete = "ReinsertIncomplete"
    ReplayFailed = "ReplayFailed"
    ReplayIncomplete = "ReplayIncomplete"
    ReplicaLagging = "ReplicaLagging"
    SqlRefused = "SqlRefused"
    StandbyDiverged = "StandbyDiverged"
    StandbyLagging = "StandbyLagging"
    StandbyPromoted = "StandbyPromoted"
    SwapConflict = "SwapConflict"
    TablespaceNotInBackup = "TablespaceNotInBackup"
    TimelineHistoryMissing = "TimelineHistoryMissing"
    UndefinedColumn = "UndefinedColumn"
    UndefinedTable = "UndefinedTable"
    UnknownChannel = "UnknownChannel"
    UnknownDatabase = "UnknownDatabase"
    UnknownHostedZone = "UnknownHostedZone"
    UnknownProcedure = "UnknownProcedure"
    UnknownRegion = "UnknownRegion"
    UnknownReplica = "UnknownReplica"
    UnknownRole = "UnknownRole"
    UnknownTable = "UnknownTable"
    ValidationError = "ValidationError"
    VerificationFailed = "VerificationFailed"
    WrongServer = "WrongServer"

    # --- raised by workflows and update handlers (refusals, timeouts, the run's own failure) ---------
    AlreadyAcknowledged = "AlreadyAcknowledged"
    AlreadyDecided = "AlreadyDecided"
    AlreadyResolved = "AlreadyResolved"
    ApprovalRejected = "ApprovalRejected"
    ApprovalTimeout = "ApprovalTimeout"
    DatabaseBusy = "DatabaseBusy"
    FailoverHalted = "FailoverHalted"
    NotOnRoster = "NotOnRoster"
    NothingToApprove = "NothingToApprove"
    NothingToChange = "NothingToChange"
    RunbookRunning = "RunbookRunning"
    WorkflowIdMismatch = "WorkflowIdMismatch"

    # --- transient: a retry (after a backoff) may succeed ---------------------------------------------
    AppUnhealthy = "AppUnhealthy"  # the application did not answer healthy yet
    ArchiveLagging = "ArchiveLagging"  # WAL not archived yet
    ArchiveUnreachable = "ArchiveUnreachable"  # the WAL archive could not be read
    BackupFailed = "BackupFailed"  # barman-cloud-backup failed
    FenceIncomplete = "FenceIncomplete"  # sessions did not end in time
    KubernetesTimeout = "KubernetesTimeout"  # pods did not reach the state in time
    NotReady = "NotReady"  # the incident is still opening (an update validator: the caller tries again)
    PromoteSlow = "PromoteSlow"  # a promotion not finished yet
    RegionUnhealthy = "RegionUnhealthy"  # a region not healthy yet
    RejoinFailed = "RejoinFailed"  # a rejoin that may succeed on a retry
    RestoreFailed = "RestoreFailed"  # barman-cloud-restore failed
    StandbyUnreachable = "StandbyUnreachable"  # the standby did not answer


RETRYABLE: frozenset[ErrorKind] = frozenset(
    {
        ErrorKind.AppUnhealthy,
        ErrorKind.ArchiveLagging,
        ErrorKind.ArchiveUnreachable,
        ErrorKind.BackupFailed,
        ErrorKind.FenceIncomplete,
        ErrorKind.KubernetesTimeout,
        ErrorKind.NotReady,
        ErrorKind.PromoteSlow,
        ErrorKind.RegionUnhealthy,
        ErrorKind.RejoinFailed,
        ErrorKind.RestoreFailed,
        ErrorKind.RunbookRunning,  # resolving an incident whose runbook will finish
        ErrorKind.StandbyUnreachable,
    }
)

# What every retry policy refuses to retry: all kinds but the transient ones.
NON_RETRYABLE: list[str] = [kind.value for kind in ErrorKind if kind not in RETRYABLE]
