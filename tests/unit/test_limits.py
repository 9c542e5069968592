"""The payload limits every way in checks (sdk.limits): size, nesting depth, int64."""

from __future__ import annotations

import re
from typing import Any

import pytest

from actors.engine.child_ids import validate_child_key
from sdk import BideConfig, EventPayloadError, PayloadLimitError, PayloadTooLargeError
from sdk.conditions import UserEventCondition
from sdk.events import validate_key
from sdk.limits import (
    DEFAULT_MAX_PAYLOAD,
    INT64_MAX,
    INT64_MIN,
    MAX_DEPTH,
    MAX_NAME_BYTES,
    MAX_PAYLOAD_CEILING,
    PayloadLimits,
    check_payload,
    encode_payload,
    parse_size,
)
from sdk.runs import validate_run_id


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_sizes_parse_with_units() -> None:
    assert parse_size("262144") == 262144
    assert parse_size("256KiB") == parse_size("256k") == 256 * 1024
    assert parse_size("500KB") == 500_000
    assert parse_size("1MiB") == 1024 * 1024
    assert parse_size("1GiB") == parse_size("1g") == 1024**3 and parse_size("2GB") == 2 * 10**9
    with pytest.raises(ValueError, match=r"'lots' is not a size"):
        parse_size("lots")


def test_the_limit_is_configurable_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BideConfig.from_env().max_payload_bytes == DEFAULT_MAX_PAYLOAD
    monkeypatch.setenv("BIDE_MAX_PAYLOAD", "512KiB")
    assert BideConfig.from_env().payload_limits.max_bytes == 512 * 1024
    monkeypatch.setenv("BIDE_MAX_PAYLOAD", "1MiB")
    with pytest.raises(ValueError, match=r"must be between .* and 786,432 bytes \(768 KiB\), got 1,048,576"):
        BideConfig.from_env()


def test_a_payload_over_the_size_limit_names_the_limit_and_its_size() -> None:
    limits = PayloadLimits(max_bytes=1024)
    body = b'"' + b"x" * 1100 + b'"'
    with pytest.raises(PayloadTooLargeError, match=r"the payload of event 'e' is over Bide's limit of 1,024 bytes "
                                                   r"\(1 KiB\) \(BIDE_MAX_PAYLOAD\): it has 1,102 bytes as JSON"):
        check_payload(body, limits, "the payload of event 'e'")
    with pytest.raises(PayloadTooLargeError, match="1,102 bytes"):
        encode_payload("x" * 1100, limits, "the payload of event 'e'")
    assert encode_payload("x" * 1000, limits) == b'"' + b"x" * 1000 + b'"'


def test_nesting_deeper_than_the_limit_is_refused_wherever_it_comes_from() -> None:
    assert check_payload(repr(nested(MAX_DEPTH)).encode()) == nested(MAX_DEPTH)
    for depth in (MAX_DEPTH + 1, 300, 5000):  # 300: orjson cannot write it; 5000: Python's recursion limit
        with pytest.raises(PayloadLimitError, match=f"limit of {MAX_DEPTH} levels of nesting"):
            encode_payload(nested(depth), what="input")
    with pytest.raises(PayloadLimitError, match=r"limit of 64 levels of nesting: it has arrays or objects nested "
                                                r"deeper, at \[0\]\[0\]"):
        check_payload(repr(nested(MAX_DEPTH + 1)).encode())
    with pytest.raises(PayloadLimitError, match="more than 200 levels"):
        check_payload(b"[" * 5000 + b"]" * 5000)


def test_integers_outside_int64_are_refused_with_the_value_and_where() -> None:
    assert check_payload(f"[{INT64_MIN}, {INT64_MAX}]".encode()) == [INT64_MIN, INT64_MAX]
    for big in (INT64_MAX + 1, 2**64, 10**30, INT64_MIN - 1):
        with pytest.raises(PayloadLimitError, match=rf"the integer {big} at \['a'\]\[1\]; send it as a string"):
            check_payload(f'{{"a": [0, {big}]}}'.encode())
        with pytest.raises(PayloadLimitError, match=rf"the integer {big} at \['a'\]\[1\]"):
            encode_payload({"a": [0, big]})
    with pytest.raises(PayloadLimitError, match=rf"the integer {2**64};"):
        encode_payload(2**64)


