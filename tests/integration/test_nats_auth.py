"""NATS credentials and TLS, against real nats-server processes that require them.

Every Bide process (worker, client, CLI, HTTP API) connects through one function with the
settings of ``BIDE_NATS_*``; a refusal names the URL with its secrets hidden.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nkeys
import pytest
import trustme

from actors.store.jetstream import NatsUnavailableError
from actors.store.server import EmbeddedServer
from sdk import Bide, DurableContext, EmptyModel
from tests.support import running_worker

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "pw-s3cret-9f2"
TOKEN = "tok-s3cret-7c1"


def clear_nats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("BIDE_NATS_") and name != "BIDE_NATS_URL":
            monkeypatch.delenv(name)


@pytest.fixture
def server_with(tmp_path: Path) -> Iterator[Any]:
    servers: list[EmbeddedServer] = []

    def start(config: str) -> EmbeddedServer:
        server = EmbeddedServer(store_dir=tmp_path / f"js{len(servers)}", config=config).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


def define(bide: Bide) -> Any:
    def double(n: int) -> int:
        return n * 2

    @bide.durable_task(name="AuthDouble")
    async def auth_double(input: EmptyModel, ctx: DurableContext) -> int:
        return await ctx.memo(double, 21)

    return auth_double


async def runs_a_task(url: str) -> None:
    bide = Bide(url, ack_wait=3.0)
    try:
        task = define(bide)
        async with running_worker(bide, [task]):
            assert await task.aio_run(EmptyModel(), timeout=20) == 42
    finally:
        await bide.aclose()


async def refused(url: str) -> str:
    bide = Bide(url, ack_wait=3.0)
    try:
        with pytest.raises(NatsUnavailableError) as err:
            await bide._pool.get()
        return str(err.value)
    finally:
        await bide.aclose()


async def test_user_and_password_from_the_environment_and_a_refusal_that_hides_the_password(
        server_with: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    clear_nats_env(monkeypatch)
    server = server_with(f'authorization {{ user: bide, password: "{PASSWORD}" }}')
    monkeypatch.setenv("BIDE_NATS_USER", "bide")
    monkeypatch.setenv("BIDE_NATS_PASSWORD", PASSWORD)
    await runs_a_task(server.url)

    monkeypatch.setenv("BIDE_NATS_PASSWORD", PASSWORD + "-wrong")
    message = await refused(server.url)
    assert "credentials" in message and PASSWORD not in message
    # The command line takes the user as a flag and the password from the environment only.
    env = {**os.environ, "BIDE_NATS_URL": server.url, "BIDE_NATS_PASSWORD": PASSWORD, "PYTHONPATH": str(REPO)}
    env.pop("BIDE_NATS_USER")
    cli = [sys.executable, "-m", "actors.apps.cli", "--nats-user", "bide", "status"]
    ok = await asyncio.to_thread(subprocess.run, cli, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    env["BIDE_NATS_PASSWORD"] = PASSWORD + "-wrong"
    bad = await asyncio.to_thread(subprocess.run, cli, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "credentials" in bad.stderr and PASSWORD not in bad.stderr + bad.stdout
    # The same in a URL (as a user may paste it): the error shows the user, never the password.
    clear_nats_env(monkeypatch)
    in_url = server.url.replace("nats://", f"nats://bide:{PASSWORD}-wrong@")
    message = await refused(in_url)
    assert PASSWORD not in message and "bide:***@127.0.0.1" in message


async def test_a_token_from_the_environment(server_with: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    clear_nats_env(monkeypatch)
    server = server_with(f'authorization {{ token: "{TOKEN}" }}')
    monkeypatch.setenv("BIDE_NATS_TOKEN", TOKEN)
    await runs_a_task(server.url)
    monkeypatch.delenv("BIDE_NATS_TOKEN")
    message = await refused(server.url)
    assert TOKEN not in message and "credentials" in message


async def test_an_nkey_seed_file(server_with: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_nats_env(monkeypatch)
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    server = server_with(f"authorization {{ users = [ {{ nkey: {public} }} ] }}")
    monkeypatch.setenv("BIDE_NATS_NKEY", str(seed_file))
    await runs_a_task(server.url)


async def test_tls_and_mutual_tls_with_certificates_made_here(
        server_with: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clear_nats_env(monkeypatch)
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("bide-worker@example.test")
    paths = {name: tmp_path / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
    ca.cert_pem.write_to_path(str(paths["ca.pem"]))
    server_cert.cert_chain_pems[0].write_to_path(str(paths["server.pem"]))
    server_cert.private_key_pem.write_to_path(str(paths["server.key"]))
    client_cert.cert_chain_pems[0].write_to_path(str(paths["client.pem"]))
    client_cert.private_key_pem.write_to_path(str(paths["client.key"]))
    server = server_with(
        f'tls {{ cert_file: "{paths["server.pem"]}", key_file: "{paths["server.key"]}", '
        f'ca_file: "{paths["ca.pem"]}", verify: true }}')
    monkeypatch.setenv("BIDE_NATS_TLS_CA", str(paths["ca.pem"]))
    monkeypatch.setenv("BIDE_NATS_TLS_CERT", str(paths["client.pem"]))
    monkeypatch.setenv("BIDE_NATS_TLS_KEY", str(paths["client.key"]))
    await runs_a_task(server.url)
    # Without a client certificate the server (verify: true) refuses the connection.
    monkeypatch.delenv("BIDE_NATS_TLS_CERT")
    monkeypatch.delenv("BIDE_NATS_TLS_KEY")
    await refused(server.url)


def test_bad_settings_are_refused_by_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sdk.config import NatsAuth, redact_url

    clear_nats_env(monkeypatch)
    monkeypatch.setenv("BIDE_NATS_USER", "a")
    monkeypatch.setenv("BIDE_NATS_TOKEN", "t")
    with pytest.raises(ValueError, match="BIDE_NATS_USER and BIDE_NATS_TOKEN are both set"):
        NatsAuth.from_env()
    clear_nats_env(monkeypatch)
    monkeypatch.setenv("BIDE_NATS_PASSWORD", "p")
    with pytest.raises(ValueError, match="BIDE_NATS_PASSWORD is set without BIDE_NATS_USER"):
        NatsAuth.from_env()
    clear_nats_env(monkeypatch)
    monkeypatch.setenv("BIDE_NATS_TLS_CERT", str(tmp_path / "c.pem"))
    with pytest.raises(ValueError, match="BIDE_NATS_TLS_CERT and BIDE_NATS_TLS_KEY go together"):
        NatsAuth.from_env()
    monkeypatch.setenv("BIDE_NATS_TLS_KEY", str(tmp_path / "c.key"))
    with pytest.raises(ValueError, match="no such file"):
        NatsAuth.from_env()
    assert "p4ss" not in repr(NatsAuth(user="u", password="p4ss"))
    assert redact_url("nats://u:p4ss@h:4222,nats://tok3n@h2:4222,nats://h3:4222") == (
        "nats://u:***@h:4222,nats://***@h2:4222,nats://h3:4222")
