"""Payload encryption through a real Temporal dev server: what Temporal stores holds no plaintext of an
input field, `drp codec serve` gives it back to a caller with the token (and to nobody else), key
rotation keeps old histories readable, an unknown key id fails with one clear error, and a workflow
started before encryption was turned on finishes after it."""

import asyncio
import base64
import json
import subprocess
import uuid

import httpx
import pytest
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.client import WorkflowFailureError

from tests.deploy_helpers import (
    VENV_BIN,
    address,
    free_port,
    new_key,
    payloads_in,
    process,
    queue,
    raw_history,
    settings_env,
    wait_http,
    worker,
)
from tests.deploy_workflows import SecretEcho, SecretInput, SecretResult
from workers.codec import ENCODING, KEY_ID, EncryptionCodec, UnknownEncryptionKey
from workers.deploy_settings import EncryptionSettings
from workers.settings import TemporalSettings
from workers.temporal_client import connect

KEYS = {"key-a": new_key(), "key-b": new_key()}
TOKEN = f"codec-token-{uuid.uuid4().hex}"
UI = "http://localhost:8233"


def settings(raw_client, keys: dict[str, str] | None, current: str | None = None) -> TemporalSettings:
    encryption = EncryptionSettings(enabled=True, key_id=current, keys=keys) if keys else EncryptionSettings()
    return TemporalSettings(temporal_address=address(raw_client), encryption=encryption)


def marker() -> str:
    return f"MARKER-{uuid.uuid4().hex}"


async def run_echo(client, note: str, fail: bool = False, task_queue: str | None = None):
    task_queue = task_queue or queue()
    async with worker(client, task_queue):
        handle = await client.start_workflow(
            SecretEcho.run,
            SecretInput(note=note, fail=fail),
            id=f"secret-{uuid.uuid4().hex[:8]}",
            task_queue=task_queue,
        )
        try:
            await handle.result()
        except WorkflowFailureError:
            if not fail:
                raise
    return handle


def assert_no_plaintext(events, secret: str) -> None:
    raw = b"".join(e.SerializeToString() for e in events)
    assert secret.encode() not in raw, "the marker is stored in clear in Temporal's history"
    assert secret not in json.dumps([json_format.MessageToDict(e) for e in events])


@pytest.fixture(scope="module")
def codec_server(tmp_path_factory):
    """`drp codec serve` after a rotation: key-b current, key-a kept to read older histories."""
    tmp = tmp_path_factory.mktemp("codec")
    port = free_port()
    env = settings_env(
        tmp,
        DRP_CODEC_SERVER__PORT=str(port),
        DRP_CODEC_SERVER__BEARER_TOKEN=TOKEN,
        DRP_CODEC_SERVER__CORS_ORIGINS=json.dumps([UI]),
        DRP_ENCRYPTION__KEYS=json.dumps(KEYS),
        DRP_ENCRYPTION__KEY_ID="key-b",
        DRP_LOG_LEVEL="INFO",
    )
    log = tmp / "codec.log"
    with process([str(VENV_BIN / "drp"), "codec", "serve"], env, log) as proc:
        yield {"url": f"http://127.0.0.1:{port}", "proc": proc, "log": log}


async def post(codec_server, path: str, payloads: list[Payload], headers: dict | None = None) -> httpx.Response:
    await wait_http(f"{codec_server['url']}/-/healthy", codec_server["proc"], codec_server["log"])
    body = json_format.MessageToJson(Payloads(payloads=payloads))
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "X-Namespace": "default",
        "Origin": UI,
        "Content-Type": "application/json",
        **(headers if headers is not None else {}),
    }
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(
            codec_server["url"] + path, content=body, headers={k: v for k, v in headers.items() if v is not None}
        )


def decoded(response: httpx.Response) -> list[Payload]:
    assert response.status_code == 200, response.text
    return list(json_format.Parse(response.text, Payloads()).payloads)