def test_non_json_bytes_are_a_payload_error() -> None:
    assert check_payload(b"") is None
    with pytest.raises(EventPayloadError, match="is not JSON"):
        check_payload(b"hello")
    with pytest.raises(EventPayloadError, match="is not JSON"):
        check_payload(b"[NaN]")


@pytest.mark.parametrize(("data", "named"), [
    (b'{"n": 1, "amount": 1e400}', "inf at ['amount']"), (b"[-1E999]", "-inf at [0]"),
    (b"1" + b"0" * 400 + b".0", "it has inf"),
])
def test_a_number_beyond_a_double_is_refused_not_made_null(data: bytes, named: str) -> None:
    """A raw publish of `1e400` read as infinity, which the signal's JSON then wrote as null."""
    with pytest.raises(PayloadLimitError, match="finite numbers") as err:
        check_payload(data)
    assert named in str(err.value)
    assert check_payload(b'{"x": 1e10, "s": "e"}') == {"x": 1e10, "s": "e"}


def test_the_ceiling_leaves_room_in_the_servers_one_mebibyte() -> None:
    assert DEFAULT_MAX_PAYLOAD < MAX_PAYLOAD_CEILING < 1024 * 1024


@pytest.mark.parametrize("check", [
    lambda v: validate_key(v), lambda v: validate_key(v, "scope"), lambda v: validate_run_id(v),
    lambda v: validate_child_key(v), lambda v: UserEventCondition(v), lambda v: UserEventCondition("k", scope=v),
], ids=["event key", "scope", "run id", "child key", "wait key", "wait scope"])
def test_a_name_that_becomes_a_subject_token_is_at_most_256_bytes(check: Any) -> None:
    check("k" * MAX_NAME_BYTES)
    check("é" * (MAX_NAME_BYTES // 2))
    for too_long in ("k" * (MAX_NAME_BYTES + 1), "é" * (MAX_NAME_BYTES // 2 + 1), "k" * 5000):
        with pytest.raises(ValueError, match=rf"is {len(too_long.encode())} bytes long .*at most {MAX_NAME_BYTES}"):
            check(too_long)


@pytest.mark.parametrize("check", [
    lambda v: validate_key(v), lambda v: validate_key(v, "scope"), lambda v: validate_run_id(v),
    lambda v: validate_child_key(v), lambda v: UserEventCondition(v), lambda v: UserEventCondition("k", scope=v),
], ids=["event key", "scope", "run id", "child key", "wait key", "wait scope"])
def test_a_name_with_a_control_character_is_refused(check: Any) -> None:
    # A newline or a NUL in an event key was stored (the events API answered 202), then broke
    # `bide events list`; the webhook's path refused the same key.
    check("order:paid é / ok")
    for bad, char in (("a\nb", "\n"), ("nul\x00", "\x00"), ("del\x7f", "\x7f")):
        with pytest.raises(ValueError, match=re.escape(f"holds the control character {char!r}")):
            check(bad)


@pytest.mark.parametrize("value,where", [
    (float("nan"), "nan"), ({"x": [1, float("inf")]}, "-?inf at \\['x'\\]\\[1\\]"), ([{"y": float("-inf")}], "-inf at"),
])
def test_a_number_json_cannot_hold_is_refused_not_turned_into_null(value: Any, where: str) -> None:
    with pytest.raises(PayloadLimitError, match=f"finite numbers .*{where}"):
        encode_payload(value, what="the payload of event k")
    assert encode_payload({"ok": None, "f": 1.5}) == b'{"ok":null,"f":1.5}'


def test_an_empty_run_id_is_refused_not_replaced() -> None:
    from sdk import Bide, EmptyModel

    bide = Bide("nats://127.0.0.1:1")  # never connects: the id is checked before anything is sent

    @bide.task(name="EmptyIdTask")
    async def task(input: EmptyModel, ctx: Any) -> None:
        return None

    with pytest.raises(ValueError, match="run id must be a non-empty string"):
        task._request(EmptyModel(), "")
    assert task._request(EmptyModel(), None).run_id


def test_an_input_that_is_not_json_is_the_callers_error() -> None:
    from sdk import Bide, InputValidationError

    bide = Bide("nats://127.0.0.1:1")  # never connects

    @bide.task(name="BytesInputTask")
    async def task(input: Any, ctx: Any) -> None:
        return None

    with pytest.raises(InputValidationError, match=r"input for task 'BytesInputTask' is not JSON-serialisable.*Pass a"):
        task._request(b"\x00raw", None)
