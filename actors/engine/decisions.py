"""What a run's history says about its next turn: pure functions, decided here and nowhere else.

Whether the code is parked, which signals it may not have reacted to, whether an
activation can change what the code does next (else the host records the signals and
parks the run again without running code), how many attempts have failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from actors.engine.run_history import RunHistory
from actors.engine.wire import (
    Activation,
    ActivationBegun,
    EventSignal,
    HistoryEntry,
    SignalReceived,
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
