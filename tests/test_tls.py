"""TLS and mutual TLS over real gRPC on loopback, and ``arcsim certs``.

The coordinator runs in this process (``serve`` on port 0 with ``server_credentials`` from
arcsim.transport.certs); clients are the real worker service or raw ``CoordinatorStub`` calls without
``wait_for_ready``, so a refused handshake shows at once as UNAVAILABLE. Certificates come from
``make_certs`` (what ``arcsim certs`` writes); a second, unrelated testbed stands for a stranger.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from conftest import TEST_SECRET, auth, tiny_config, token
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from arcsim import cli
from arcsim.config import RunConfig
from arcsim.coordinator.service import CoordinatorSettings, serve
from arcsim.engine.inproc import run_inproc
from arcsim.transport import certs, wire
from arcsim.transport.certs import CertFiles, channel_credentials, make_certs, server_credentials
from arcsim.v1 import coordinator_pb2 as pb
from arcsim.workers.service import WorkerSettings, run_worker

torch.set_num_threads(1)

TLS_ENVS = (
    certs.SERVER_CERT_ENV,
    certs.SERVER_KEY_ENV,
    certs.CLIENT_CA_ENV,
    certs.CA_ENV,
    certs.CLIENT_CERT_ENV,
    certs.CLIENT_KEY_ENV,
    certs.SERVER_NAME_ENV,
    "ARCSIM_HEALTH_ADDRESS",
)


def _config(**changes: Any) -> RunConfig:
    return tiny_config(**{"num_honest": 2, **changes})


@pytest.fixture(autouse=True)
def _no_tls_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads $ARCSIM_TLS_*; what the test runner's environment holds must not leak in."""
    for name in TLS_ENVS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    """Another testbed's CA and certificates: valid, but not ours."""
    return make_certs(tmp_path_factory.mktemp("stranger"))


@dataclass
class Running:
    task: asyncio.Task
    out_dir: Path
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.task, timeout)


