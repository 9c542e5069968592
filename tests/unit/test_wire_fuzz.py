"""Property tests (hypothesis) for the ways bytes come in: the subject codec and every envelope decoder.

Two properties throughout: a valid value round-trips, and any input gives either a decoded
value or the decoder's documented error (``ValueError``, of which pydantic's
``ValidationError`` is one), never another exception that would escape a handler.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from actors.apps.http_api import SPACE
from actors.engine.wait_index import decode_event
from actors.engine.wire import (
    Activation,
    ActivationBegun,
    AttemptFailed,
    ErrorInfo,
    EventSignal,
    MemoRecorded,
    RunCompleted,
    RunFailed,
    RunRemoval,
    RunRemovals,
    RunStarted,
    SignalReceived,
    Subjects,
    TriggerRegistration,
    WaitRegistration,
    decode_activation,
    decode_history,
    decode_token,
    encode_activation,
    encode_history,
    encode_token,
    parse_time,
)
from actors.store.history import _inbox_signal
from sdk.errors import PayloadLimitError
from sdk.limits import PayloadLimits

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies -----------------------------------------------------------------------------------

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
times = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.just(UTC))
names = st.text(min_size=1)
prefixes = st.from_regex(r"[a-z][a-z0-9_-]{0,11}", fullmatch=True)


def signals() -> st.SearchStrategy[EventSignal]:
    return st.builds(EventSignal, source=st.sampled_from(["event", "direct", "child", "cancel"]), name=names,
                     payload=json_values, event_id=names, wait_id=st.none() | names,
                     cond=st.none() | st.integers(0, 100), scope=st.none() | names,
                     event_seq=st.none() | st.integers(1, 2**63 - 1), at=times,
                     meta=st.dictionaries(st.text(), json_values, max_size=3))


entries = st.one_of(
    st.builds(RunStarted, run_id=names, task=names, durable=st.booleans(), input=json_values, at=times,
              meta=st.dictionaries(st.text(), json_values, max_size=3), start_id=st.none() | names),
    st.builds(ActivationBegun, host=names, delivery=st.integers(1, 1000), at=times),
    st.builds(MemoRecorded, pos=st.integers(0, 10**6), name=names, args_hash=st.text(), result=json_values),
    st.builds(SignalReceived, inbox_seq=st.integers(1, 2**63 - 1), signal=signals()),
    st.builds(AttemptFailed, attempt=st.integers(1, 100), at=times, retry_at=times,
              error=st.builds(ErrorInfo, type=names, message=st.text(), traceback=st.text())),
    st.builds(RunCompleted, result=json_values, at=times),
    st.builds(RunFailed, error=st.builds(ErrorInfo, type=names, message=st.text()), at=times),
)

# Bytes that look like an envelope (right keys, wrong or random values) reach deeper than random bytes.
KINDS = ["run_started", "activation", "parked", "memo", "now", "patched", "sleep_scheduled", "sleep_fired",
         "wait_registered", "signal", "wait_resolved", "children_spawned", "attempt_failed", "run_completed",
         "run_failed", "run_cancelled", "nope"]
near_entries = st.dictionaries(st.sampled_from(["k", "pos", "at", "run_id", "task", "result", "error", "signal",
                                                "inbox_seq", "groups", "host", "delivery", "durable"]),
                               json_values | st.sampled_from(KINDS), max_size=6)
near_history = st.fixed_dictionaries({"v": json_values | INT64, "e": st.lists(near_entries, max_size=4)})
near_activation = st.dictionaries(
    st.sampled_from(["v", "run_id", "task", "kind", "pos", "history_seq", "inbox_seq", "started"]),
    json_values | st.sampled_from(["start", "timer", "retry", "signal"]), max_size=8)
garbage = st.binary(max_size=300) | json_values.map(orjson.dumps) | st.sampled_from(
    [b"", b"null", b"[" * 5000, b"{" * 5000, b'{"v": 1e999}', b"\xff\xfe", b'{"v":1,"e":[{"k":"memo"}]}'])


def only_value_errors(decode: Any, data: bytes) -> None:
    try:
        decode(data)
    except ValueError:
        pass


# -- subjects -------------------------------------------------------------------------------------


@FUZZ
@given(names)
def test_any_name_is_one_token_and_round_trips(value: str) -> None:
    token = encode_token(value)
    assert decode_token(token) == value
    assert not set(token) & set(".*>") and not any(c.isspace() for c in token) and token


@FUZZ
@given(st.text())
def test_decoding_any_token_never_raises(token: str) -> None:
    assert isinstance(decode_token(token), str)


@FUZZ
@given(prefixes, names, st.none() | names)
def test_event_and_waits_subjects_parse_back(prefix: str, key: str, scope: str | None) -> None:
    s = Subjects(prefix)
    assert s.parse_event_subject(s.event(key, scope)) == (key, scope)
    assert s.parse_waits_subject(s.waits(key)) == key
    assert s.event(key, scope).count(".") == (3 if scope is not None else 2)


@FUZZ
@given(prefixes, st.text())
def test_any_subject_parses_to_an_event_or_none(prefix: str, subject: str) -> None:
    s = Subjects(prefix)
    for candidate in (subject, f"{prefix}.events.{subject}", f"{prefix}.waits.{subject}"):
        parsed = s.parse_event_subject(candidate)
        assert parsed is None or isinstance(parsed[0], str)
        waits = s.parse_waits_subject(candidate)
        assert waits is None or isinstance(waits, str)


# -- envelopes ------------------------------------------------------------------------------------


@FUZZ
@given(st.lists(entries, min_size=1, max_size=5))
def test_history_batches_round_trip(batch: list[Any]) -> None:
    assert decode_history(encode_history(batch)) == batch


@FUZZ
@given(garbage | near_history.map(orjson.dumps))
def test_any_bytes_decode_to_a_history_or_a_value_error(data: bytes) -> None:
    only_value_errors(decode_history, data)


@FUZZ
@given(st.builds(Activation, run_id=names, task=names, kind=st.sampled_from(["start", "timer", "retry", "signal"]),
                 pos=st.none() | st.integers(0, 10**6), history_seq=st.none() | st.integers(1, 2**63 - 1),
                 inbox_seq=st.none() | st.integers(1, 2**63 - 1)))
def test_activations_round_trip(act: Activation) -> None:
    assert decode_activation(encode_activation(act)) == act


@FUZZ
@given(garbage | near_activation.map(orjson.dumps))
def test_any_bytes_decode_to_an_activation_or_a_value_error(data: bytes) -> None:
    only_value_errors(decode_activation, data)


@FUZZ
@given(signals())
def test_inbox_signals_round_trip(signal: EventSignal) -> None:
    assert _inbox_signal("r", 7, signal.model_dump_json().encode()) == [(7, signal)]


@FUZZ
@given(garbage)
def test_a_malformed_inbox_message_is_dropped_not_raised(data: bytes) -> None:
    assert isinstance(_inbox_signal("r", 7, data), list)


@FUZZ
@given(garbage)
def test_router_and_reaper_envelopes_decode_or_raise_value_errors(data: bytes) -> None:
    for model in (WaitRegistration, TriggerRegistration, RunRemoval, RunRemovals):
        only_value_errors(model.model_validate_json, data)


# -- headers --------------------------------------------------------------------------------------


@FUZZ
@given(st.text())
def test_any_timestamp_header_gives_a_time(raw: str) -> None:
    assert isinstance(parse_time(raw), datetime)


HEADER_NAMES = ["Bide-Metadata", "traceparent", "Nats-Msg-Id", "Bide-Kind", "Bide-Due", "Nats-Rollup",
                "Nats-Expected-Last-Subject-Sequence", "X-Other"]
headers = st.dictionaries(st.sampled_from(HEADER_NAMES),
                          st.text() | json_values.map(lambda v: orjson.dumps(v).decode()), max_size=5)


@FUZZ
@given(st.binary(max_size=300) | json_values.map(orjson.dumps), headers)
@example(b"{}", {"Bide-Metadata": "[[1, 2]]"})  # a JSON array of pairs: dict() of it has an integer key
@example(b"{}", {"Bide-Metadata": '["ab"]'})
def test_any_published_event_decodes_to_an_event_with_json_metadata_or_a_limit_error(
        data: bytes, hdrs: dict[str, str]) -> None:
    msg = Msg(None, subject="bide.events.k", data=data, headers=hdrs)  # type: ignore[arg-type]
    try:
        event = decode_event(msg, "k", None, 1, datetime.now(UTC), PayloadLimits(max_depth=8))
    except PayloadLimitError:
        return
    # Carried into every signal it matches: it must encode as a JSON object (string keys).
    assert isinstance(event.meta, dict) and all(isinstance(k, str) for k in event.meta)
    orjson.dumps({"payload": event.payload, "meta": event.meta})


def test_the_api_schema_space_class_is_exactly_str_isspace() -> None:
    """The HTTP API's key pattern documents ``sdk.events.validate_key``'s ``str.strip``."""
    spaced = {c for c in map(chr, range(0x110000)) if re.fullmatch(f"[{SPACE}]", c)}
    assert spaced == {c for c in map(chr, range(0x110000)) if c.isspace()}


def test_an_inbox_signal_no_history_could_hold_is_malformed() -> None:
    """An integer beyond 64 bits would fail every append of the run (found by tests/integration/test_garbage_in)."""
    big = b'{"source": "direct", "name": "n", "event_id": "e", "at": "2026-01-01T00:00:00Z", "payload": %d}'
    assert _inbox_signal("r", 7, big % (2**64)) == []
    assert _inbox_signal("r", 7, big % (2**63 - 1))[0][1].payload == 2**63 - 1


def test_a_malformed_inbox_message_is_logged_as_an_error_once_then_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """Every read of the inbox meets it until a purge: one error line, not one per turn."""
    with caplog.at_level(logging.DEBUG, logger="bide.history"):
        for _ in range(3):
            assert _inbox_signal("garbage-run", 41, b"\x00 not a signal") == []
    levels = [r.levelno for r in caplog.records if "malformed inbox message 41" in r.getMessage()]
    assert levels == [logging.ERROR, logging.DEBUG, logging.DEBUG]
