from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from nats.aio.msg import Msg

from actors.engine.wire import (
    ActivationBegun,
    HistoryEntry,
    MemoRecorded,
    RunCompleted,
    RunStarted,
    Subjects,
    args_hash,
    decode_cancel_broadcast,
    decode_history,
    decode_terminal,
    decode_token,
    encode_cancel_broadcast,
    encode_history,
    encode_token,
    parse_time,
    rfc3339,
    utcnow,
)
from actors.store.requests import times_delivered
from sdk.durations import parse_duration

TRICKY = ["a.b", "x y", "tab\there", "%", "%2E", "*", ">", "a.*.>", "user:update", "é/ü", "line\nbreak",
          "nbsp\u00a0", "sep\u2028", "orders/2024/created"]


@pytest.mark.parametrize("value", TRICKY)
def test_tokens_round_trip_and_never_hold_separators(value: str) -> None:
    token = encode_token(value)
    assert decode_token(token) == value
    assert not any(c in token for c in ".*>") and not any(c.isspace() for c in token)


def test_plain_names_stay_readable() -> None:
    assert encode_token("user:update") == "user:update"
    assert Subjects("bide").history("abc") == "bide.history.abc"
    with pytest.raises(ValueError):
        encode_token("")


def test_history_envelope_round_trips() -> None:
    now = utcnow()
    entries = [
        RunStarted(run_id="r", task="T", durable=True, input={"a": [1, 2]}, at=now),
        MemoRecorded(pos=0, name="f", args_hash="ab", result={"x": None}),
        RunCompleted(result=[1, "two"], at=now),
    ]
    assert decode_history(encode_history(entries)) == entries


def test_a_result_inbox_reads_the_end_alone_from_the_message_that_ends_the_run() -> None:
    now = utcnow()
    start = RunStarted(run_id="r", task="T", durable=True, input={"a": 1}, at=now)
    end = RunCompleted(result={"value": 2}, at=now)
    entries: list[HistoryEntry] = [start, MemoRecorded(pos=0, name="f", args_hash="ab"), end]
    assert decode_terminal(encode_history(entries)) == end
    assert decode_terminal(encode_history([start])) is None
    for bad in (b"[]", b'{"v":1,"e":[]}', b'{"v":99,"e":[{"k":"run_completed"}]}', b"not json"):
        with pytest.raises(ValueError):
            decode_terminal(bad)


@pytest.mark.parametrize("reply, count", [
    ("$JS.ACK.S.C.3.12345.6789.1764412345123456789.0", 3),
    ("$JS.ACK._.ACCHASH.S.C.4.12345.6789.1764412345123456789.0.tok", 4),
    ("$JS.ACK.dom.ACCHASH.S.C.5.12345.6789.1764412345123456789.0", 5),
])
def test_the_delivery_count_is_read_from_every_form_of_ack_subject(reply: str, count: int) -> None:
    msg = Msg(_client=None, subject="bide.queue.T.r", reply=reply)  # type: ignore[arg-type]
    assert times_delivered(msg) == count == msg.metadata.num_delivered


def test_fields_at_their_default_are_left_out_and_filled_in_on_read() -> None:
    at = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    started = RunStarted(run_id="r", task="T", durable=True, at=at, start_id="s")
    data = encode_history([started, ActivationBegun(host="h", delivery=1, at=at)])
    assert data == (b'{"v":1,"e":[{"k":"run_started","run_id":"r","task":"T","durable":true,'
                    b'"at":"2026-11-28T12:00:00Z","start_id":"s"},'
                    b'{"k":"activation","host":"h","delivery":1,"at":"2026-11-28T12:00:00Z"}]}')
    assert decode_history(data) == [started, ActivationBegun(host="h", delivery=1, at=at)]
    # A value equal to a default of another type is kept: 0 is not False, 1.0 is not 1.
    kept = RunStarted(run_id="r", task="T", durable=True, at=at, input=0, generation=2)
    assert decode_history(encode_history([kept])) == [kept]


def test_histories_written_with_every_field_still_read() -> None:
    old = (b'{"v":1,"e":[{"k":"run_started","run_id":"r","task":"T","durable":true,"input":null,'
           b'"at":"2026-11-28T12:00:00+00:00","execution_timeout_s":null,"meta":{},"parent":null,'
           b'"parents":null,"start_id":"s","generation":0,"inbox_taken":0}]}')
    [started] = decode_history(old)
    assert started == RunStarted(run_id="r", task="T", durable=True, at=datetime(2026, 11, 28, 12, tzinfo=UTC),
                                 start_id="s")


def test_newer_envelope_versions_are_refused() -> None:
    with pytest.raises(ValueError, match="newer"):
        decode_history(b'{"v":99,"e":[]}')


def test_args_hash_is_stable_and_order_sensitive() -> None:
    assert args_hash(1, {"b": 2, "a": 1}) == args_hash(1, {"a": 1, "b": 2})
    assert args_hash(1, 2) != args_hash(2, 1)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5), ("2m", 120), ("1h30m", 5400), ("500ms", 0.5), ("3d", 259200), (timedelta(seconds=7), 7), (1.5, 1.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text, "d").total_seconds() == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "5", "5x", "5 parsecs", "s"])