async def test_history_holds_no_plaintext_and_the_codec_server_decodes_it(dev_server, codec_server):
    client = await connect(settings=settings(dev_server, {"key-a": KEYS["key-a"]}, "key-a"))
    secret, failing = marker(), marker()
    handle = await run_echo(client, secret)
    assert (await handle.result()).echoed == f"activity saw {secret}"
    failed = await run_echo(client, failing, fail=True)

    events = await raw_history(dev_server, handle.id)
    failed_events = await raw_history(dev_server, failed.id)
    assert_no_plaintext(events, secret)
    assert_no_plaintext(failed_events, failing)  # the failure's message is encrypted too
    stored = list(payloads_in_all(events))
    assert stored and {p.metadata["encoding"] for p in stored} == {ENCODING}
    assert {p.metadata[KEY_ID] for p in stored} == {b"key-a"}

    # The codec server (rotated since: key-b current, key-a kept) decodes that history for the Web UI.
    response = await post(codec_server, "/decode", stored + list(payloads_in_all(failed_events)))
    assert response.headers["Access-Control-Allow-Origin"] == UI
    plain = b"".join(p.data for p in decoded(response))
    assert secret.encode() in plain and b"activity saw " + secret.encode() in plain
    assert failing.encode() in plain
    assert all(p.metadata.get("encoding") != ENCODING for p in decoded(response))

    # /encode is /decode's inverse, with the current key.
    original = Payload(metadata={"encoding": b"json/plain"}, data=json.dumps({"note": secret}).encode())
    encoded = decoded(await post(codec_server, "/encode", [original]))
    assert encoded[0].metadata[KEY_ID] == b"key-b" and secret.encode() not in encoded[0].data
    assert decoded(await post(codec_server, "/decode", encoded)) == [original]


def payloads_in_all(events):
    for e in events:
        yield from payloads_in(e)