@contextlib.asynccontextmanager
async def _serving(
    config: RunConfig, out_dir: Path, credentials: grpc.ServerCredentials | None, *, host: str = "127.0.0.1"
) -> AsyncIterator[Running]:
    """A coordinator on a free loopback port, stopped on the way out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    task = asyncio.create_task(
        serve(
            CoordinatorSettings(
                config=config, out_dir=out_dir, secret=TEST_SECRET, host=host, port=0, server_credentials=credentials
            )
        )
    )
    endpoint = out_dir / "coordinator.json"
    try:
        while not endpoint.exists() and not task.done():
            await asyncio.sleep(0.01)
        if task.done():
            task.result()  # raise the coordinator's error
        yield Running(task, out_dir, host, json.loads(endpoint.read_text())["port"])
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


def _worker(
    running: Running, config: RunConfig, worker_id: int, credentials: grpc.ChannelCredentials | None, **changes: Any
) -> WorkerSettings:
    return WorkerSettings(
        **{
            "coordinator": running.address,
            "worker_id": worker_id,
            "device": "cpu",
            "token": token(worker_id),
            "max_retry_seconds": 10,
            "channel_credentials": credentials,
            **changes,
        }
    )


async def _join(
    address: str, credentials: grpc.ChannelCredentials | None, *, server_name: str | None = None
) -> grpc.StatusCode:
    """One Join, as a worker makes it; OK or the status it failed with."""
    options = [(certs.SERVER_NAME_OPTION, server_name)] if server_name else []
    channel = (
        grpc.aio.secure_channel(address, credentials, options)
        if credentials is not None
        else grpc.aio.insecure_channel(address, options)
    )
    async with channel:
        try:
            await wire.CoordinatorStub(channel).Join(
                pb.JoinRequest(worker_id=0, role=pb.HONEST), metadata=auth(0), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


# --- (a) a run over TLS --------------------------------------------------------------------------
async def test_a_run_over_tls_completes_and_gives_the_same_model(pki: CertFiles, tmp_path: Path) -> None:
    # Prepare: one worker by the IP address, one by the DNS name the certificate lists
    config = _config()
    trust = channel_credentials(pki.ca_cert)
    async with _serving(config, tmp_path / "tls", server_credentials(pki.server_cert, pki.server_key)) as running:
        # Execute
        clients = await asyncio.wait_for(
            asyncio.gather(
                run_worker(_worker(running, config, 0, trust)),
                run_worker(_worker(running, config, 1, trust, coordinator=f"localhost:{running.port}")),
            ),
            60,
        )
        summary = await running.finish()
    # Assert: TLS changes the transport, not the result
    assert clients == ["completed", "completed"]
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["final_params_sha256"] == run_inproc(config, tmp_path / "inproc")["final_params_sha256"]


async def test_a_worker_reaching_the_coordinator_by_another_address_checks_tls_server_name(
    pki: CertFiles, tmp_path: Path
) -> None:
    # Prepare: 127.0.0.2 (loopback on Linux) is in no certificate of the testbed
    config = _config(num_honest=1, rounds=1)
    trust = channel_credentials(pki.ca_cert)
    async with contextlib.AsyncExitStack() as stack:
        try:
            running = await stack.enter_async_context(
                _serving(
                    config, tmp_path / "tls", server_credentials(pki.server_cert, pki.server_key), host="127.0.0.2"
                )
            )
        except OSError as error:  # pragma: no cover - a loopback without 127.0.0.2 (not Linux)
            pytest.skip(f"127.0.0.2 is not a loopback address here: {error}")
        # Execute
        unnamed = await _join(running.address, trust)
        named = await _join(running.address, trust, server_name="coordinator")
        client = await asyncio.wait_for(
            run_worker(_worker(running, config, 0, trust, tls_server_name="coordinator", max_retry_seconds=0)), 60
        )
        summary = await running.finish()
    # Assert
    assert (unnamed, named) == (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK)
    assert client == "completed" and summary["status"] == "completed"


# --- (b) who cannot talk to a TLS coordinator ------------------------------------------------------
async def test_plaintext_and_untrusting_clients_are_refused(
    pki: CertFiles, stranger: CertFiles, tmp_path: Path
) -> None:
    async with _serving(_config(), tmp_path / "tls", server_credentials(pki.server_cert, pki.server_key)) as running:
        # Execute
        trusted = await _join(running.address, channel_credentials(pki.ca_cert))
        plaintext = await _join(running.address, None)
        other_ca = await _join(running.address, channel_credentials(stranger.ca_cert))
        wrong_name = await _join(running.address, channel_credentials(pki.ca_cert), server_name="elsewhere.example")
    # Assert
    assert trusted == grpc.StatusCode.OK
    assert (plaintext, other_ca, wrong_name) == (grpc.StatusCode.UNAVAILABLE,) * 3


async def test_a_tls_client_cannot_reach_a_plaintext_coordinator(pki: CertFiles, tmp_path: Path) -> None:
    async with _serving(_config(), tmp_path / "plain", None) as running:
        assert await _join(running.address, None) == grpc.StatusCode.OK
        assert await _join(running.address, channel_credentials(pki.ca_cert)) == grpc.StatusCode.UNAVAILABLE


# --- (c) mutual TLS -------------------------------------------------------------------------------
async def test_mutual_tls_lets_in_only_clients_with_a_testbed_certificate(
    pki: CertFiles, stranger: CertFiles, tmp_path: Path
) -> None:
    # Prepare
    config = _config(num_honest=1)
    mutual = server_credentials(pki.server_cert, pki.server_key, client_ca=pki.ca_cert)
    with_cert = channel_credentials(pki.ca_cert, cert=pki.client_cert, key=pki.client_key)
    async with _serving(config, tmp_path / "mtls", mutual) as running:
        # Execute: the refusals first (raw Joins), then the real worker with the client certificate
        no_cert = await _join(running.address, channel_credentials(pki.ca_cert))
        foreign_cert = await _join(
            running.address, channel_credentials(pki.ca_cert, cert=stranger.client_cert, key=stranger.client_key)
        )
        # the coordinator's own certificate is for serverAuth only: it does not pass as a client's
        server_cert = await _join(
            running.address, channel_credentials(pki.ca_cert, cert=pki.server_cert, key=pki.server_key)
        )
        client = await asyncio.wait_for(run_worker(_worker(running, config, 0, with_cert)), 60)
        summary = await running.finish()
    # Assert
    assert (no_cert, foreign_cert, server_cert) == (grpc.StatusCode.UNAVAILABLE,) * 3
    assert client == "completed" and summary["status"] == "completed"


# --- (d) arcsim certs -----------------------------------------------------------------------------
def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_command_writes_a_ca_and_certificates_for_the_requested_hosts(tmp_path: Path, capsys) -> None:
    # Execute
    code = cli.main(["certs", str(tmp_path / "pki"), "--host", "10.1.2.3", "--host", "Coordinator.Example.org"])
    # Assert: files and modes
    assert code == 0
    files = CertFiles.in_dir(tmp_path / "pki")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files.all()}
    assert modes == {
        "ca.pem": 0o644,
        "ca.key": 0o600,
        "server.pem": 0o644,
        "server.key": 0o600,
        "client.pem": 0o644,
        "client.key": 0o600,
    }
    assert "coordinator.example.org" in capsys.readouterr().out
    # the CA: self-signed, a CA, may sign only end certificates
    ca = _load(files.ca_cert)
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    # the server certificate: verified by a full path validation for every requested name
    server = _load(files.server_cert)
    alt = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt.get_values_for_type(x509.DNSName) == ["localhost", "coordinator", "coordinator.example.org"]
    assert alt.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
    ]
    policy = PolicyBuilder().store(Store([ca]))
    for name in (
        x509.DNSName("coordinator.example.org"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
    ):
        assert policy.build_server_verifier(name).verify(server, [])[-1] == ca
    with pytest.raises(x509.verification.VerificationError):
        policy.build_server_verifier(x509.DNSName("other.example.org")).verify(server, [])
    # the client certificate: clientAuth, signed by the CA; each key is its certificate's
    client = _load(files.client_cert)
    assert policy.build_client_verifier().verify(client, []).chain[-1] == ca
    assert client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    for cert_path, key_path in ((files.server_cert, files.server_key), (files.client_cert, files.client_key)):
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert key.public_key() == _load(cert_path).public_key()


def test_certs_command_never_overwrites_without_force(tmp_path: Path, capsys) -> None:
    # Prepare
    files = CertFiles.in_dir(tmp_path)
    assert cli.main(["certs", str(tmp_path)]) == 0
    before = {p: p.read_bytes() for p in files.all()}
    files.client_key.unlink()  # even one file left over is kept, and nothing is written
    capsys.readouterr()
    # Execute
    refused = cli.main(["certs", str(tmp_path)])
    error = capsys.readouterr().err
    kept = {p: p.read_bytes() for p in files.all() if p.exists()}
    forced = cli.main(["certs", str(tmp_path), "--force"])
    # Assert
    assert refused == 1 and error.startswith("arcsim: error: ") and "ca.pem" in error and "--force" in error
    assert error.count("\n") == 1
    assert kept == {p: b for p, b in before.items() if p != files.client_key}
    assert forced == 0 and files.ca_cert.read_bytes() != before[files.ca_cert]
    assert stat.S_IMODE(files.ca_key.stat().st_mode) == 0o600


@pytest.mark.parametrize("host", ["", "two words", "bad/slash", "trailing-.example", "é.example"])
def test_certs_command_rejects_a_host_that_is_no_name_or_address(tmp_path: Path, capsys, host: str) -> None:
    assert cli.main(["certs", str(tmp_path / "pki"), "--host", host]) == 2
    assert repr(host) in capsys.readouterr().err
    assert not (tmp_path / "pki").exists()


# --- loading credentials: one clear error per bad file ---------------------------------------------
def test_credentials_name_the_file_that_is_missing_or_wrong(
    pki: CertFiles, stranger: CertFiles, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError, match=f"TLS certificate not found: {tmp_path / 'nope.pem'}"):
        server_credentials(tmp_path / "nope.pem", pki.server_key)
    with pytest.raises(FileNotFoundError, match="CA certificate not found"):
        channel_credentials(tmp_path / "nope.pem")
    with pytest.raises(ValueError, match=f"{pki.server_key} holds no PEM certificate"):
        server_credentials(pki.server_key, pki.server_key)
    with pytest.raises(ValueError, match=f"{pki.server_cert} holds no PEM private key"):
        server_credentials(pki.server_cert, pki.server_cert)
    with pytest.raises(ValueError, match=f"{stranger.server_key} is not the key of the certificate"):
        server_credentials(pki.server_cert, stranger.server_key)
    with pytest.raises(ValueError, match=f"cannot read CA certificate {tmp_path}"):
        channel_credentials(tmp_path)
    with pytest.raises(ValueError, match="give both or neither"):
        channel_credentials(pki.ca_cert, cert=pki.client_cert)


def test_credentials_refuse_an_encrypted_key_and_an_expired_certificate(pki: CertFiles, tmp_path: Path) -> None:
    # Prepare
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
        )
    )
    old = make_certs(tmp_path / "old", now=dt.datetime(2001, 1, 1, tzinfo=dt.UTC))
    # Execute / Assert
    with pytest.raises(ValueError, match="is encrypted"):
        server_credentials(pki.server_cert, encrypted)
    with pytest.raises(ValueError, match=r"valid from 2000-12-31 23:00 to 2003-04-06 00:00 UTC, not now"):
        server_credentials(old.server_cert, old.server_key)


# --- (e) the CLI's TLS options --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["coordinator", "--tls-cert", "s.pem"], "--tls-cert and --tls-key go together"),
        (["coordinator", "--tls-key", "s.key"], "--tls-cert and --tls-key go together"),
        (["coordinator", "--tls-client-ca", "ca.pem"], "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"),
        (["worker", "--worker-id", "0", "--tls-ca", "ca.pem", "--tls-cert", "c.pem"], "--tls-cert and --tls-key go"),
        (
            ["worker", "--worker-id", "0", "--tls-cert", "c.pem", "--tls-key", "c.key"],
            "--tls-cert/--tls-key needs --tls-ca",
        ),
        (["adversary", "--worker-id", "2", "--tls-server-name", "coordinator"], "--tls-server-name needs --tls-ca"),
        (
            ["health", "--address", "127.0.0.1:1", "--tls-key", "c.key", "--tls-ca", "ca.pem"],
            "--tls-cert and --tls-key",
        ),
    ],
)
def test_cli_rejects_mismatched_tls_options_in_one_line(argv: list[str], message: str, monkeypatch, capsys) -> None:
    # Prepare: credentials for the worker commands, so only the TLS options are wrong
    monkeypatch.setenv("ARCSIM_SECRET", TEST_SECRET)
    if argv[0] == "coordinator":
        argv = [*argv, "--config", "configs/default.yaml", "--out", "unused"]
    elif argv[0] != "health":
        argv = [*argv, "--coordinator", "127.0.0.1:1"]
    # Execute
    code = cli.main(argv)
    # Assert
    error = capsys.readouterr().err
    assert code == 2 and error.startswith(f"arcsim: error: {message}") and error.count("\n") == 1


def test_cli_names_a_missing_certificate_file(tmp_path: Path, capsys) -> None:
    code = cli.main(
        [
            "coordinator",
            "--config",
            "configs/default.yaml",
            "--out",
            str(tmp_path / "out"),
            "--tls-cert",
            str(tmp_path / "server.pem"),
            "--tls-key",
            str(tmp_path / "server.key"),
        ]
    )
    assert code == 1
    assert capsys.readouterr().err == f"arcsim: error: TLS certificate not found: {tmp_path / 'server.pem'}\n"
    assert not (tmp_path / "out").exists()


def test_cli_takes_tls_options_from_the_environment(pki: CertFiles, monkeypatch, capsys) -> None:
    # Prepare: only the key of the pair in the environment
    monkeypatch.setenv(certs.CA_ENV, str(pki.ca_cert))
    monkeypatch.setenv(certs.CLIENT_KEY_ENV, str(pki.client_key))
    # Execute
    code = cli.main(["health", "--address", "127.0.0.1:1"])
    # Assert: the environment counted, and the message says which variables
    assert code == 2 and "$ARCSIM_TLS_CLIENT_CERT and $ARCSIM_TLS_CLIENT_KEY" in capsys.readouterr().err


# --- (f) arcsim health against a TLS coordinator ---------------------------------------------------
async def test_health_command_checks_a_mutual_tls_coordinator(
    pki: CertFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    mutual = server_credentials(pki.server_cert, pki.server_key, client_ca=pki.ca_cert)
    client = ["--tls-ca", str(pki.ca_cert), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]

    async def health(*argv: str) -> int:  # `arcsim health` blocks: a thread, while this loop serves
        return await asyncio.to_thread(cli.main, ["health", "--timeout", "5", *argv])

    async with _serving(_config(), tmp_path / "mtls", mutual) as running:
        address = ["--address", running.address]
        # Execute
        serving = await health(*address, *client)
        renamed = await health("--address", f"localhost:{running.port}", *client, "--tls-server-name", "coordinator")
        plaintext = await health(*address)
        no_client_cert = await health(*address, "--tls-ca", str(pki.ca_cert))
        wrong_name = await health(*address, *client, "--tls-server-name", "elsewhere.example")
        # what a container's health check runs: everything from the environment
        monkeypatch.setenv("ARCSIM_HEALTH_ADDRESS", running.address)
        monkeypatch.setenv(certs.CA_ENV, str(pki.ca_cert))
        monkeypatch.setenv(certs.CLIENT_CERT_ENV, str(pki.client_cert))
        monkeypatch.setenv(certs.CLIENT_KEY_ENV, str(pki.client_key))
        from_environment = await health()
    # Assert
    assert (serving, renamed, from_environment) == (0, 0, 0)
    assert (plaintext, no_client_cert, wrong_name) == (1, 1, 1)
