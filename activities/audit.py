"""The trigger-based audit log the deletion runbook reads (playbook 3.1, "Check audit logs").

`install_audit_log` is idempotent: `drp audit install` runs it on a database,
and the embedded stack runs it on the demo database. Every row change of the
audited tables is recorded with the old row (for DELETE and UPDATE), the
changed fields, the role and the transaction ID, so a deletion can be undone
exactly and point-in-time recovery can target the transaction that did it.
"""

import psycopg
from psycopg import sql

AUDIT_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS public.audit_log (
    id             bigserial PRIMARY KEY,
    table_name     text        NOT NULL,
    action         text        NOT NULL CHECK (action IN ('INSERT', 'UPDATE', 'DELETE')),
    row_data       jsonb       NOT NULL,
    changed_fields jsonb,
    role_name      text        NOT NULL DEFAULT session_user,
    txid           bigint      NOT NULL DEFAULT txid_current(),
    "timestamp"    timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS audit_log_deletes_idx ON public.audit_log ("timestamp") WHERE action = 'DELETE';

CREATE OR REPLACE FUNCTION public.audit_row_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO public.audit_log (table_name, action, row_data)
        VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'DELETE', to_jsonb(OLD));
        RETURN OLD;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO public.audit_log (table_name, action, row_data, changed_fields)
        SELECT TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'UPDATE', to_jsonb(OLD),
               jsonb_object_agg(n.key, n.value)
        FROM jsonb_each(to_jsonb(NEW)) n
        WHERE to_jsonb(OLD) -> n.key IS DISTINCT FROM n.value;
        RETURN NEW;
    ELSE
        INSERT INTO public.audit_log (table_name, action, row_data)
        VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'INSERT', to_jsonb(NEW));
        RETURN NEW;
    END IF;
END
$$;
REVOKE ALL ON public.audit_log FROM PUBLIC;
"""


def install_audit_log(conn: psycopg.Connection, tables: list[str]) -> None:
    """Create the audit table and function, and an audit trigger on each table (idempotent)."""
    conn.execute(AUDIT_SCHEMA_SQL)
    for table in tables:
        schema, name = table.split(".", 1) if "." in table else ("public", table)
        conn.execute(sql.SQL("CREATE OR REPLACE TRIGGER audit_row_change AFTER INSERT OR UPDATE OR DELETE "
                             "ON {}.{} FOR EACH ROW EXECUTE FUNCTION public.audit_row_change()")
                     .format(sql.Identifier(schema), sql.Identifier(name)))