async def test_codec_server_refuses_callers_without_the_token(codec_server):
    sample = [Payload(metadata={"encoding": b"json/plain"}, data=b'"x"')]
    for headers in ({"Authorization": None}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = await post(codec_server, "/decode", sample, headers)
        assert response.status_code == 401, (headers, response.text)
        assert "Access-Control-Allow-Origin" in response.headers  # the Web UI can show why
    assert (await post(codec_server, "/decode", sample, {"X-Namespace": "someone-else"})).status_code == 403
    async with httpx.AsyncClient(timeout=30) as http:
        preflight = await http.options(
            f"{codec_server['url']}/decode",
            headers={
                "Origin": UI,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["Access-Control-Allow-Origin"] == UI
        assert "x-namespace" in preflight.headers["Access-Control-Allow-Headers"]
        assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]
        other = await http.options(
            f"{codec_server['url']}/decode",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "Access-Control-Allow-Origin" not in other.headers
    assert TOKEN not in codec_server["log"].read_text()
    assert all(k not in codec_server["log"].read_text() for k in KEYS.values())


async def test_rotation_keeps_old_histories_readable(dev_server, codec_server):
    old = await connect(settings=settings(dev_server, {"key-a": KEYS["key-a"]}, "key-a"))
    secret = marker()
    before = await run_echo(old, secret)

    rotated = await connect(settings=settings(dev_server, KEYS, "key-b"))
    result = await rotated.get_workflow_handle(before.id, result_type=SecretResult).result()
    assert result.echoed == f"activity saw {secret}"  # written with key-a, read after the rotation
    after = await run_echo(rotated, marker())
    assert {p.metadata[KEY_ID] for p in payloads_in_all(await raw_history(dev_server, after.id))} == {b"key-b"}


async def test_a_payload_under_an_unknown_key_fails_with_one_clear_error(dev_server, codec_server):
    writer = await connect(settings=settings(dev_server, {"key-c": new_key()}, "key-c"))
    handle = await run_echo(writer, marker())
    reader = await connect(settings=settings(dev_server, KEYS, "key-b"))
    with pytest.raises(UnknownEncryptionKey) as refused:
        await reader.get_workflow_handle(handle.id).result()
    assert str(refused.value).startswith(
        "payload encrypted with key id 'key-c', which this process does not have (it has: key-a, key-b)"
    )

    stored = list(payloads_in_all(await raw_history(dev_server, handle.id)))
    response = await post(codec_server, "/decode", stored)
    assert response.status_code == 400
    assert response.json() == {"error": str(refused.value)}

    # A payload relabelled with a known id does not decrypt under the wrong key: authentication fails.
    relabelled = Payload(metadata={"encoding": ENCODING, KEY_ID: b"key-a"}, data=stored[0].data)
    with pytest.raises(ValueError, match="does not authenticate"):
        EncryptionCodec(EncryptionSettings(enabled=True, key_id="key-b", keys=KEYS).key_bytes(), "key-b").decrypt(
            relabelled
        )


async def test_turning_encryption_on_does_not_break_a_running_workflow(dev_server):
    plain = await connect(settings=settings(dev_server, None))
    encrypted = await connect(settings=settings(dev_server, {"key-a": KEYS["key-a"]}, "key-a"))
    task_queue, before, after = queue(), marker(), marker()
    async with worker(plain, task_queue):
        handle = await plain.start_workflow(
            SecretEcho.run,
            SecretInput(note=before, wait_for_signal=True),
            id=f"secret-{uuid.uuid4().hex[:8]}",
            task_queue=task_queue,
        )
        assert await handle.query(SecretEcho.waiting)  # its first task ran on the unencrypted worker
    async with worker(encrypted, task_queue):
        await encrypted.get_workflow_handle(handle.id).signal(SecretEcho.release, after)
        result = await encrypted.get_workflow_handle(handle.id, result_type=SecretResult).result()
    assert result.echoed == f"activity saw {before} {after}"
    raw = b"".join(e.SerializeToString() for e in await raw_history(dev_server, handle.id))
    assert before.encode() in raw  # the input was written before encryption was on ...
    assert after.encode() not in raw  # ... the signal after it


async def test_drp_cli_encrypts_what_it_starts(dev_server, tmp_path):
    """`drp incident open` (the CLI path, settings from the environment) stores its input and its summary
    encrypted; the receiver and starters connect through the same connect()."""
    title, incident = marker(), f"INC-ENC-{uuid.uuid4().hex[:6]}"
    env = settings_env(
        tmp_path,
        DRP_TEMPORAL_ADDRESS=address(dev_server),
        DRP_TASK_QUEUE=queue(),
        DRP_ENCRYPTION__ENABLED="true",
        DRP_ENCRYPTION__KEY_ID="key-a",
        DRP_ENCRYPTION__KEYS=json.dumps({"key-a": KEYS["key-a"]}),
    )
    done = subprocess.run(
        [
            str(VENV_BIN / "drp"),
            "incident",
            "open",
            incident,
            "--title",
            title,
            "--severity",
            "P3",
            "--procedure",
            "none",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and f"opened {incident}" in done.stdout, done
    try:
        events = await raw_history(dev_server, incident)
        assert_no_plaintext(events, title)
        started = events[0].workflow_execution_started_event_attributes
        assert started.input.payloads[0].metadata[KEY_ID] == b"key-a"
        assert (
            title.encode()
            in EncryptionCodec({"key-a": base64.b64decode(KEYS["key-a"])}, "key-a")
            .decrypt(started.input.payloads[0])
            .data
        )
    finally:
        await dev_server.get_workflow_handle(incident).terminate("test ended")


async def test_a_worker_without_the_key_fails_the_workflow_task_naming_the_key_id(dev_server):
    writer = await connect(settings=settings(dev_server, {"key-c": new_key()}, "key-c"))
    reader_settings = settings(dev_server, KEYS, "key-b")
    reader = await connect(settings=reader_settings)
    task_queue = queue()
    handle = await writer.start_workflow(
        SecretEcho.run, SecretInput(note=marker()), id=f"secret-{uuid.uuid4().hex[:8]}", task_queue=task_queue
    )
    async with worker(reader, task_queue):
        failure = None
        async with asyncio.timeout(120):
            while failure is None:
                for event in await raw_history(dev_server, handle.id):
                    if event.HasField("workflow_task_failed_event_attributes"):
                        failure = event.workflow_task_failed_event_attributes.failure
                await asyncio.sleep(0.2)
    await handle.terminate("test ended")
    # The failure's message is itself encrypted (encode_failures): read it with the keys.
    assert failure.message == "Encoded failure" and failure.HasField("encoded_attributes")
    keys = EncryptionSettings(enabled=True, key_id="key-b", keys=KEYS).key_bytes()
    text = EncryptionCodec(keys, "key-b").decrypt(failure.encoded_attributes).data.decode()
    assert "payload encrypted with key id 'key-c', which this process does not have (it has: key-a, key-b)" in text, (
        text
    )
