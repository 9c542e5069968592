"""``BIDE_HISTORY_RETENTION``: the duration forms it accepts and the errors it gives."""

from __future__ import annotations

import pytest

from sdk.config import BideConfig, parse_duration


@pytest.mark.parametrize(("raw", "seconds"), [
    ("30d", 30 * 86400.0), ("2h", 7200.0), ("90m", 5400.0), ("5s", 5.0), ("3600", 3600.0),
    ("1.5h", 5400.0), (" 7 s ", 7.0), ("2D", 172800.0),
])
def test_duration_forms(raw: str, seconds: float) -> None:
    assert parse_duration(raw, "BIDE_HISTORY_RETENTION") == seconds


@pytest.mark.parametrize("raw", ["abc", "5x", "-5s", "0", "0s", "5 d s", "1e3", "inf", "nan", "5 days", "1h30m"])
def test_bad_durations_name_the_value_and_the_accepted_forms(raw: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_duration(raw, "BIDE_HISTORY_RETENTION")
    assert str(err.value) == (
        f"BIDE_HISTORY_RETENTION={raw!r} is not a positive duration: use a number of seconds or a number "
        "followed by s, m, h or d (for example 5s, 90m, 2h, 30d)")


def test_the_default_is_30_days_and_the_environment_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BIDE_HISTORY_RETENTION", raising=False)
    assert BideConfig.from_env().history_retention_s == 30 * 86400.0
    monkeypatch.setenv("BIDE_HISTORY_RETENTION", "")
    assert BideConfig.from_env().history_retention_s == 30 * 86400.0
    monkeypatch.setenv("BIDE_HISTORY_RETENTION", "90m")
    assert BideConfig.from_env().history_retention_s == 5400.0
    monkeypatch.setenv("BIDE_HISTORY_RETENTION", "soon")
    with pytest.raises(ValueError, match=r"BIDE_HISTORY_RETENTION='soon' is not a positive duration"):
        BideConfig.from_env()


@pytest.mark.parametrize("seconds", [0.5, 101 * 365 * 86400.0])
def test_a_retention_out_of_range_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match=r"history_retention_s=.* must be between 1 second and 100 years"):
        BideConfig(history_retention_s=seconds).validate()


def test_the_events_max_age_takes_a_duration_like_the_retention(monkeypatch: pytest.MonkeyPatch) -> None:
    """`BIDE_EVENTS_MAX_AGE=5s` was refused as "not a number" while the retention took `30d`."""
    for raw, seconds in (("5s", 5.0), ("12h", 43200.0), ("90", 90.0)):
        monkeypatch.setenv("BIDE_EVENTS_MAX_AGE", raw)
        assert BideConfig.from_env().events_max_age_s == seconds
    monkeypatch.setenv("BIDE_EVENTS_MAX_AGE", "soon")
    with pytest.raises(ValueError, match="BIDE_EVENTS_MAX_AGE='soon' is not a positive duration"):
        BideConfig.from_env()