def test_bad_durations_name_the_value(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text, "duration")


def test_negative_durations_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration(-1, "duration")


def test_an_activation_written_before_the_rename_reads_its_delivery_count() -> None:
    old = b'{"v":1,"e":[{"k":"activation","host":"h","attempt":3,"at":"2026-01-01T00:00:00Z"}]}'
    (entry,) = decode_history(old)
    assert isinstance(entry, ActivationBegun) and entry.delivery == 3
    assert b'"delivery":3' in encode_history([entry])


@pytest.mark.parametrize("ts,text", [
    (datetime(2026, 11, 28, 5, 6, 7, 890123, tzinfo=UTC), "2026-11-28T05:06:07.890123Z"),
    (datetime(2026, 11, 28, 5, 6, 7, tzinfo=UTC), "2026-11-28T05:06:07.000000Z"),
    (datetime(2026, 11, 28, 7, 6, 7, 5, tzinfo=timezone(timedelta(hours=2))), "2026-11-28T05:06:07.000005Z"),
    (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000000Z"),
])
def test_rfc3339_is_utc_to_the_microsecond_and_reads_back(ts: datetime, text: str) -> None:
    assert rfc3339(ts) == text
    assert parse_time(text) == ts


def test_random_ids_are_version_4_uuids() -> None:
    import uuid

    from actors.engine.wire import random_id

    ids = {random_id() for _ in range(1000)}
    assert len(ids) == 1000
    for i in ids:
        u = uuid.UUID(hex=i)
        assert (u.version, u.variant, u.hex) == (4, uuid.RFC_4122, i)


def test_args_hash_is_the_same_in_every_process_and_accepts_what_older_versions_recorded() -> None:
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    import orjson

    from actors.engine.wire import args_hash, args_hash_matches

    code = ("from actors.engine.wire import args_hash\n"
            "class Order:\n    def __init__(self): self.oid = '42'\n"
            "print(args_hash(Order(), {'gift', 'express', 'fragile'}, frozenset({3, 1})))")
    repo = Path(__file__).resolve().parents[2]
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}, cwd=str(repo)).stdout.strip()
            for seed in (1, 2, 3)}
    assert len(seen) == 1
    # A hash recorded before sets and plain objects had a stable form still matches where that
    # form was stable (a set of small ints printed the same in every process).
    legacy = hashlib.blake2b(orjson.dumps(({1, 2},), option=orjson.OPT_SORT_KEYS, default=repr),
                             digest_size=8).hexdigest()
    assert legacy != args_hash({1, 2})
    assert args_hash_matches(legacy, args_hash({1, 2}), {1, 2})
    assert not args_hash_matches(legacy, args_hash({1, 3}), {1, 3})


DEFAULTS = {
    "ActivationBegun": {"tidied": False},
    "ErrorInfo": {"traceback": ""},
    "MemoRecorded": {"ms": None, "result": None},
    "ParentLink": {"n": 1},
    "RunCancelled": {"reason": ""},
    "RunCompleted": {"result": None, "skipped": False},
    "RunStarted": {"additional_metadata": {}, "execution_timeout_s": None, "generation": 0, "inbox_taken": 0,
                   "carried": [], "input": None, "meta": {}, "parent": None, "parents": None, "start_id": None,
                   "withdrawn": []},
    "EndedWait": {"satisfied": []},
    "WaitCondition": {"duration_s": None, "event_key": None, "expression": None, "lookback_s": None,
                      "scope": None, "wake_at": None},
    "WaitRegistered": {"any_of": []},
    "WaitResolved": {"consumed": []},
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_no_default_of_a_written_field_ever_changes(name: str) -> None:
    """A history leaves a field at its default out: changing a default would change what old histories say."""
    import actors.engine.wire as wire

    assert wire._defaults_of(getattr(wire, name)) == DEFAULTS[name], (
        f"{name}'s defaults differ: a new field goes in DEFAULTS; a changed default would change what "
        "histories that left the field out say")


def test_the_cancel_broadcast_carries_the_reason_and_reads_a_bare_run_id_or_garbage_without_raising() -> None:
    data = encode_cancel_broadcast("run-1", "no longer needed\nsecond line")
    assert decode_cancel_broadcast(data) == ("run-1", "no longer needed\nsecond line")
    assert decode_cancel_broadcast(b"run-1") == ("run-1", "cancelled")  # what clients before sent
    # Anyone who may publish on the subject: nothing they send raises, and it names no running run.
    assert decode_cancel_broadcast(b"{not json") == ("{not json", "cancelled")
    assert decode_cancel_broadcast(b'{"run_id": 7}') == ('{"run_id": 7}', "cancelled")
    assert decode_cancel_broadcast(b'{"run_id": "r", "reason": ["x"]}') == ("r", "cancelled")
    assert decode_cancel_broadcast(b"\xff\xfe") == ("\ufffd\ufffd", "cancelled")
