"""A run's history as the engine sees it, and its export: pure data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from actors.engine.run_state import RunState
from actors.engine.wire import (
    WIRE_VERSION,
    EventSignal,
    HistoryEntry,
    RunStarted,
    SignalReceived,
    Terminal,
    decode_history,
)


@dataclass
class RunHistory:
    """A run's entries in order, and the stream sequence of its last message (0 if none)."""

    run_id: str
    entries: list[HistoryEntry] = field(default_factory=list)
    last_seq: int = 0
    times: list[str] = field(default_factory=list)
    inbox: list[tuple[int, EventSignal]] = field(default_factory=list)
    """Signals on the run's inbox that no history entry has taken yet, in arrival order."""
    inbox_seen: int = 0
    """The highest inbox sequence this read saw, on the inbox or taken by a history entry."""
    size_bytes: int = 0
    """What the read held: the run's history and untaken inbox messages, in bytes."""
    folded: RunState | None = field(default=None, repr=False, compare=False)
    """The fold of ``entries``, when the reader has it already (a host's resident run)."""
    start_unrecorded: bool = False
    """``entries`` is the run's start alone, not in the stream yet (``last_seq`` 0): a run started
    with a new id, in its first turn, whose first append writes the start ahead of what it adds."""

    @property
    def state(self) -> RunState:
        """What the engine asks of the entries, folded once (:class:`RunState`)."""
        if self.folded is None:
            self.folded = RunState.of(self.entries)
        return self.folded

    @property
    def started(self) -> RunStarted:
        """The run's start, its first entry (``ValueError`` if the history does not begin with one)."""
        first = self.entries[0] if self.entries else None
        if not isinstance(first, RunStarted):
            raise ValueError(f"run {self.run_id}'s history does not begin with its run_started entry")
        return first

    @property
    def terminal(self) -> Terminal | None:
        return self.state.terminal

    def taken(self) -> list[tuple[int, EventSignal]]:
        """``(inbox sequence, signal)`` of every signal this generation holds: the ones its start
        carried from the one before (:attr:`RunStarted.carried`), then those its entries took."""
        carried = [(c.inbox_seq, c.signal) for c in self.started.carried] if self.entries else []
        return carried + [(e.inbox_seq, e.signal) for e in self.entries if isinstance(e, SignalReceived)]


def current_generation(hist: RunHistory) -> None:
    """Keep only the run's current generation: from its last ``run_started`` on (``ctx.continue_as_new``).

    A run that continued as new appends its next start after the earlier generation's entries
    (the append is the switch, under the single-writer guard), then purges those; a reader
    that comes in between skips them here.
    """
    for i in range(len(hist.entries) - 1, 0, -1):
        if isinstance(hist.entries[i], RunStarted):
            del hist.entries[:i]
            del hist.times[:i]
            hist.folded = None
            return


EXPORT_FORMAT = "bide.run-history/1"
"""What ``bide runs export`` writes: a run's entries, their stored times and its untaken inbox, as JSON."""


def export_run(hist: RunHistory) -> dict[str, Any]:
    """A run's history as one JSON document (``bide runs export``, :func:`sdk.testing.replay`)."""
    return {
        "format": EXPORT_FORMAT,
        "run_id": hist.run_id,
        "task": hist.started.task if hist.entries else None,
        "entries": [e.model_dump(mode="json") for e in hist.entries],
        "times": hist.times,
        "inbox": [{"seq": seq, "signal": sig.model_dump(mode="json")} for seq, sig in hist.inbox],
    }


def import_run(doc: Any) -> RunHistory:
    """The :class:`RunHistory` an exported document describes; ``ValueError`` naming what is wrong."""
    if not isinstance(doc, dict):
        raise ValueError(f"a run export is a JSON object, got {type(doc).__name__}")
    if doc.get("format") != EXPORT_FORMAT:
        raise ValueError(f"not a Bide run export: format is {doc.get('format')!r}, expected {EXPORT_FORMAT!r} "
                         "(write one with `bide runs export RUN_ID`)")
    entries = doc.get("entries")
    if not isinstance(entries, list) or not entries:
        raise ValueError("the run export has no entries: a run's history begins with its run_started entry")
    try:
        decoded = decode_history(orjson.dumps({"v": WIRE_VERSION, "e": entries}))
        inbox = [(int(i["seq"]), EventSignal.model_validate(i["signal"])) for i in doc.get("inbox") or []]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"the run export's entries are not valid: {e}") from e
    if not isinstance(decoded[0], RunStarted):
        raise ValueError(f"the run export's first entry is {decoded[0].k!r}, expected 'run_started'")
    return RunHistory(run_id=str(doc.get("run_id") or decoded[0].run_id), entries=decoded,
                      times=list(doc.get("times") or []), inbox=inbox)
