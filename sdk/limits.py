"""Payload limits, checked where data comes in: size, nesting depth and integer range.

Everything a user hands Bide (an event's payload, a run's input, a task's or memo's
result) ends up inside one of Bide's own messages: a history entry, an inbox signal, an
activation. A payload that fits the server's ``max_payload`` (1 MiB by default) on its
own can fail later, inside Bide, once it is wrapped. So every way in checks the same
limits up front, here, and says which limit was hit and by what (invariant 8: bad input
gets a clear error and loses nothing):

- size: the payload's JSON encoding is at most ``PayloadLimits.max_bytes``
  (``BIDE_MAX_PAYLOAD``, default 256 KiB, at most :data:`MAX_PAYLOAD_CEILING`);
- depth: arrays and objects nest at most :data:`MAX_DEPTH` levels (the JSON decoders on
  Bide's read paths stop at about 200, and the envelopes add a few);
- integers: within int64, the range CEL compares (a larger one fails every expression
  that reads it, or cannot be encoded at all).

The module is pure (no I/O): the SDK, the HTTP API, the CLI and the event router all
call it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import pydantic_core

from sdk.errors import EventPayloadError, PayloadLimitError, PayloadTooLargeError

KIB = 1024
DEFAULT_MAX_PAYLOAD = 256 * KIB
"""Default size limit: a quarter of the server's 1 MiB, so a wait on several events or a
workflow's combined results still fit in one message."""
MAX_PAYLOAD_CEILING = 768 * KIB
"""The largest size limit that may be configured: the server's 1 MiB ``max_payload`` less
room for Bide's envelope (headers, the signal or entry around the payload, trace context)."""
MIN_PAYLOAD = 1 * KIB
MAX_DEPTH = 64
"""Deepest nesting of arrays and objects accepted."""
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|k|mb|mib|m|gb|gib|g)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 1000, "k": KIB, "kib": KIB, "mb": 1000 * 1000, "m": KIB * KIB, "mib": KIB * KIB,
          "gb": 1000**3, "g": KIB**3, "gib": KIB**3}


