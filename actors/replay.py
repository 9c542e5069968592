"""The replay engine: one turn of a durable run, rebuilt from its history.

User code between checkpoints is re-run; checkpointed operations (memo, now, sleep)
return what the history recorded. Every checkpoint has a *position* (the order in
which the code asked for it) and records what was asked, so a replay that asks for
something else fails with :class:`NonDeterminismError` (invariant 3).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NoReturn

from actors.history import HistoryLog, RunHistory
from actors.timers import RESIDENT_MAX
from actors.wire import (
    ActivationBegun,
    MemoRecorded,
    NowRecorded,
    SleepFired,
    SleepScheduled,
    args_hash,
    utcnow,
)
from sdk._codec import return_adapter, to_json_value
from sdk.errors import NonDeterminismError
from sdk.models import SleepResult


@dataclass(frozen=True)
class TimerRequest:
    """The run suspended on a sleep: schedule a wake-up at ``wake_at`` for position ``pos``."""

    pos: int
    wake_at: datetime


class Suspended(Exception):
    """Why the turn ended without the run finishing (the run is evicted)."""


class Turn:
    """Drives one activation of one run. Implements :class:`sdk.context.DurableRuntime`."""

    def __init__(
        self,
        *,
        history: RunHistory,
        log: HistoryLog,
        task: str,
        host_id: str,
        attempt: int,
    ) -> None:
        self.run_id = history.run_id
        self.task = task
        self._log = log
        self.last_seq = history.last_seq
        self.notify: str | None = history.entries[0].meta.get("notify") if history.entries else None
        self._by_pos: dict[int, dict[str, Any]] = {}
        for e in history.entries:
            pos = getattr(e, "pos", None)
            if pos is not None:
                self._by_pos.setdefault(pos, {})[e.k] = e
        self._next = 0
        # The activation record rides on the turn's first flush; a turn that appends
        # nothing else (a stale or duplicate activation) writes nothing at all.
        self._pending: list[Any] = [ActivationBegun(host=host_id, attempt=attempt, at=utcnow())]
        self._flush_lock = asyncio.Lock()
        self.timers: list[TimerRequest] = []
        self.suspended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.fatal: BaseException | None = None

    # -- bookkeeping ---------------------------------------------------------------------------

    def _position(self) -> int:
        pos = self._next
        self._next += 1
        return pos

    def _mismatch(self, pos: int, recorded: str, requested: str) -> NoReturn:
        err = NonDeterminismError(self.run_id, pos, recorded, requested)
        if self.fatal is None:
            self.fatal = err
        raise err

    @staticmethod
    def _describe(rec: dict[str, Any]) -> str:
        if "memo" in rec:
            m = rec["memo"]
            return f"memo({m.name!r}, args hash {m.args_hash})"
        if "sleep_scheduled" in rec:
            return f"sleep({rec['sleep_scheduled'].duration_s:g}s)"
        if "now" in rec:
            return "now()"
        return ", ".join(sorted(rec))

    @property
    def has_new_facts(self) -> bool:
        return any(not isinstance(e, ActivationBegun) for e in self._pending)

    async def flush(self, extra: list[Any] | None = None) -> None:
        """Append pending entries (plus ``extra``) as one message, guarded by expected sequence."""
        async with self._flush_lock:
            entries = self._pending + (extra or [])
            if not entries:
                return
            self._pending = []
            try:
                self.last_seq = await self._log.append(self.run_id, entries, self.last_seq, self.notify)
            except BaseException as e:
                if self.fatal is None:
                    self.fatal = e
                raise

    def _suspend(self, timer: TimerRequest | None) -> None:
        if timer is not None:
            self.timers.append(timer)
        if not self.suspended.done():
            self.suspended.set_result(None)

    # -- DurableRuntime ------------------------------------------------------------------------

    async def memo(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        pos = self._position()
        name = getattr(fn, "__qualname__", None) or repr(fn)
        digest = args_hash(*args)
        rec = self._by_pos.get(pos)
        if rec is not None:
            m = rec.get("memo")
            if m is None or m.name != name or m.args_hash != digest:
                self._mismatch(pos, self._describe(rec), f"memo({name!r}, args hash {digest})")
            adapter = return_adapter(fn)
            return adapter.validate_python(m.result) if adapter is not None else m.result
        result = fn(*args)
        if inspect.isawaitable(result):
            result = await result
        data = to_json_value(result, f"the result of memo {name!r} in run {self.run_id}")
        # Nothing completed runs twice: the result is durable before the code goes on.
        await self.flush([MemoRecorded(pos=pos, name=name, args_hash=digest, result=data)])
        return result

    async def now(self) -> datetime:
        pos = self._position()
        rec = self._by_pos.get(pos)
        if rec is not None:
            n = rec.get("now")
            if n is None:
                self._mismatch(pos, self._describe(rec), "now()")
            at: datetime = n.at
            return at
        at = utcnow()
        # Written with the next checkpoint: anything that used this value durably flushes it first.
        self._pending.append(NowRecorded(pos=pos, at=at))
        return at

    async def sleep_until(self, wake_at: datetime | None, duration: timedelta | None) -> SleepResult:
        pos = self._position()
        requested = f"sleep({duration.total_seconds():g}s)" if duration is not None else "sleep_until()"
        rec = self._by_pos.get(pos)
        if rec is not None:
            sched = rec.get("sleep_scheduled")
            if sched is None or (duration is not None and abs(sched.duration_s - duration.total_seconds()) > 1e-6):
                self._mismatch(pos, self._describe(rec), requested)
            wake: datetime = sched.wake_at
            length = timedelta(seconds=sched.duration_s)
            if "sleep_fired" in rec:
                return SleepResult(length)
        else:
            now = utcnow()
            if wake_at is not None:
                wake, length = wake_at, max(wake_at - now, timedelta(0))
            else:
                assert duration is not None
                wake, length = now + duration, duration
            # Sleeps keep their deadline: the wake time is recorded once, before any timer exists.
            await self.flush([SleepScheduled(pos=pos, duration_s=length.total_seconds(), wake_at=wake)])
        remaining = wake - utcnow()
        if remaining > RESIDENT_MAX:
            self._suspend(TimerRequest(pos, wake))
            await asyncio.get_running_loop().create_future()  # never resolves: the host evicts the run
        if remaining > timedelta(0):
            await asyncio.sleep(remaining.total_seconds())
        self._pending.append(SleepFired(pos=pos, at=utcnow()))
        return SleepResult(length)
