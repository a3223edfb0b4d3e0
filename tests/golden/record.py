"""Record the golden sessions of ``tests/golden/*.jsonl`` again: ``.venv/bin/python -m tests.golden.record``.

Each session is played against a real nats-server and the in-process stack (scheduler, executor,
gateway; ``tests/harness.py``) by a client over the WebSocket and REST, waited on until it is at rest,
and exported with ``petribus sessions export``'s code. ``tests/test_replay.py`` replays each with its app
and expects 0 differences, so re-record them when a change of an app is meant to change its decisions
(and say so in the commit).

- ``hitl.jsonl`` (``apps/hitl_bot.py``): a confirm accepted, one rejected, a rejected ticket that another
  transition then takes, ``context.confirm`` answered, a file uploaded and sent back, a file sent.
- ``counter.jsonl`` (``apps/counter.py:bot``): five items at once, a join, a left without its right.
- ``guarded.jsonl`` (``apps/counter.py:guarded``): a guard that takes one order, refuses one, raises on one.
- ``shop.jsonl`` (``apps/replay_shop.py``): a fan-out into a join of three, a two-input join, a firing
  retried once, one that fails for good, a guarded confirm accepted, one rejected, one the guard refuses.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from petribus import bus
from petribus.export import dump
from petribus.settings import Settings
from petribus_cli.sessions import read_session

from tests.harness import Client, Stack, session_state

HERE = Path(__file__).parent
APPS = HERE.parent / "apps"
PARTS = ("scheduler", "executor", "gateway")


def _marker(location: str, **data: Any) -> dict[str, Any]:
    return {"type": "marker_added", "value": {"location": location, "data": data}}


def _is(kind: str, **value: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["type"] == kind and all(e["metadata"].get(k) == v for k, v in value.items())


async def _settled(nc: Any, bot: str, sid: str, done: Callable[[Any], bool]) -> None:
    """Wait until the session's fold satisfies ``done`` and nothing is in flight but what waits for a person."""
    async with asyncio.timeout(60):
        while True:
            state, _ = await session_state(nc, bot, sid)
            if done(state) and all(f.status == "awaiting_confirmation" for f in state.in_flight.values()):
                return
            await asyncio.sleep(0.1)


async def hitl(stack: Stack, http: httpx.AsyncClient, nc: Any, tmp: Path) -> tuple[str, str]:
    client = await Client.connect(stack.ws_url("hitl"))
    sid = (await client.recv())["value"]
    try:
        await client.send(_marker("Order", id=1))
        ask = await client.until(_is("confirm_transition", transition_name="cancel"))
        await client.send({"type": "accept_transition", "value": ask["metadata"]["task_id"]})
        await client.until(_is("transition_completed", transition_name="cancel"))

        await client.send(_marker("Order", id=2))
        ask = await client.until(_is("confirm_transition", transition_name="cancel"))
        await client.send({"type": "reject_transition", "value": {"task_id": ask["metadata"]["task_id"],
                                                                   "reason": "not this one"}})
        await client.until("reject_transition")

        await client.send(_marker("Ticket", id=7))
        ask = await client.until(_is("confirm_transition", transition_name="escalate"))
        await client.send({"type": "reject_transition", "value": ask["metadata"]["task_id"]})
        await client.until(_is("transition_completed", transition_name="close"))

        await client.send(_marker("Refund", amount=10))
        question = await client.until("confirm_request")
        await client.send({"type": "confirm_response",
                           "value": {"request_id": question["metadata"]["request_id"], "accepted": True}})
        await client.until(_is("transition_completed", transition_name="refund"))

        await client.send(_marker("Upload", description="your receipt"))
        request = (await client.until("input_file_request"))["value"]
        up = await http.put(request["upload_url"], params={"name": "receipt.txt"}, content=b"golden receipt\n" * 40,
                            headers={"content-type": "text/plain"})
        up.raise_for_status()
        await client.until(_is("transition_completed", transition_name="echo_file"))

        await client.send(_marker("Blob", size=70_000))  # more than one chunk line of the export
        await client.until(_is("transition_completed", transition_name="send_blob"))
    finally:
        await client.close()
    await _settled(nc, "hitl", sid, lambda s: len(s.files) == 3)
    return "hitl", sid


