"""Which claims are in the log, as nats-server says the moment each is stored.

PB_EVENTS republishes the headers of every ``transition_fired`` it stores to
``pb.landed.<bot>.<session>`` (``bus.CLAIMS_LANDED``): its ``Nats-Msg-Id`` (``fire:<firing>``) and its
``Nats-Sequence``. A refused claim (another scheduler's landed first) is never stored, so never
republished. A scheduler sends a firing's work item together with its claim (``WorkItem.claim_pending``)
instead of after the claim's answer, and the executor runs it once its claim is known here: the claim's
round trip and the work item's overlap, and the run needs no read of the log.

What is known here is bounded (the newest ``KEEP`` claims) and may miss a claim stored while this
process was disconnected: a work item whose claim is not known within ``wait``'s timeout is decided by
the log, as any other delivery is.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from petribus import nats_direct, subjects

KEEP = 100_000  # claims remembered: about half a minute at 3,000 firings a second
CLAIM_PREFIX = "fire:"  # the Msg-Id of a claim: fire:<firing id> (scheduler)


class Landed:
    def __init__(self, nc: NATS, bot: str | None = None) -> None:
        self.nc = nc
        self.bot = bot  # a scoped executor's one bot: only its claims are sent here
        self._seqs: OrderedDict[str, int] = OrderedDict()  # firing id -> its claim's sequence
        self._waiting: dict[str, list[asyncio.Future[int]]] = {}

    async def start(self) -> None:
        await nats_direct.subscribe(self.nc, subjects.claims_landed(self.bot), self._on_msg)
        await self.nc.flush()  # subscribed at the server before the first work item is pulled

    def seq(self, firing_id: str) -> int | None:
        return self._seqs.get(firing_id)

    async def wait(self, firing_id: str, timeout: float) -> int | None:
        """The sequence of the firing's claim once it is stored, or None if that is not known here within
        ``timeout`` (refused, not stored yet, or missed)."""
        if (seq := self._seqs.get(firing_id)) is not None:
            return seq
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiters = self._waiting.setdefault(firing_id, [])
        waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return None
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._waiting.get(firing_id) is waiters:
                del self._waiting[firing_id]

    def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers or {}
        msg_id = headers.get("Nats-Msg-Id", "")
        seq = headers.get("Nats-Sequence")
        if not msg_id.startswith(CLAIM_PREFIX) or seq is None:
            return
        firing_id = msg_id[len(CLAIM_PREFIX):]
        self._seqs[firing_id] = int(seq)
        if len(self._seqs) > KEEP:
            self._seqs.popitem(last=False)
        for waiter in self._waiting.pop(firing_id, ()):
            if not waiter.done():
                waiter.set_result(int(seq))
