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
-- The table as a (schema, name) pair; table_name is how PostgreSQL prints it (public."Orders").
-- Logs installed before these columns keep table_name as schema.name, unquoted, in their older rows.
ALTER TABLE public.audit_log ADD COLUMN IF NOT EXISTS schema_name text, ADD COLUMN IF NOT EXISTS relation_name text;
CREATE INDEX IF NOT EXISTS audit_log_deletes_idx ON public.audit_log ("timestamp") WHERE action = 'DELETE';

CREATE OR REPLACE FUNCTION public.audit_row_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO public.audit_log (table_name, schema_name, relation_name, action, row_data)
        VALUES (format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME), TG_TABLE_SCHEMA, TG_TABLE_NAME, 'DELETE',
                to_jsonb(OLD));
        RETURN OLD;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO public.audit_log (table_name, schema_name, relation_name, action, row_data, changed_fields)
        SELECT format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME), TG_TABLE_SCHEMA, TG_TABLE_NAME, 'UPDATE', to_jsonb(OLD),
               jsonb_object_agg(n.key, n.value)
        FROM jsonb_each(to_jsonb(NEW)) n
        WHERE to_jsonb(OLD) -> n.key IS DISTINCT FROM n.value;
        RETURN NEW;
    ELSE
        INSERT INTO public.audit_log (table_name, schema_name, relation_name, action, row_data)
        VALUES (format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME), TG_TABLE_SCHEMA, TG_TABLE_NAME, 'INSERT',
                to_jsonb(NEW));
        RETURN NEW;
    END IF;
END
$$;
REVOKE ALL ON public.audit_log FROM PUBLIC;
"""


def install_audit_log(conn: psycopg.Connection, tables: list[tuple[str, str]]) -> None:
    """Create the audit table and function, and an audit trigger on each (schema, table) (idempotent).
    On a partitioned table the trigger covers every partition, present and future."""
    conn.execute(AUDIT_SCHEMA_SQL)
    for schema, name in tables:
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE TRIGGER audit_row_change AFTER INSERT OR UPDATE OR DELETE "
                "ON {} FOR EACH ROW EXECUTE FUNCTION public.audit_row_change()"
            ).format(sql.Identifier(schema, name))
        )
