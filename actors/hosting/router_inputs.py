"""What hosts publish to the event router: wait registrations (and cancellations) for a wait's event conditions."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.msg import Msg

from actors.engine.wire import HDR_MSG_ID, HDR_TTL, WaitCondition, WaitRegistered, WaitRegistration
from actors.store.jetstream import Layout
from actors.store.requests import Publisher, SameCheck
from sdk import _cel


def registrations(
    wait: WaitRegistered, run_id: str, task: str, run_input: Any, op: str = "register"
) -> list[tuple[str, WaitRegistration]]:
    """The router messages for a wait's event conditions (index = position in the flattened groups)."""
    out = []
    for idx, cond in enumerate(wait.flat()):
        if cond.kind == "event":
            out.append((cond.event_key or "", _registration(wait, idx, cond, run_id, task, run_input, op)))
    return out


def _registration(
    wait: WaitRegistered, idx: int, cond: WaitCondition, run_id: str, task: str, run_input: Any, op: str
) -> WaitRegistration:
    assert cond.event_key is not None
    return WaitRegistration(
        op="register" if op == "register" else "cancel",
        wait_id=wait.wait_id,
        cond=idx,
        run_id=run_id,
        task=task,
        event_key=cond.event_key,
        scope=cond.scope,
        expression=cond.expression if op == "register" else None,
        lookback_s=cond.lookback_s if op == "register" else None,
        run_input=run_input if op == "register" and _cel.reads_run_input(cond.expression) else None,
    )


async def publish_registrations(
    pub: Publisher,
    layout: Layout,
    wait: WaitRegistered,
    run_id: str,
    task: str,
    run_input: Any,
    op: str,
    skip: set[int | None] | None = None,
) -> None:
    """Register (or cancel) a wait's event conditions with the router. Safe to repeat.

    Both go under the registration's message id, ``register:<wait>/<cond>``. A withdrawal then
    holds that id for the stream's de-duplication window (2 minutes), so a registration that
    lands after it (a dead turn's, published before its host died and held through a reconnect
    or an election) is a duplicate the server drops, not a wait the router would keep for ever.
    A withdrawal that finds the registration itself holding the id (registered within the
    window) is stored under an id of its own (:meth:`Publisher.publish`'s ``same``).
    """
    s = layout.subjects
    sends = []
    for key, reg in registrations(wait, run_id, task, run_input, op):
        if skip and reg.cond in skip:
            continue
        headers = {HDR_MSG_ID: f"register:{wait.wait_id}/{reg.cond}"}
        same = None
        if op == "register":
            # Waits outlive the events' max age (a wait may last a week).
            headers[HDR_TTL] = "never"
        else:
            same = _is_withdrawal(reg.wait_id, reg.cond)
        sends.append(pub.publish(s.waits(key), reg.model_dump_json(exclude_none=True).encode(), headers, same=same))
    await asyncio.gather(*sends)


def _is_withdrawal(wait_id: str, cond: int) -> SameCheck:
    """Whether the first copy holding a withdrawal's id is that withdrawal (a retry of it), not the registration.

    One no longer stored was either, deleted by the router: the withdrawal is sent again, and
    the router deletes a withdrawal of a wait it does not hold.
    """
    async def same(first: Msg | None, _seq: int) -> bool:
        if first is None:
            return False
        try:
            held = WaitRegistration.model_validate_json(first.data)
        except ValueError:
            return False
        return held.op == "cancel" and held.wait_id == wait_id and held.cond == cond

    return same


