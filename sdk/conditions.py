"""Conditions a durable task (or a DAG task) waits for: sleeps, user events, parent outputs.

``ctx.aio_wait_for(label, *conditions)`` resolves when *every* argument is satisfied;
an argument made with :func:`or_` is satisfied by the first of its conditions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sdk._cel import OUTPUT_NAMES, check_expression, is_trivial
from sdk.durations import parse_duration
from sdk.limits import check_name


@dataclass(frozen=True, init=False)
class SleepCondition:
    """Satisfied once ``duration`` has passed (measured from when the wait began, recorded once)."""

    duration: timedelta
    readable_data_key: str

    def __init__(self, duration: timedelta | float | str, readable_data_key: str | None = None) -> None:
        d = parse_duration(duration, "SleepCondition duration")
        object.__setattr__(self, "duration", d)
        object.__setattr__(self, "readable_data_key", readable_data_key or f"sleep:{d.total_seconds():g}s")


@dataclass(frozen=True, init=False)
class UserEventCondition:
    """Satisfied by an event with ``event_key`` (and ``scope``) whose payload passes ``expression``.

    Args:
        event_key: the key events are pushed with.
        expression: CEL over ``input`` (the event's payload) and ``event`` (the run's input).
        scope: only events pushed with this scope count; also what lookback reads.
        lookback_window: events pushed up to this long before the wait began count too.
        readable_data_key: the condition's name in the result (default: the event key); the third
            positional argument, as in ``UserEventCondition(EVENT_KEY, "", "event")``.
        match: a field that must be equal in the event's payload and the run's input
            (Inngest's ``match="data.userId"``).
    """

    event_key: str
    expression: str | None
    scope: str | None
    lookback_window: timedelta | None
    readable_data_key: str
    match: str | None

    def __init__(
        self,
        event_key: str,
        expression: str | None = None,
        readable_data_key: str | None = None,
        *,
        scope: str | None = None,
        lookback_window: timedelta | float | str | None = None,
        match: str | None = None,
    ) -> None:
        if not isinstance(event_key, str) or not event_key.strip():
            raise ValueError(f"event_key must be a non-empty string, got {event_key!r}")
        if scope is not None and (not isinstance(scope, str) or not scope):
            raise ValueError(f"scope must be a non-empty string or None, got {scope!r}")
        check_name(event_key, "event_key")
        if scope is not None:
            check_name(scope, "scope")
        if expression is not None:
            check_expression(expression)
            if is_trivial(expression):
                expression = None
        if match is not None and (not isinstance(match, str) or not all(match.split("."))):
            raise ValueError(f"match must be a dotted field path such as 'data.userId', got {match!r}")
        lookback = None if lookback_window is None else parse_duration(lookback_window, "lookback_window")
        object.__setattr__(self, "event_key", event_key)
        object.__setattr__(self, "expression", expression)
        object.__setattr__(self, "scope", scope)
        object.__setattr__(self, "lookback_window", lookback)
        object.__setattr__(self, "readable_data_key", readable_data_key or event_key)
        object.__setattr__(self, "match", match)


@dataclass(frozen=True)
class ParentCondition:
    """Satisfied when ``expression`` (CEL over ``output``, the parent's output) is true (DAG tasks)."""

    parent: Any
    expression: str
    readable_data_key: str | None = None

    def __post_init__(self) -> None:
        check_expression(self.expression, OUTPUT_NAMES)


Condition = SleepCondition | UserEventCondition | ParentCondition


@dataclass(frozen=True)
class OrGroup:
    """Satisfied by the first of its conditions."""

    conditions: tuple[Condition, ...] = field(default_factory=tuple)


def or_(*conditions: Condition) -> OrGroup:
    """Any one of ``conditions`` (the first to happen wins; the others are dropped)."""
    if not conditions:
        raise ValueError("or_() needs at least one condition")
    for c in conditions:
        if not isinstance(c, SleepCondition | UserEventCondition | ParentCondition):
            raise TypeError(f"or_() takes SleepCondition, UserEventCondition or ParentCondition, got {c!r}")
    return OrGroup(tuple(conditions))


def as_groups(conditions: tuple[Condition | OrGroup, ...]) -> list[list[Condition]]:
    """An AND of or-groups: a bare condition is a group of one."""
    if not conditions:
        raise ValueError("a wait needs at least one condition")
    groups: list[list[Condition]] = []
    for c in conditions:
        if isinstance(c, OrGroup):
            groups.append(list(c.conditions))
        elif isinstance(c, SleepCondition | UserEventCondition | ParentCondition):
            groups.append([c])
        else:
            raise TypeError(f"expected a condition or or_(...), got {c!r}")
    return groups
