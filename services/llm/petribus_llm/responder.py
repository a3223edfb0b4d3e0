"""The seam between the LLM service and whatever writes the bot's replies.

The service owns the bus (what to answer, exactly once, in order per session); a ``Responder`` owns
the words. It sees the net, the session's conversation (a fold of its log) and what to answer, an
``Ask``: a user's message, or a running transition's ``context.prompt``. It returns a ``Reply``: text,
the markers it proposes and the hand-offs to other bots it asks for. The service validates every proposed marker against the net before
anything enters the log, so a responder (a model) can never put an invalid marker there. A responder
that cannot answer raises an ``LLMError``; the service turns it into one ``error`` event.

While it writes a reply the user will see, a responder may hand pieces of it to ``on_delta`` (text and
its offset in the reply); the service shows them live. The pieces must add up to ``Reply.text``.

``OfflineResponder`` (no model configured) describes what the bot can do; ``OpenAIResponder`` talks
to any OpenAI-compatible endpoint. :func:`responder_for` picks one from the settings.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from petribus import logs
from petribus.net import Net
from petribus.settings import Settings

from petribus_llm import describe
from petribus_llm.errors import LLMOffline

if TYPE_CHECKING:
    from petribus_llm.conversation import Conversation

OnDelta = Callable[[str, int], Awaitable[None]]


@dataclass(frozen=True)
class ProposedMarker:
    """A marker a responder wants added; validated by the service before it is appended."""

    location: str
    data: dict[str, Any]


@dataclass(frozen=True)
class ProposedHandoff:
    """A hand-off a responder wants made: a new session of ``bot`` that starts with ``request``."""

    bot: str
    request: str


@dataclass(frozen=True)
class Reply:
    """What to say (or, for a prompt, answer), and the markers to add (in order) and the hand-offs to
    make before saying it."""

    text: str
    markers: tuple[ProposedMarker, ...] = field(default_factory=tuple)
    handoffs: tuple[ProposedHandoff, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Ask:
    """One thing to answer: a user's message, or a running transition's prompt."""

    id: str  # the user_message's or prompt_request's event id
    text: str
    seq: int  # where it is in the log: the conversation before it is its context
    kind: Literal["message", "prompt"] = "message"
    transition: str | None = None  # the transition that asks (prompts)
    shown: bool = True  # the reply goes to the user; False: back to a transition that waits for it


class Responder(Protocol):
    """Writes the reply to one ask. Must not touch the bus: the service appends."""

    async def respond(self, net: Net, conversation: "Conversation", ask: Ask,
                      on_delta: OnDelta | None) -> Reply: ...

    async def aclose(self) -> None: ...


class OfflineResponder:
    """No model: every message is answered with what the bot can do and how to drive it by hand."""

    def __repr__(self) -> str:
        return "OfflineResponder()"

    async def respond(self, net: Net, conversation: "Conversation", ask: Ask,
                      on_delta: OnDelta | None) -> Reply:
        if ask.kind == "prompt":
            raise LLMOffline(
                f"context.prompt from {ask.transition or 'a transition'} needs a language model, and this "
                "LLM service runs without one: set OPENAI_API_KEY (with Bot(model=...)) or OPENAI_BASE_URL "
                "(a local server) where the LLM service runs"
            )
        intro = (
            "I'm running without a language model, so I can't understand free text yet. "
            "You can drive the bot with commands."
        )
        return Reply(f"{intro}\n\n{describe.capabilities(net)}")

    async def aclose(self) -> None:
        pass


def responder_for(settings: Settings, net: Net) -> Responder:
    """The OpenAI-compatible responder when a key or a base URL is set, the bot's own (``Bot(api_key=,
    base_url=)``) or the environment's, and a model named; else offline."""
    if net.api_key is None and not net.base_url and settings.openai_api_key is None \
            and not settings.openai_base_url:
        return OfflineResponder()
    if not (settings.llm_model or net.model):
        logs.get("petribus.llm").warning(
            "no model named: answering offline; set Bot(model=...) or PETRIBUS_LLM_MODEL", bot=net.bot)
        return OfflineResponder()
    from petribus_llm.openai_responder import OpenAIResponder

    return OpenAIResponder(settings, net)
