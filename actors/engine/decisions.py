"""What a run's history says about its next turn: pure functions, decided here and nowhere else.

Whether the code is parked, which signals it may not have reacted to, whether an
activation can change what the code does next (else the host records the signals and
parks the run again without running code), how many attempts have failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from actors.engine.run_history import RunHistory
from actors.engine.wire import (
    Activation,
    ActivationBegun,
    AttemptFailed,
    EventSignal,
    HistoryEntry,
    SignalReceived,
    WaitCondition,
    WaitRegistered,
)


def claimed_signals(entries: Sequence[HistoryEntry]) -> list[EventSignal]:
    """The signals of the last turn if it recorded signals and nothing after them, else none.

    Such a turn's code is running now, or its host died: a turn claims the signals it woke
    for before running code (invariant 1), and when its code parks again with nothing new
    it says so (:class:`actors.engine.wire.TurnParked`), so a claim standing alone means the code
    has not reacted yet.
    """
    claimed: list[EventSignal] = []
    for e in reversed(entries):
        if isinstance(e, ActivationBegun):
            return claimed
        if not isinstance(e, SignalReceived):
            return []
        claimed.append(e.signal)
    return []


def claim_under_way(hist: RunHistory, now: datetime, window_s: float) -> float | None:
    """Seconds to wait for another host's turn that claimed signals and has not reacted yet, if any.

    A claim standing alone (:func:`claimed_signals`) younger than ``window_s`` (the ack wait:
    a live host's turn keeps its activation, a dead one's comes back after it) is a turn
    under way: running the code now would run its steps a second time. Older, its host died
    and the code must run. ``None``: no turn under way.
    """
    if not claimed_signals(hist.entries):
        return None
    began = next((e for e in reversed(hist.entries) if isinstance(e, ActivationBegun)), None)
    if began is None:
        return None
    left = window_s - (now - began.at).total_seconds()
    return left if left > 0 else None


def is_suspended(hist: RunHistory) -> bool:
    """Whether the run's code is parked: at an open wait, a sleep not yet over, or children not all back."""
    if claimed_signals(hist.entries):
        return False  # a turn that claimed signals has not reacted yet (or its host died)
    state = hist.state
    return bool(state.open_waits or state.sleeping or state.unreported)


def unheeded_signals(hist: RunHistory) -> list[EventSignal]:
    """Signals the run's code may not have reacted to: new ones in the inbox, and those its last turn recorded.

    A turn that recorded signals and nothing else either found nothing for the code to do,
    or claimed them and died (or met an error) before the code reacted: which one, only
    asking again tells. Without this a cancel, a child's outcome or an event recorded by a
    host that then died was never acted on.
    """
    return claimed_signals(hist.entries)[::-1] + [sig for _, sig in hist.inbox]


def needs_user_code(act: Activation, hist: RunHistory, delivery: int = 1) -> bool:
    """Whether a timer or signal activation can change what the run's code does next.

    A redelivered one (``delivery`` above 1) always does: the host of the turn it woke may
    have died after that turn's append and before its effects (the children's starts, the
    timer of a sleep it began), and only the code's replay redoes them all, idempotently.
    Skipping it left a parent waiting for children that never existed, and a sleep without a
    timer, for ever.
    """
    if delivery > 1:
        return True
    signals = unheeded_signals(hist)
    if any(sig.source in ("child", "cancel") for sig in signals):
        return True
    if act.kind == "timer" and act.pos is not None and act.pos not in hist.state.fired:
        return True
    waits = hist.state.open_waits
    waited_names = {c.event_key for w in waits.values() for c in w.flat() if c.kind == "event"}
    return any(sig.wait_id in waits if sig.source == "event" else sig.name in waited_names for sig in signals)


def failed_attempts(hist: RunHistory) -> int:
    """Failed attempts so far (the attempt number is this plus one, on every host)."""
    return hist.state.failed_attempts


@dataclass(frozen=True)
class Wakeup:
    """A wake-up a run waits for that Bide sends itself: a timer's, ``pos``'s (a sleep, a wait's
    sleep condition) or its next attempt's (``retry``, the failure it retries); or its start
    activation (``start``), while its history is its start alone."""

    at: datetime
    pos: int | None = None
    retry: AttemptFailed | None = None
    start: bool = False
    certain: bool = True
    """Had it come, the history would say so (a sleep fired, a wait resolved, an attempt began).
    ``False``: a wait that needs an event besides its sleeps, whose sleep may have come and
    found the wait still waiting for the event, leaving nothing to record."""


def expected_wakeups(hist: RunHistory) -> list[Wakeup]:
    """The wake-ups the run waits for from Bide, as its history says, earliest first (none once it has ended).

    A run whose history is its start alone (a chosen id, a child, a new generation) waits for
    its start activation. Else: a sleep not yet fired; an open wait with sleep conditions (when
    they alone resolve it, or else its earliest sleep, not certain); the next attempt, when
    the last entry is a failed one.
    """
    if not hist.entries or hist.terminal is not None:
        return []
    state = hist.state
    if len(hist.entries) == 1 and not state.began:
        return [Wakeup(hist.started.at, start=True)]
    out = [Wakeup(s.wake_at, pos=pos) for pos, s in state.sleeping.items()]
    for w in state.open_waits.values():
        sleeps = [c.wake_at for c in w.flat() if c.kind == "sleep" and c.wake_at is not None]
        if not sleeps:
            continue
        by_time = _resolved_by_time(w)
        out.append(Wakeup(by_time, pos=w.pos) if by_time is not None
                   else Wakeup(min(sleeps), pos=w.pos, certain=False))
    last = hist.entries[-1]
    if isinstance(last, AttemptFailed):
        out.append(Wakeup(last.retry_at, retry=last))
    return sorted(out, key=lambda w: w.at)


def _resolved_by_time(w: WaitRegistered) -> datetime | None:
    """When ``w``'s sleep conditions alone resolve it, if they can: one of ``any_of``'s, or every
    group's earliest once all groups have one."""
    def earliest(conds: list[WaitCondition]) -> datetime | None:
        wakes = [c.wake_at for c in conds if c.kind == "sleep" and c.wake_at is not None]
        return min(wakes) if wakes else None

    candidates = [t for t in [earliest(list(w.any_of))] if t is not None]
    per_group = [earliest(g) for g in w.groups]
    if per_group and all(t is not None for t in per_group):
        candidates.append(max(t for t in per_group if t is not None))
    return min(candidates) if candidates else None
