"""The seam between the LLM service and whatever writes the bot's replies.

The service owns the bus (what to answer, exactly once, in order per session); a ``Responder`` owns
the words. It sees the net, the session's folded state and the user's message, and returns a
``Reply``: text for the user and markers it proposes. The service validates every proposed marker
against the net before anything enters the log, so a responder (a model) can never put an invalid
marker there.

``OfflineResponder`` (no model configured) describes what the bot can do. An OpenAI-compatible
responder (later) implements the same Protocol and is chosen by :func:`responder_for`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from petribus.core import SessionState
from petribus.events import UserMessage
from petribus.net import Net
from petribus.settings import Settings

from petribus_llm import describe


@dataclass(frozen=True)
class ProposedMarker:
    """A marker a responder wants added; validated by the service before it is appended."""

    location: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """What to say to the user, and the markers to add (in order) before saying it."""

    text: str
    markers: tuple[ProposedMarker, ...] = field(default_factory=tuple)


class Responder(Protocol):
    """Writes the reply to one user message. Must not touch the bus: the service appends."""

    async def respond(self, net: Net, state: SessionState, message: UserMessage) -> Reply: ...


class OfflineResponder:
    """No model: every message is answered with what the bot can do and how to drive it by hand."""

    async def respond(self, net: Net, state: SessionState, message: UserMessage) -> Reply:
        intro = (
            "I'm running without a language model, so I can't understand free text yet. "
            "You can drive the bot with commands."
        )
        return Reply(f"{intro}\n\n{describe.capabilities(net)}")


def responder_for(settings: Settings, net: Net) -> Responder:
    """The responder for ``net``. Offline until the OpenAI path lands (it will need a key and a model)."""
    return OfflineResponder()
