"""What the chaos harness kills: nats-server nodes (one, or a 3-node R3 cluster) and host processes.

Everything here is a real process on loopback, started on free ports with temporary stores and
killed with SIGKILL, as a crash would.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from actors.store.server import EmbeddedServer, free_port, local_cluster

REPO = Path(__file__).resolve().parent.parent
# The router says when a process becomes its owner and when it loses that (actors/hosting/router.py).
_OWNER_RE = re.compile(r"router owner|owns? (router )?partition", re.IGNORECASE)
_LOST_RE = re.compile(r"ownership moved|lost (router )?partition", re.IGNORECASE)


class Servers:
    """One nats-server, or three in a cluster; each node keeps its port and store across restarts."""

    def __init__(self, workdir: Path, cluster: bool) -> None:
        self.cluster = cluster
        n = 3 if cluster else 1
        self.monitor_ports = [free_port() for _ in range(n)]
        self.nodes: list[EmbeddedServer] = (
            local_cluster(3, workdir, name="bide-chaos", monitor_ports=self.monitor_ports) if cluster else
            [EmbeddedServer(store_dir=workdir / "js-n0", server_name="n0",
                            extra_args=["-m", str(self.monitor_ports[0])], log_file=workdir / "nats-n0.log")])

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def start(self) -> None:
        for n in self.nodes:
            n.start()

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def restart(self, i: int) -> None:
        self.nodes[i].start()

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()

    def meta_leader(self) -> str | None:
        """The meta leader's server name, from any live node's monitoring endpoint (``/jsz``)."""
        for i, n in enumerate(self.nodes):
            if n.proc is None or n.proc.poll() is not None:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_ports[i]}/jsz", timeout=2) as r:
                    jsz: dict[str, Any] = json.loads(r.read())
            except OSError:
                continue
            leader = (jsz.get("meta_cluster") or {}).get("leader")
            if leader:
                return str(leader)
        return None

    def index_of(self, name: str) -> int | None:
        return next((i for i, n in enumerate(self.nodes) if n.server_name == name), None)


class HostProc:
    """``bide -v worker benchmarks.chaos_apps:worker`` in a child process; its output kept in a log file."""

    def __init__(self, name: str, url: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        full_env = {**os.environ, **env, "BIDE_NATS_URL": url,
                    "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "actors.apps.cli", "-v", "worker", "benchmarks.chaos_apps:worker", "--name", name],
            cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.pid = self.proc.pid
        self.started = time.time()
        self.ready = threading.Event()
        self.owner_since: float | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        # Always read: a host that logs into a full pipe would block.
        assert self.proc.stdout is not None
        with self.log_path.open("a") as log:
            for line in self.proc.stdout:
                log.write(line)
                self.tail.append(line)
                if "ready" in line:
                    self.ready.set()
                if _OWNER_RE.search(line):
                    self.owner_since = time.time()
                elif _LOST_RE.search(line):
                    self.owner_since = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._drain.join(timeout=5)

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._drain.join(timeout=5)


class Hosts:
    """``count`` live host processes; a killed one is replaced at once by a fresh process."""

    def __init__(self, count: int, url: str, env: dict[str, str], workdir: Path) -> None:
        self.count = count
        self.url = url
        self.env = env
        self.workdir = workdir
        self.live: list[HostProc] = []
        self.all: list[HostProc] = []
        self._n = 0

    def spawn(self) -> HostProc:
        self._n += 1
        h = HostProc(f"chaos-h{self._n}", self.url, self.env, self.workdir / f"host-{self._n}.log")
        self.live.append(h)
        self.all.append(h)
        return h

    def start(self, timeout: float = 60.0) -> None:
        for _ in range(self.count):
            self.spawn()
        deadline = time.monotonic() + timeout
        for h in self.live:
            while not h.ready.wait(0.1):
                if not h.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"host {h.name} did not become ready:\n" + "".join(h.tail))

    def router_owner(self) -> HostProc | None:
        """The live host that most recently said it became the router's owner."""
        owners = [h for h in self.live if h.owner_since is not None and h.alive()]
        return max(owners, key=lambda h: h.owner_since or 0.0) if owners else None

    def kill(self, victim: HostProc) -> None:
        victim.kill()
        self.live.remove(victim)
        self.spawn()  # a replacement starts at once; it joins when it is ready

    def reap_dead(self) -> list[HostProc]:
        """Hosts that died on their own (a crash the harness did not cause): replaced, and returned."""
        dead = [h for h in self.live if not h.alive()]
        for h in dead:
            self.live.remove(h)
            self.spawn()
        return dead

    def stop(self) -> None:
        for h in self.live:
            h.terminate()
        for h in self.all:
            if h.alive():
                h.kill()