def parse_size(text: str | int, what: str = "BIDE_MAX_PAYLOAD") -> int:
    """Bytes from ``262144``, ``256KiB`` (or ``256k``), ``500KB``, ``1MiB`` or ``1GiB``; whole numbers only."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.match(str(text))
    if m is None:
        raise ValueError(f"{what}={text!r} is not a size; write bytes or a whole number with a unit, "
                         "such as 262144, 256KiB or 512KB")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").lower() or None]


def format_size(n: int) -> str:
    """``262,144 bytes (256 KiB)``: exact, and readable."""
    if n >= KIB and n % KIB == 0:
        unit = f"{n // (KIB * KIB)} MiB" if n % (KIB * KIB) == 0 else f"{n // KIB} KiB"
        return f"{n:,} bytes ({unit})"
    return f"{n:,} bytes"


@dataclass(frozen=True)
class PayloadLimits:
    """The limits one deployment checks (from :class:`sdk.config.BideConfig`)."""

    max_bytes: int = DEFAULT_MAX_PAYLOAD
    max_depth: int = MAX_DEPTH

    def __post_init__(self) -> None:
        if not MIN_PAYLOAD <= self.max_bytes <= MAX_PAYLOAD_CEILING:
            raise ValueError(f"the payload limit (BIDE_MAX_PAYLOAD) must be between {format_size(MIN_PAYLOAD)} "
                             f"and {format_size(MAX_PAYLOAD_CEILING)}, got {format_size(self.max_bytes)}")
        if not 1 <= self.max_depth <= MAX_DEPTH:
            raise ValueError(f"max_depth must be between 1 and {MAX_DEPTH}, got {self.max_depth}")


DEFAULT_LIMITS = PayloadLimits()
CEILING_LIMITS = PayloadLimits(max_bytes=MAX_PAYLOAD_CEILING)
"""What a value is held to where no configuration is at hand (a memo's result): the envelope must fit."""


_MAY_OVERFLOW = re.compile(rb"[eE]|[0-9]{300}")
"""What a JSON number beyond a double's range needs: an exponent, or over 300 digits."""


def check_payload(data: bytes, limits: PayloadLimits = DEFAULT_LIMITS, what: str = "the payload") -> Any:
    """Check published bytes against ``limits`` and return the JSON value they hold.

    For bytes from outside the SDK: an HTTP body, a raw ``nats pub``. Empty bytes are ``None``.

    Raises:
        PayloadTooLargeError: ``data`` is larger than ``limits.max_bytes``.
        PayloadLimitError: nested deeper than ``limits.max_depth``, or an integer outside int64.
        EventPayloadError: ``data`` is not JSON (the message says where).
    """
    if len(data) > limits.max_bytes:
        raise _too_large(what, len(data), limits)
    if not data.strip():
        return None
    try:
        # Not orjson.loads: it turns an integer beyond 64 bits into a float silently,
        # and this check must see the integer to refuse it.
        value = pydantic_core.from_json(data, allow_inf_nan=False)
    except ValueError as e:
        if "recursion limit" in str(e):
            raise PayloadLimitError(what, f"{limits.max_depth} levels of nesting",
                                    "more than 200 levels of nested arrays or objects") from None
        raise EventPayloadError(f"{what} is not JSON: {e}") from None
    _check_value(value, limits, what)
    if _MAY_OVERFLOW.search(data):  # `1e400` reads as infinity, which JSON cannot hold: never made null
        _refuse_non_finite(value, what)
    return value


def encode_payload(value: Any, limits: PayloadLimits = DEFAULT_LIMITS, what: str = "the payload") -> bytes:
    """``value`` (JSON data) as JSON bytes, checked against ``limits``.

    Raises:
        PayloadTooLargeError / PayloadLimitError: as :func:`check_payload`.
        TypeError: ``value`` is not JSON data (the caller says so in its own terms).
    """
    return checked_json(value, limits, what)[0]


def checked_json(value: Any, limits: PayloadLimits, what: str, default: Any = None) -> tuple[bytes, Any]:
    """``value`` as checked JSON bytes and as plain JSON data (what a round trip through JSON gives)."""
    try:
        data = orjson.dumps(value, default=default)
    except TypeError:
        # orjson refuses integers beyond 64 bits and nesting past 254: say which and where.
        _check_value(value, limits, what)
        raise
    if len(data) > limits.max_bytes:
        raise _too_large(what, len(data), limits)
    if b"null" in data:  # orjson writes NaN and infinities as null: refuse them rather than change the data
        _refuse_non_finite(value, what)
    plain = orjson.loads(data)  # exact here: orjson wrote no integer beyond 64 bits
    _check_value(plain, limits, what)
    return data, plain


def _refuse_non_finite(value: Any, what: str) -> None:
    """A float that JSON cannot hold (NaN, an infinity), named with where it is."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            where = f" at {_short(path)}" if path else ""
            raise PayloadLimitError(what, "finite numbers (JSON has no NaN or infinity)", f"{node}{where}",
                                    hint="send it as a string, or as null yourself")
        if isinstance(node, dict):
            stack.extend((child, f"{path}[{k!r}]") for k, child in node.items())
        elif isinstance(node, list | tuple):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(node))


def _too_large(what: str, size: int, limits: PayloadLimits) -> PayloadTooLargeError:
    # A step's result is held to the ceiling, which no setting raises: naming the setting would mislead.
    source = "the most any payload may be" if limits == CEILING_LIMITS else "BIDE_MAX_PAYLOAD"
    return PayloadTooLargeError(what, f"{format_size(limits.max_bytes)} ({source})", f"{format_size(size)} as JSON")


def check_value(value: Any, limits: PayloadLimits = DEFAULT_LIMITS, what: str = "the payload") -> None:
    """Check decoded JSON data for depth and integer range (:class:`PayloadLimitError` if over)."""
    _check_value(value, limits, what)


def _check_value(value: Any, limits: PayloadLimits, what: str) -> None:
    """Depth and integer range, without recursion (a hostile payload may nest thousands deep)."""
    if not isinstance(value, dict | list | tuple):
        if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
            raise _int_error(what, value, "")
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.max_depth:
            _explain(value, limits, what)
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1))
            elif isinstance(child, int) and not INT64_MIN <= child <= INT64_MAX:
                _explain(value, limits, what)


def _explain(value: Any, limits: PayloadLimits, what: str) -> None:
    """Walk again, keeping paths, to name where the first violation is; then raise."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > limits.max_depth:
            raise PayloadLimitError(what, f"{limits.max_depth} levels of nesting",
                                    f"arrays or objects nested deeper, at {_short(path)}")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, child in items:
            sub = f"{path}[{k!r}]"
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1, sub))
            elif isinstance(child, int) and not INT64_MIN <= child <= INT64_MAX:
                raise _int_error(what, child, sub)


