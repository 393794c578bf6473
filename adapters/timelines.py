"""PostgreSQL timelines and LSNs: which base backup lies on production's history.

A recovery must follow production's own timeline, not whatever is newest in the
archive (a restore abandoned elsewhere may have pushed a timeline there). The
rules here are PostgreSQL's: a timeline's history file (`0000000N.history`,
see the docs' "Timelines" section) lists each ancestor timeline with the LSN at
which the next one branched off; a base backup taken on timeline T can seed a
recovery to timeline N only if T is N or one of its ancestors and the backup
ended before T's branch point.
"""

import re

from models.postgres import TimelineBranch

_LSN = re.compile(r"\b([0-9A-F]{1,8}/[0-9A-F]{1,8})\b")
_MISSING_SEGMENT = re.compile(r'could not find file "([0-9A-F]{24})"')


def lsn_to_int(lsn: str) -> int:
    """'16/B374D848' -> the 64-bit WAL position. Raises ValueError on anything else."""
    high, _, low = lsn.strip().partition("/")
    if not low:
        raise ValueError(f"not an LSN: {lsn!r}")
    return (int(high, 16) << 32) | int(low, 16)


def parse_history(text: str) -> list[TimelineBranch]:
    """The branches of a timeline history file, oldest first (comments and blank lines skipped)."""
    branches = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2:
            branches.append(TimelineBranch(parent=int(fields[0]), switchpoint=fields[1]))
    return branches


def history_file_name(timeline: int) -> str:
    return f"{timeline:08X}.history"


def backup_on_history(backups: list[dict], timeline: int, history: list[TimelineBranch]) -> dict | None:
    """The newest completed backup from which WAL replay can reach `timeline`.

    `backups` are barman-cloud-backup-list's JSON entries (oldest first), each
    with `timeline` and `end_xlog`. A backup on an ancestor timeline qualifies
    only when it ended at or before that timeline's branch point.
    """
    ends = {b.parent: lsn_to_int(b.switchpoint) for b in history}
    for backup in reversed(backups):
        tli, end = backup.get("timeline"), backup.get("end_xlog")
        if tli is None or end is None:
            continue
        if tli == timeline or (tli in ends and lsn_to_int(end) <= ends[tli]):
            return backup
    return None


def diverged(
    standby_timeline: int, standby_lsn: str, primary_timeline: int, primary_history: list[TimelineBranch]
) -> bool:
    """True when a standby holds WAL the primary's history never had, so it can never follow it.

    A standby on the primary's timeline, or on an ancestor and not past the
    point where the primary's history left it, can follow (PostgreSQL switches
    timelines as it replays); any other position is a fork: pg_rewind or a new
    base backup is the only way back.
    """
    if standby_timeline == primary_timeline:
        return False
    ends = {b.parent: lsn_to_int(b.switchpoint) for b in primary_history}
    return standby_timeline not in ends or lsn_to_int(standby_lsn) > ends[standby_timeline]


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def waldump_end(stderr: str, segment_size: int) -> str | None:
    """Where the valid WAL ends, from the error pg_waldump stops with when it reads a pg_wal to its end.

    "could not find file "<segment>"": the WAL ran to the end of the segment before it (a SWITCH
    record, or a full segment), so it ends where that segment begins; "invalid record length at X",
    "unexpected pageaddr ... LSN X", "incorrect prev-link ... at X": it ends at X (the last LSN the
    message names), exactly where crash or archive recovery stops too. None when neither is there.
    """
    errors = [line for line in stderr.splitlines() if "error" in line]
    if not errors:
        return None
    missing = _MISSING_SEGMENT.search(errors[-1])
    if missing:
        name = missing.group(1)
        return int_to_lsn(int(name[8:16], 16) << 32 | int(name[16:24], 16) * segment_size)
    found = _LSN.findall(errors[-1])
    return found[-1] if found else None
