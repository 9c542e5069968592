"""What hosts publish to the event router: wait registrations (and cancellations) for a wait's event conditions."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.msg import Msg

from actors.engine.wire import HDR_MSG_ID, HDR_TTL, WaitCondition, WaitRegistered, WaitRegistration, utcnow
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
    registered_before: bool = False,
) -> None:
    """Register (or cancel) a wait's event conditions with the router. Safe to repeat.

    A registration goes under the message id ``register:<wait>/<cond>``, and the server drops
    another message under that id for the events stream's de-duplication window (10 minutes by
    default): a dead turn's registration of the same wait, landing late (held in its client
    through a reconnect, or committed after an election), is dropped while the first one holds
    the id. A withdrawal must hold it when no registration does, or the late one would be
    indexed after the withdrawal and kept for ever (the router deletes a withdrawal of a wait it
    does not hold): so a withdrawal goes under that id too, unless ``registered_before`` (the
    wait's registrations were stored before the append that recorded it) and that was recently
    enough for the window to still hold them; then under ``cancel:<wait>/<cond>``, one write as
    ever. One that finds the registration holding the id after all is stored under an id of its
    own (:meth:`Publisher.publish`'s ``same``): one get and one publish more.
    """
    s = layout.subjects
    held = registered_before and (utcnow() - wait.at).total_seconds() < layout.event_dedupe_window_s * _HELD_FOR
    sends = []
    for key, reg in registrations(wait, run_id, task, run_input, op):
        if skip and reg.cond in skip:
            continue
        cid = f"{wait.wait_id}/{reg.cond}"
        headers = {HDR_MSG_ID: f"register:{cid}"}
        same = None
        if op == "register":
            # Waits outlive the events' max age (a wait may last a week).
            headers[HDR_TTL] = "never"
        elif held:
            headers[HDR_MSG_ID] = f"cancel:{cid}"
        else:
            same = _is_withdrawal(reg.wait_id, reg.cond)
        sends.append(pub.publish(s.waits(key), reg.model_dump_json(exclude_none=True).encode(), headers, same=same))
    await asyncio.gather(*sends)


_HELD_FOR = 0.75
"""The part of the de-duplication window after a wait was recorded in which its registration is
taken to still hold its id (the rest: a margin for hosts' clocks against the server's)."""


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


