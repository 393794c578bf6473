"""Temporal Cloud / secured clusters: the TLS and API-key settings every process connects with
(temporal_client.connect), a certificate without its key refused in one line, and an API key that
never reaches `drp`'s output or logs."""

import datetime
import subprocess
import uuid

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from temporalio.service import TLSConfig

from tests.deploy_helpers import VENV_BIN, address, settings_env
from workers.settings import ReceiverSettings, TemporalSettings
from workers.temporal_client import connect, connect_options


def certificate(tmp_path, name: str) -> tuple:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_and_api_key_options_come_from_settings(tmp_path, monkeypatch):
    cert, key = certificate(tmp_path, "worker")
    ca, _ = certificate(tmp_path, "ca")
    monkeypatch.setenv("DRP_TEMPORAL_ADDRESS", "prod.a1b2c.tmprl.cloud:7233")
    monkeypatch.setenv("DRP_TEMPORAL_NAMESPACE", "prod.a1b2c")
    monkeypatch.setenv("DRP_TEMPORAL_TLS__CLIENT_CERT", str(cert))
    monkeypatch.setenv("DRP_TEMPORAL_TLS__CLIENT_KEY", str(key))
    monkeypatch.setenv("DRP_TEMPORAL_TLS__SERVER_CA_CERT", str(ca))
    monkeypatch.setenv("DRP_TEMPORAL_TLS__SERVER_NAME", "temporal.internal.example")
    for settings in (TemporalSettings(), ReceiverSettings()):  # the CLI's and the receiver's settings alike
        options = connect_options(settings)
        assert options["namespace"] == "prod.a1b2c"
        assert options["tls"] == TLSConfig(
            server_root_ca_cert=ca.read_bytes(),
            domain="temporal.internal.example",
            client_cert=cert.read_bytes(),
            client_private_key=key.read_bytes(),
        )
        assert options["api_key"] is None

    monkeypatch.delenv("DRP_TEMPORAL_TLS__CLIENT_CERT")
    monkeypatch.delenv("DRP_TEMPORAL_TLS__CLIENT_KEY")
    monkeypatch.delenv("DRP_TEMPORAL_TLS__SERVER_CA_CERT")
    monkeypatch.delenv("DRP_TEMPORAL_TLS__SERVER_NAME")
    monkeypatch.setenv("DRP_TEMPORAL_API_KEY", "an-api-key")
    options = connect_options(TemporalSettings())
    assert options["api_key"] == "an-api-key" and options["tls"] is None  # the SDK turns TLS on for an API key
    assert "an-api-key" not in repr(TemporalSettings())
    monkeypatch.setenv("DRP_TEMPORAL_TLS__ENABLED", "false")  # an API key to a plaintext proxy (or this test)
    assert connect_options(TemporalSettings())["tls"] is False


def run_drp(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "drp"), *args], env=env, capture_output=True, text=True, timeout=120)


def test_a_certificate_without_its_key_is_refused_in_one_line(tmp_path):
    cert, _ = certificate(tmp_path, "worker")
    env = settings_env(tmp_path, DRP_TEMPORAL_TLS__CLIENT_CERT=str(cert))
    done = run_drp(["approve", "INC-1", "--by", "alice", "--reason", "r"], env)
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1, done.stderr
    assert "temporal_tls.client_cert is set but temporal_tls.client_key is not" in done.stderr
    assert "DRP_TEMPORAL_TLS__CLIENT_KEY" in done.stderr


async def test_an_api_key_is_never_printed(dev_server, tmp_path):
    secret = f"api-key-{uuid.uuid4().hex}"
    base = settings_env(tmp_path, DRP_TEMPORAL_ADDRESS=address(dev_server), DRP_TEMPORAL_API_KEY=secret)
    worker = {
        "DRP_POSTGRES__DATA_DIR": str(tmp_path / "pg"),
        "DRP_PLATFORM__KIND": "local",
        "DRP_PLATFORM__LOCAL__APP_SPEC": str(tmp_path / "app.json"),
        "DRP_APP__HEALTH_URL": "http://127.0.0.1:9/health",
        "DRP_APP__CRITICAL_URL": "http://127.0.0.1:9/api",
    }
    # TLS (on with an API key) against the plaintext dev server: every command fails to connect ...
    for args, extra in (
        (["approve", "INC-1", "--by", "alice", "--reason", "r"], {}),
        (["incident", "status", "INC-1"], {}),
        (["worker"], worker),
        (["alerts", "serve"], {"DRP_ALERTS__BEARER_TOKEN": "t", "DRP_ALERTS__PORT": "0"}),
    ):
        for debug in ({}, {"DRP_DEBUG": "1"}):
            done = run_drp(args, {**base, **extra, **debug})
            assert done.returncode != 0, (args, done)
            assert secret not in done.stdout + done.stderr, (args, debug, done.stderr)
    # ... and without TLS the key is sent (the dev server ignores it) and the command works as usual.
    done = run_drp(
        ["approve", "INC-1", "--by", "alice", "--reason", "r"], {**base, "DRP_TEMPORAL_TLS__ENABLED": "false"}
    )
    assert done.returncode == 2 and "no recovery run found for incident 'INC-1'" in done.stderr, done
    assert secret not in done.stdout + done.stderr
    client = await connect(
        settings=TemporalSettings(
            temporal_address=address(dev_server), temporal_api_key=secret, temporal_tls={"enabled": False}
        )
    )
    assert (
        await client.workflow_service.get_system_info(
            __import__("temporalio.api.workflowservice.v1", fromlist=["x"]).GetSystemInfoRequest()
        )
    ).server_version


def test_an_unreadable_certificate_is_named(tmp_path):
    cert, key = certificate(tmp_path, "worker")
    env = settings_env(
        tmp_path, DRP_TEMPORAL_TLS__CLIENT_CERT=str(cert), DRP_TEMPORAL_TLS__CLIENT_KEY=str(tmp_path / "missing.key")
    )
    done = run_drp(["approve", "INC-1", "--by", "alice", "--reason", "r"], env)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done
    assert f"temporal_tls.client_key: cannot read {tmp_path / 'missing.key'}: No such file or directory" in done.stderr
