"""A Python client of a petribus gateway: sessions, their events, people's answers, and runs to a halt.

    from petribus.client import Client

    async with Client("http://127.0.0.1:8000") as client:
        s = await client.session("order_bot")            # a new session
        await s.add(UserName(name="alice"))              # or s.add("UserName", {"name": "alice"})
        done = await s.run(halt_after=["cancel_order"])  # until that transition completes
        print((await done.state()).counts())

``SyncClient`` offers the same calls, blocking, for code without an event loop. ``docs/client.md``
describes every call. It talks HTTP and WebSocket only (``httpx``, ``websockets``) and imports no
service; ``import petribus`` does not import it.
"""

from petribus.client._errors import (
    ClientError,
    Conflict,
    ConnectionLost,
    Invalid,
    NotFound,
    RunFailed,
    Unauthorized,
    Unavailable,
)
from petribus.client._event import Event
from petribus.client._session import Client, RunResult, Session, State, Step, Uploaded
from petribus.client._stream import EventStream
from petribus.client._sync import SyncClient, SyncSession

__all__ = ["Client", "ClientError", "Conflict", "ConnectionLost", "Event", "EventStream", "Invalid", "NotFound",
           "RunFailed", "RunResult", "Session", "State", "Step", "SyncClient", "SyncSession", "Unauthorized", "Unavailable",
           "Uploaded"]