async def counter(stack: Stack, http: httpx.AsyncClient, nc: Any, tmp: Path) -> tuple[str, str]:
    client = await Client.connect(stack.ws_url("counter"))
    sid = (await client.recv())["value"]
    try:
        for n in range(5):
            await client.send(_marker("Item", n=n))
        await client.send(_marker("Left", v=1))
        await client.send(_marker("Right", v=2))
        await client.until(_is("transition_completed", transition_name="join"))
        await client.send(_marker("Left", v=3))  # no right comes for it
        await client.until(lambda e: e["type"] == "marker_added" and e["value"]["data"] == {"v": 3})
    finally:
        await client.close()
    await _settled(nc, "counter", sid, lambda s: len(s.finished) == 6)
    return "counter", sid


async def guarded(stack: Stack, http: httpx.AsyncClient, nc: Any, tmp: Path) -> tuple[str, str]:
    client = await Client.connect(stack.ws_url("guarded"))
    sid = (await client.recv())["value"]
    try:
        for amount in (150, 13, 5):  # refused, raises, taken
            await client.send(_marker("Order", amount=amount))
        await client.until(_is("transition_completed", transition_name="approve"))
    finally:
        await client.close()
    await _settled(nc, "guarded", sid, lambda s: len(s.finished) == 1 and len(s.marking().get("Order", [])) == 2)
    return "guarded", sid


async def shop(stack: Stack, http: httpx.AsyncClient, nc: Any, tmp: Path) -> tuple[str, str]:
    client = await Client.connect(stack.ws_url("shop"))
    sid = (await client.recv())["value"]
    try:
        await client.send(_marker("Order", id=1, items=3))
        await client.send(_marker("Label", order=1))
        await client.until(_is("transition_completed", transition_name="ship"))

        await client.send(_marker("Flaky", counter=str(tmp / "once"), fail_times=1))
        await client.until(_is("transition_completed", transition_name="courier"))
        await client.send(_marker("Flaky", counter=str(tmp / "always"), fail_times=5))
        await client.until(lambda e: e["type"] == "transition_failed" and e["value"]["final"])

        await client.send(_marker("Refund", amount=50))
        ask = await client.until(_is("confirm_transition", transition_name="refund"))
        await client.send({"type": "accept_transition", "value": ask["metadata"]["task_id"]})
        await client.until(_is("transition_completed", transition_name="refund"))
        await client.send(_marker("Refund", amount=60))
        ask = await client.until(_is("confirm_transition", transition_name="refund"))
        await client.send({"type": "reject_transition", "value": ask["metadata"]["task_id"]})
        await client.until("reject_transition")
        await client.send(_marker("Refund", amount=500))  # the guard refuses it: it stays
        await client.until(lambda e: e["type"] == "marker_added" and e["value"]["data"] == {"amount": 500})
    finally:
        await client.close()
    await _settled(nc, "shop", sid, lambda s: len(s.marking().get("Refund", [])) == 2)
    return "shop", sid


SESSIONS: dict[str, tuple[str, Callable[..., Awaitable[tuple[str, str]]]]] = {
    "hitl": (f"{APPS / 'hitl_bot.py'}:bot", hitl),
    "counter": (f"{APPS / 'counter.py'}:bot", counter),
    "guarded": (f"{APPS / 'counter.py'}:guarded", guarded),
    "shop": (f"{APPS / 'replay_shop.py'}:bot", shop),
}


async def record(names: list[str]) -> None:
    from petribus.embedded import NatsServer

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        server = NatsServer(tmp / "nats", sync_interval="1s").start()
        try:
            settings = Settings(nats_url=server.url, data_dir=tmp / "data", port=0, workers=2,
                                retry_backoff_s=0.2)
            apps = sorted({SESSIONS[name][0] for name in names})
            async with Stack(settings, apps, parts=PARTS) as stack:
                nc = await bus.connect(server.url, name="golden")
                try:
                    async with httpx.AsyncClient(base_url=stack.gateway.url, timeout=30) as http:
                        for name in names:
                            bot, sid = await SESSIONS[name][1](stack, http, nc, tmp)
                            export = await read_session(nc, sid, bot=bot)
                            (HERE / f"{name}.jsonl").write_bytes(b"".join(dump(export)))
                            print(f"{name}.jsonl: {len(export.events)} events, {len(export.files)} files")
                finally:
                    await nc.close()
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(record(sys.argv[1:] or list(SESSIONS)))
