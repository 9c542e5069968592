"""Starting nats-server: a port someone else holds is named at once, never taken for ours."""

from __future__ import annotations

import socket

import pytest

from actors.store.server import EmbeddedServer, ServerExitedError, free_ports


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
