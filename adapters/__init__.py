"""The code that talks to systems: PostgreSQL server control and SQL, barman-cloud command lines, the
process table, application platforms (local processes, Kubernetes), AWS, S3, Statuspage.

Used by the activities (which add Temporal's retries, heartbeats and error classification around
them), by the embedded stack and by the CLI; never imports `activities` or `workflows`.
"""
