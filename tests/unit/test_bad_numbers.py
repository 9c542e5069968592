"""Numbers out of range are refused where they come in, by name: NaN, infinities, past 100 years, below 1."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest

from actors.apps.cli import main as cli_main
from actors.apps.processes import MAX_PROCESSES, parse_count
from sdk import Bide, Context
from sdk.durations import parse_duration


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e12, timedelta.max, "999999999d"])
def test_a_duration_that_is_not_finite_or_past_100_years_is_refused_by_name(value: object) -> None:
    # aio_sleep_for(nan) said "cannot convert float NaN to integer"; 1e12 s said "date value out of range".
    with pytest.raises(ValueError, match=r"^sleep (must be a finite number of seconds|.*is longer than 100 years)"):
        parse_duration(value, "sleep")  # type: ignore[arg-type]


@pytest.mark.parametrize(("option", "value"), [("backoff_factor", math.nan), ("backoff_factor", math.inf),
                                               ("backoff_max_seconds", math.nan)])
def test_a_backoff_that_is_not_a_finite_number_is_refused_when_the_task_is_defined(option: str, value: float) -> None:
    # backoff_factor=nan was accepted, and every turn after the first failure crashed.
    bide = Bide()
    with pytest.raises(ValueError, match=rf"^{option} of task 'Flaky' must be a finite number"):
        bide.task(name="Flaky", retries=2, **{option: value})(lambda input, ctx: None)


def test_worker_slots_must_be_whole_numbers_of_at_least_1() -> None:
    bide = Bide()

    @bide.task(name="Anything")
    def anything(input: dict[str, int], ctx: Context) -> None:
        return None

    for bad in (0, -5, "10", 2.5):
        with pytest.raises(ValueError, match=rf"worker 'w': slots must be a whole number of at least 1, got {bad!r}"):
            bide.worker("w", workflows=[anything], slots=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("flag", ["--slots", "--durable-slots"])
def test_bide_worker_refuses_slots_below_1(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    # `--slots -5` started a host that said it was ready and never took a run.
    with pytest.raises(SystemExit) as exit_:
        cli_main(["worker", "examples.durable.worker:worker", flag, "-5"])
    assert exit_.value.code == 2
    assert f"{flag}: must be a whole number of at least 1, got '-5'" in capsys.readouterr().err


def test_processes_are_bounded() -> None:
    # `--processes 999999999` built that many command lines until memory ran out.
    assert parse_count(str(MAX_PROCESSES), "--processes") == MAX_PROCESSES
    with pytest.raises(ValueError, match=rf"--processes must be a whole number from 1 to {MAX_PROCESSES}"):
        parse_count("999999999", "--processes")


def test_looking_up_a_run_refuses_an_empty_id_and_a_timeout_that_is_not_seconds() -> None:
    # runs.get('') said "subject token must not be empty"; aio_result(timeout='5s') a TypeError about float + str.
    bide = Bide("nats://127.0.0.1:1")  # never connects: both are checked before anything is sent
    for call in (bide.runs.get, bide.runs.cancel):
        with pytest.raises(ValueError, match=r"^run id must be a non-empty string, got ''"):
            call("")
    with pytest.raises(ValueError, match=r"^timeout must be a number of seconds \(at least 0\) or None, got '5s'"):
        bide.runs.result("some-run", timeout="5s")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "999999"])
def test_the_stream_check_interval_is_refused_by_name_outside_its_range(
        value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdk.config import BideConfig

    monkeypatch.setenv("BIDE_STREAM_CHECK_INTERVAL", value)
    with pytest.raises(ValueError, match=r"BIDE_STREAM_CHECK_INTERVAL=.* must be between 0.1 and 86400 seconds"):
        BideConfig.from_env()


@pytest.mark.parametrize("value", ["0", "0.5", "-1", "nan", "inf", "999999"])
def test_the_wakeup_check_interval_is_refused_by_name_outside_its_range(
        value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdk.config import BideConfig

    monkeypatch.setenv("BIDE_WAKEUP_CHECK_INTERVAL", value)
    with pytest.raises(ValueError, match=r"BIDE_WAKEUP_CHECK_INTERVAL=.* must be between 1 and 86400 seconds"):
        BideConfig.from_env()


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_bide_run_refuses_a_bad_timeout_before_it_starts_anything(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    # It started the run, then failed on the timeout: a user who retried left a run each time.
    # The parser refuses it, so nothing is started (no server is reachable here either).
    from actors.apps.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["run", "SomeTask", "--input", "{}", "--timeout", value])
    assert exited.value.code == 2
    assert f"--timeout: {value!r}: must be a number of seconds, at least 0" in capsys.readouterr().err
