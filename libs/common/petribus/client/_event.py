"""What a client receives: each event of a session's log as one small frozen object.

The gateway sends every event as ``{"type", "value", "metadata": {session_id, seq, event_id, task_id,
transition_name, request_id, ts}}`` (``petribus.events.to_client``). ``Event`` keeps that shape with
the metadata lifted to attributes; ``raw`` is the message exactly as it came, for anything new.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a session, as a client sees it.

    ``value`` depends on ``type`` (``docs/client.md`` lists them): the text of a ``user_message``, a
    ``{"location", "data"}`` for ``marker_added``, ``{"transition", "outputs"}`` for
    ``transition_completed``, ``{"code", "message"}`` for ``error``, and so on.
    """

    type: str
    value: Any
    seq: int | None = None
    """Position in the session's log; None for what is not in the log (``error`` replies to this
    client, ``agent_message_delta``)."""
    session_id: str | None = None
    event_id: str | None = None
    task_id: str | None = None
    """The firing it belongs to: what ``accept``/``reject`` take for a ``confirm_transition``."""
    transition: str | None = None
    request_id: str | None = None
    """The request it answers (a client message's or REST write's key), or names (a ``confirm_request``)."""
    ts: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def final(self) -> bool:
        """For a ``transition_failed``: no retry follows (its markers went back). False otherwise."""
        return self.type == "transition_failed" and bool(
            self.value.get("final", True) if isinstance(self.value, dict) else True)

    @property
    def handoff(self) -> tuple[str, str] | None:
        """For a ``handed_off``: (bot, session id) of the session the conversation went on in
        (``Session.follow_handoff`` opens it). None otherwise."""
        if self.type == "handed_off" and isinstance(self.value, dict):
            return str(self.value["bot"]), str(self.value["session_id"])
        return None

    @property
    def parent(self) -> dict[str, Any] | None:
        """For the ``session_created`` of a handed-over session: where it came from (``bot``,
        ``session_id``, ``seq`` of the user message whose answer handed over, and ``handoff_id``, the id
        of the ``handed_off`` event there). None otherwise."""
        parent = (self.raw.get("metadata") or {}).get("parent")
        return parent if isinstance(parent, dict) else None

    @property
    def error_code(self) -> str | None:
        """For an ``error``: its stable code (``bus_unavailable``, ``already_answered``...); else None."""
        if self.type == "error" and isinstance(self.value, dict):
            return self.value.get("code")
        return None


def decode(message: dict[str, Any]) -> Event:
    """``message`` (the gateway's client shape) as an ``Event``; a field it lacks is None."""
    meta = message.get("metadata") or {}
    value = message.get("value")
    named = value.get("transition") if isinstance(value, dict) else None
    return Event(
        type=str(message.get("type", "")), value=value, seq=meta.get("seq"), session_id=meta.get("session_id"),
        event_id=meta.get("event_id"), task_id=meta.get("task_id"),
        transition=meta.get("transition_name") or named, request_id=meta.get("request_id"), ts=meta.get("ts"),
        raw=message,
    )
