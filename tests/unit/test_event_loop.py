"""The loop a host process runs on (``BIDE_EVENT_LOOP``)."""

from __future__ import annotations

import asyncio

import pytest

from actors.hosting import event_loop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_a_host_runs_on_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BIDE_EVENT_LOOP", raising=False)
    assert event_loop.run(_loop_module()).startswith("uvloop")


def test_asyncio_s_own_loop_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDE_EVENT_LOOP", "asyncio")
    assert event_loop.run(_loop_module()).startswith("asyncio")


def test_an_unknown_loop_is_refused_by_name_and_the_coroutine_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIDE_EVENT_LOOP", "tokio")
    main = _loop_module()
    with pytest.raises(ValueError, match=r"BIDE_EVENT_LOOP='tokio' must be one of uvloop, asyncio"):
        event_loop.run(main)
    assert main.cr_frame is None  # closed: no "never awaited" warning
