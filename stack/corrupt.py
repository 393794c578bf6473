"""Corrupt a table's data file on disk, for real, for drills and tests.

The server is stopped cleanly, bytes in the middle of the table's first heap
page are overwritten (so the page checksum no longer matches), and the server
is started again: the next read of that page fails with "invalid page", and
pg_amcheck, pg_dump and pg_stat_database.checksum_failures all see it.
"""

from adapters.pgserver import PgServer


def corrupt_table(server: PgServer, database: str, table: str) -> str:
    """Damage the first page of `table`; returns the relation file that was damaged."""
    with server.connect(database) as conn:
        relpath = conn.execute("SELECT pg_relation_filepath(%s::regclass)", (table,)).fetchone()[0]
        conn.execute("CHECKPOINT")
    path = server.data_dir / relpath
    server.stop()
    with open(path, "r+b") as f:
        f.seek(4096)  # inside block 0, past the page header and line pointers
        f.write(b"\xde\xad\xbe\xef" * 64)
    server.start()
    server.wait_ready()
    return str(path)
