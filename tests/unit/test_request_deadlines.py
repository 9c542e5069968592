"""The one timer behind a connection's request timeouts (``actors.store.requests._Deadlines``)."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest

from actors.store.requests import _Deadlines


async def _expired_after(deadlines: _Deadlines, token: str, timeout: float) -> float:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    began = loop.time()
    deadlines.add(token, timeout, fut)
    with pytest.raises(nats.errors.TimeoutError):
        await fut
    return loop.time() - began


async def test_each_timeout_fails_its_request_never_before_its_deadline() -> None:
    deadlines = _Deadlines(asyncio.get_running_loop())
    # Mixed timeouts, the longer ones first: the timer must be brought forward for the shorter.
    timeouts = [0.2, 0.05, 0.12, 0.05, 0.01, 0.2]
    waited = await asyncio.gather(*(_expired_after(deadlines, f"t{i}", t) for i, t in enumerate(timeouts)))
    for timeout, took in zip(timeouts, waited, strict=True):
        assert timeout <= took < timeout + 0.1, (timeout, took)


async def test_an_answered_or_dropped_request_is_not_failed() -> None:
    loop = asyncio.get_running_loop()
    deadlines = _Deadlines(loop)
    answered: asyncio.Future[str] = loop.create_future()
    dropped: asyncio.Future[str] = loop.create_future()
    deadlines.add("a", 0.02, answered)
    deadlines.add("d", 0.02, dropped)
    answered.set_result("reply")
    deadlines.drop("d", 0.02)
    await _expired_after(deadlines, "later", 0.05)  # the timer has passed both deadlines
    assert answered.result() == "reply"
    assert not dropped.done()
    assert not deadlines._queues, "nothing left waiting"


async def test_steady_requests_share_one_timer() -> None:
    loop = asyncio.get_running_loop()
    deadlines = _Deadlines(loop)
    timers: list[object] = []
    for i in range(1000):
        fut: asyncio.Future[None] = loop.create_future()
        deadlines.add(str(i), 10.0, fut)
        timers.append(deadlines._timer)
        fut.set_result(None)
        deadlines.drop(str(i), 10.0)
    assert len({id(t) for t in timers}) == 1
    assert deadlines._timer is not None
    deadlines._timer.cancel()