def _int_error(what: str, value: int, path: str) -> PayloadLimitError:
    where = f" at {_short(path)}" if path else ""
    shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:37]}..."
    return PayloadLimitError(what, f"integers within int64 ({INT64_MIN}..{INT64_MAX}), the range CEL compares",
                             f"the integer {shown}{where}", hint="send it as a string or a float")


def _short(path: str) -> str:
    return path if len(path) <= 80 else f"{path[:38]}...{path[-38:]}"


MAX_METADATA_KEYS = 64
"""Most keys a run's ``additional_metadata`` may hold."""
MAX_METADATA_BYTES = 4 * KIB
"""Largest ``additional_metadata`` as JSON: it is copied into every child's start and the runs index."""
MAX_METADATA_KEY_CHARS = 128


def validate_metadata(metadata: object, what: str = "additional_metadata") -> dict[str, str]:
    """A run's ``additional_metadata``: a flat object of string keys and string values, within bounds.

    Flat strings keep it cheap to copy into children and the runs index, and make it filterable
    with ``key=value`` (``bide runs list --meta``).
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"{what} must be a mapping of strings to strings, got {type(metadata).__name__}")
    out: dict[str, str] = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not k or len(k) > MAX_METADATA_KEY_CHARS:
            raise ValueError(f"{what}: key {k!r} must be a non-empty string of at most "
                             f"{MAX_METADATA_KEY_CHARS} characters")
        if not isinstance(v, str):
            raise ValueError(f"{what}: the value of key {k!r} must be a string, got {type(v).__name__} {v!r:.80}")
        out[k] = v
    if len(out) > MAX_METADATA_KEYS:
        raise ValueError(f"{what} has {len(out)} keys, more than the {MAX_METADATA_KEYS} allowed")
    size = len(orjson.dumps(out))
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"{what} is {format_size(size)} as JSON, over the {format_size(MAX_METADATA_BYTES)} allowed")
    return out


def string_metadata(metadata: Mapping[str, Any], drop: frozenset[str] = frozenset()) -> dict[str, str]:
    """The string values of an event's metadata (what a run it starts inherits), within the bounds.

    An event's metadata may be any JSON object; only its string values carry over, and keys past
    the bounds of :func:`validate_metadata` are left out rather than refusing the start.
    """
    out: dict[str, str] = {}
    size = 2
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str) or k in drop or not k or len(k) > MAX_METADATA_KEY_CHARS:
            continue
        size += len(orjson.dumps(k)) + len(orjson.dumps(v)) + 2
        if len(out) >= MAX_METADATA_KEYS or size > MAX_METADATA_BYTES:
            break
        out[k] = v
    return out


MAX_NAME_BYTES = 256
"""The longest event key, scope, event name, chosen run id or child key, in UTF-8 bytes.

Each becomes one subject token (escaped, up to three times as long), and a subject with its
reply must fit nats-server's 4 KiB protocol line: a longer one made the server close the
client's connection, and the caller saw a timeout ten seconds later that named nothing."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(value: str, what: str) -> str:
    """``value`` if it is at most :data:`MAX_NAME_BYTES` long with no control character, else a ``ValueError``.

    A newline or a NUL in a key was stored, then broke every table that lists it (and the
    webhook's path refused what the events API took)."""
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise ValueError(f"{what} {value[:48]!r}... is {size} bytes long (UTF-8); at most {MAX_NAME_BYTES} are "
                         "allowed (it becomes part of a NATS subject)")
    if (bad := _CONTROL.search(value)) is not None:
        raise ValueError(f"{what} {value[:48]!r} holds the control character {bad.group()!r} at {bad.start()}; "
                         "names may hold any other character")
    return value
