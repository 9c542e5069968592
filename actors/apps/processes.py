"""Host child processes for ``bide worker --processes N`` and ``bide dev --workers N``.

A host is one single-threaded Python process; to use every core of a machine, the command
starts more ``bide worker`` processes beside the one it hosts itself and keeps them running.
They share nothing but NATS, so every guarantee holds exactly as with hosts on separate
machines: each process is a host of its own (its own host id, since that carries the pid),
and a process that dies is a host crash the others recover from as from any other.

:class:`Supervisor` starts one child per command line, forwards each line a child prints to
this process's stderr prefixed with its pid, restarts a child that exits while this process
is not stopping (after a backoff), and stops them all with SIGTERM (each drains its turns),
SIGKILL for what is left after a grace period.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
RESTART_RESET_AFTER_S = 60.0
"""A child restarts after 1 s, then 2, 4... at most 30 s; one that stayed up 60 s starts again at 1 s."""

STOP_GRACE_S = 30.0
"""How long children get to drain after SIGTERM before they are SIGKILLed."""

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


MAX_PROCESSES = 256
"""The most processes one ``--processes`` starts (each is a host using up to one core)."""


def parse_count(value: str, flag: str) -> int:
    """``N`` (at least 1) or ``auto``: one process per CPU this process may run on."""
    if value.strip().lower() == "auto":
        return cpus_available()
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_PROCESSES:
        raise ValueError(f"{flag} must be a whole number from 1 to {MAX_PROCESSES}, or 'auto' (one per CPU this "
                         f"process may run on), got {value!r}")
    return n


def cpus_available() -> int:
    """The CPUs this process may run on (its affinity mask: a container's cpuset, ``taskset``), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux: no affinity call; every CPU the machine has
        return os.cpu_count() or 1


SUPERVISOR_ENV = "BIDE_SUPERVISOR_PID"
"""Set in a child's environment to its supervisor's pid: the child asks to die with it."""


def die_with_supervisor() -> None:
    """In a child started by a :class:`Supervisor`: get SIGTERM when the supervisor dies, even by SIGKILL.

    Called by the child itself first thing (``bide worker``), not between fork and exec: code
    run there (``preexec_fn``) can deadlock in a process with threads, as a host is. Linux only
    (``prctl(PR_SET_PDEATHSIG)``); elsewhere there is no such call, and children of a supervisor
    that is SIGKILLed live on as ordinary hosts until stopped by hand. If the supervisor died
    before the call, the signal will never come: the child exits at once.
    """
    raw = os.environ.pop(SUPERVISOR_ENV, "")
    if not raw.isdigit():
        return
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != int(raw):
        os._exit(1)


def describe_exit(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


class Supervisor:
    """Keeps one child process per command line running until :meth:`stop`.

    ``is_ready`` recognises the line a child prints once it serves; :attr:`ready` is set once
    every child has printed one (after a restart the event stays set).
    """

    def __init__(self, commands: Sequence[Sequence[str]], *, is_ready: Callable[[str], bool] = lambda _: True,
                 out: TextIO | None = None, label: str = "bide") -> None:
        self.commands = [list(c) for c in commands]
        self.ready = asyncio.Event()
        self._is_ready = is_ready
        self._out = out
        self._label = label
        self._stopping = asyncio.Event()
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._seen_ready: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped: asyncio.Future[None] | None = None
        if not self.commands:
            self.ready.set()

    @property
    def pids(self) -> list[int]:
        """The children running now, one per command line (none for one between restarts)."""
        return [p.pid for _, p in sorted(self._procs.items()) if p.returncode is None]

    def _say(self, text: str) -> None:
        out = self._out or sys.stderr
        out.write(text if text.endswith("\n") else text + "\n")
        out.flush()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._keep(i)) for i in range(len(self.commands))]

    async def _keep(self, slot: int) -> None:
        """One child: start it, forward its output, restart it after a backoff when it exits."""
        delay = RESTART_FIRST_S
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.commands[slot], stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT, env={**os.environ, SUPERVISOR_ENV: str(os.getpid())},
                    # Its own session: a terminal's Ctrl-C reaches this process only, which stops the
                    # children itself (no child exits before we know we are stopping, to be restarted).
                    start_new_session=True)
            except (OSError, ValueError) as e:
                self._say(f"{self._label}: could not start a worker process: {e}")
                code_text = "not started"
            else:
                self._procs[slot] = proc
                self._say(f"{self._label}: worker process {proc.pid} started: {shlex.join(self.commands[slot][1:])}")
                if self._stopping.is_set():  # stop() began while it was being spawned
                    proc.terminate()
                await self._forward(slot, proc)
                code = await proc.wait()
                if self._stopping.is_set():
                    return
                code_text = describe_exit(code)
                self._say(f"{self._label}: worker process {proc.pid} ended ({code_text})")
            if time.monotonic() - started >= RESTART_RESET_AFTER_S:
                delay = RESTART_FIRST_S
            self._say(f"{self._label}: restarting it in {delay:g} s")
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return
            except TimeoutError:
                pass
            delay = min(delay * 2, RESTART_MAX_S)

    async def _forward(self, slot: int, proc: asyncio.subprocess.Process) -> None:
        """Each line the child prints, to our stderr as ``[pid] line``, until it closes its output.

        Read in chunks rather than ``readline``: a line longer than the stream's buffer (a huge
        log record) would otherwise stop the forwarding, and a child that cannot write blocks.
        """
        assert proc.stdout is not None
        buf = b""
        while True:
            chunk = await proc.stdout.read(65536)
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                if len(buf) > 65536:  # no newline in sight: pass it on as it is
                    lines, buf = [*lines, buf], b""
            else:
                lines, buf = ([buf] if buf else []), b""
            for raw in lines:
                line = raw.decode(errors="replace").rstrip("\r")
                self._say(f"[{proc.pid}] {line}")
                if slot not in self._seen_ready and self._is_ready(line):
                    self._seen_ready.add(slot)
                    if len(self._seen_ready) == len(self.commands):
                        self.ready.set()
            if not chunk:
                return

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM to every child (each drains its turns), SIGKILL to those still up after ``grace`` s.

        Idempotent: a second call (a signal, then the command's own clean-up) awaits the first.
        """
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopped)

    def stop_on(self, event: asyncio.Event) -> asyncio.Task[None]:
        """Stop the children as soon as ``event`` is set (so they drain while the caller drains its own host)."""

        async def wait_then_stop() -> None:
            await event.wait()
            await self.stop()

        return asyncio.create_task(wait_then_stop())

    async def _stop(self, grace: float) -> None:
        self._stopping.set()
        for proc in list(self._procs.values()):
            if proc.returncode is None:
                proc.terminate()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=grace)
            if late:
                for proc in list(self._procs.values()):
                    if proc.returncode is None:
                        self._say(f"{self._label}: worker process {proc.pid} still up after {grace:g} s: SIGKILL")
                        proc.kill()
                await asyncio.wait(late)
        for t in self._tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                self._say(f"{self._label}: supervising a worker process failed: {t.exception()!r}")
