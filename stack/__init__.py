"""The embedded local environment: Temporal, PostgreSQL with WAL archiving to
S3, the S3/AWS emulator, the demo application and a worker, on local ports with
all state under one folder."""
