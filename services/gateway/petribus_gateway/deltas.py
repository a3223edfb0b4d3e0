"""Live pieces of the bot's replies (``agent_message_delta``) for one WebSocket connection.

The LLM service publishes them on the core NATS subject ``pb.delta.<bot>.<session>`` while the model
writes; they are not in the log. A connection subscribes for as long as it is open and puts each one in
its outbox, beside the log's events, so the connection's one writer sends both. Deltas are best
effort: when the client is too slow to keep the outbox from filling, a delta is dropped rather than
holding up the log's events; the whole reply arrives anyway as the ``agent_message`` named by
``metadata.event_id``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from petribus import subjects
from petribus.events import AgentMessageDelta


async def follow(nc: NATS, bot: str, session_id: str, outbox: asyncio.Queue[dict[str, Any]],
                 log: Any) -> Subscription | None:
    """Forward the session's deltas into ``outbox`` until unsubscribed; ``None`` if that cannot start."""

    async def on_msg(msg: Msg) -> None:
        try:
            delta = AgentMessageDelta.model_validate_json(msg.data)
        except ValidationError:
            log.warning("skipping malformed reply delta", subject=msg.subject)
            return
        try:
            outbox.put_nowait(delta.to_client())
        except asyncio.QueueFull:
            pass  # a slow client: the agent_message will carry the whole reply

    try:
        return await nc.subscribe(subjects.deltas(bot, session_id), cb=on_msg)
    except Exception as exc:  # disconnected: the client still gets every event of the log
        log.warning("cannot follow reply deltas", error=repr(exc))
        return None
