"""Starting nats-server: a port someone else holds is named at once, never taken for ours."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from actors.store.server import EmbeddedServer, ServerExitedError, free_ports

REPO = Path(__file__).resolve().parents[2]


def test_a_port_held_by_another_process_is_named_not_taken_for_the_servers() -> None:
    """A connect to the port used to count as ready: another test's server on it made `start()` return,
    while ours logged `address already in use` and exited; a cluster then waited 30 s for a leader."""
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        server = EmbeddedServer(port=stranger.getsockname()[1])
        try:
            with pytest.raises(ServerExitedError) as err:
                server.start()
        finally:
            server.stop()
    assert err.value.port_in_use and "address already in use" in str(err.value)
    assert f"client port {server.port}" in str(err.value)


def test_ports_drawn_together_are_distinct() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64


def test_a_server_left_running_by_a_killed_owner_of_its_store_is_stopped_by_the_next_start(tmp_path: Path) -> None:
    # `bide dev` SIGKILLed leaves its nats-server running: the next `bide dev` failed with "address
    # already in use", after opening the same store beside it.
    store = tmp_path / "store"
    port = free_ports(1)[0]
    owner = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from actors.store.server import EmbeddedServer\n"
        f"s = EmbeddedServer(store_dir={str(store)!r}, port={port}).start()\n"
        "print(s.proc.pid, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert owner.stdout is not None
    orphan = int(owner.stdout.readline())
    owner.kill()  # SIGKILL: no cleanup
    owner.wait(10)
    assert Path(f"/proc/{orphan}").exists()  # still running, holding the port and the store
    server = EmbeddedServer(store_dir=store, port=port)
    try:
        server.start()
        assert server.proc is not None and server.proc.pid != orphan
        assert not Path(f"/proc/{orphan}").exists() or "zombie" in Path(f"/proc/{orphan}/status").read_text()
    finally:
        server.stop()
        if Path(f"/proc/{orphan}").exists():
            os.kill(orphan, signal.SIGKILL)
    assert not server.pid_file.exists()
