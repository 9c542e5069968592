"""The sync setting of the servers Bide starts, read back from the running server's own monitoring."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from actors.store.server import EmbeddedServer, SyncSetting, free_port
from tests.support import REPO


def jetstream_config(sync: SyncSetting | str | None) -> dict[str, Any]:
    """``/varz``'s JetStream configuration of a server started with ``sync``."""
    monitor = free_port()
    with EmbeddedServer(sync=sync, extra_args=["-m", str(monitor)]) as server:
        assert server.proc is not None
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=2) as resp:
                    config: dict[str, Any] = json.load(resp)["jetstream"]["config"]
                    return config
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_sync_always_is_what_the_server_runs_with() -> None:
    config = jetstream_config("always")
    assert config["sync_always"] is True


def test_sync_interval_and_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    config = jetstream_config(SyncSetting.parse("interval=30s"))
    assert config.get("sync_always") is not True and config["sync_interval"] == 30 * 10**9
    monkeypatch.delenv("BIDE_SYNC", raising=False)
    config = jetstream_config(None)  # nats-server's own default, stated explicitly
    assert config.get("sync_always") is not True and config["sync_interval"] == 120 * 10**9
    monkeypatch.setenv("BIDE_SYNC", "always")
    assert jetstream_config(None)["sync_always"] is True


def test_a_bad_sync_setting_names_what_is_expected(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"sync setting 'sometimes': expected 'always', 'interval' or "
                                         r"'interval=DURATION'"):
        EmbeddedServer(sync="sometimes")
    monkeypatch.setenv("BIDE_SYNC", "interval=0s")
    with pytest.raises(ValueError, match=r"BIDE_SYNC: sync setting 'interval=0s'"):
        EmbeddedServer()


def test_bide_dev_sync_always(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("BIDE_SYNC", None)
    bad = subprocess.run([sys.executable, "-m", "actors.apps.cli", "dev", "--sync", "often", "--port", str(free_port()),
                          "--store", str(tmp_path / "bad"), "--http-port", "0"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--sync: sync setting 'often'" in bad.stderr, bad.stderr
    store = tmp_path / "js"
    proc = subprocess.Popen([sys.executable, "-m", "actors.apps.cli", "dev", "--sync", "always", "--port",
                             str(free_port()), "--store", str(store), "--http-port", "0"],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline() for _ in range(2)]
        assert "JetStream at" in lines[0], lines
        assert lines[1].startswith("bide dev: sync always: a power loss loses nothing acknowledged"), lines
        # The file the server was started with (the tests above read such a server's /varz).
        assert "sync_interval: always" in (tmp_path / "nats-server.conf").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
