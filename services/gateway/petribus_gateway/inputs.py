"""What clients send, turned into events, or refused with an error a person can act on.

A client message is one JSON object: ``{"type": "user_message", "value": "..."}`` or
``{"type": "marker_added", "value": {"location": "UserName", "data": {...}}}``, with an optional
``request_id`` echoed in the metadata of what it causes. Anything else raises ``InvalidInput`` (with
a specific ``code``) and never reaches the log. The REST routes share the same constructors.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Message

from petribus.errors import InvalidInput
from petribus.events import Marker, MarkerAdded, UserMessage, _Event
from petribus.net import Net

CLIENT_TYPES = ("user_message", "marker_added")
ALLOWED_KEYS = {"type", "value", "request_id"}
EXAMPLE = '{"type": "user_message", "value": "hello"}'
MARKER_EXAMPLE = '{"type": "marker_added", "value": {"location": "<Location>", "data": {...}}}'


def snippet(value: Any, limit: int = 80) -> str:
    """A short, safe rendering of what the client sent, for error messages."""
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def frame_text(message: Message, max_bytes: int) -> str:
    """The text of one received WebSocket frame, or ``InvalidInput`` when it is too big or not UTF-8."""
    data: str | bytes | None = message.get("text")
    if data is None:
        data = message.get("bytes") or b""
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidInput(
            f"message of {size} bytes is larger than this gateway's limit of {max_bytes} bytes; "
            "send a smaller message (large inputs belong in files)",
            code="message_too_large",
        )
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            f"binary frame of {len(data)} bytes is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            f"send JSON as a text frame, like {EXAMPLE}",
            code="invalid_utf8",
        ) from None


def parse(text: str) -> dict[str, Any]:
    """One client message as a JSON object with a known shape (not yet checked against a net)."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"message is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
            f"{snippet(text)}; send one JSON object like {EXAMPLE}",
            code="invalid_json",
        ) from None
    if not isinstance(payload, dict):
        raise InvalidInput(
            f"message must be a JSON object, got {_kind(payload)} {snippet(payload)}; "
            f"send one like {EXAMPLE}",
            code="not_an_object",
        )
    extra = sorted(set(payload) - ALLOWED_KEYS)
    if extra:
        raise InvalidInput(
            f"message has unknown field(s) {extra}; a message has only {sorted(ALLOWED_KEYS)}",
            code="unknown_field",
        )
    kind = payload.get("type")
    if kind not in CLIENT_TYPES:
        got = "no 'type'" if "type" not in payload else f"type {snippet(kind)}"
        raise InvalidInput(
            f"message has {got}; send one of {list(CLIENT_TYPES)}, like {EXAMPLE}", code="unknown_type"
        )
    request_id = payload.get("request_id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(
            f"request_id must be a string, got {_kind(request_id)} {snippet(request_id)}",
            code="invalid_value",
        )
    return payload


def to_event(net: Net, session_id: str, payload: dict[str, Any]) -> _Event:
    """The event a parsed client message asks for, validated against ``net``."""
    value = payload.get("value")
    request_id = payload.get("request_id")
    got = _described(payload)
    if payload["type"] == "user_message":
        if not isinstance(value, str):
            raise InvalidInput(f"'user_message' needs a string value, got {got}; send {EXAMPLE}",
                               code="invalid_value")
        return user_message(net, session_id, value, request_id=request_id)
    if not (isinstance(value, dict) and isinstance(value.get("location"), str) and "data" in value
            and set(value) <= {"location", "data"}):
        raise InvalidInput(
            f"'marker_added' needs a value of the form {{\"location\": NAME, \"data\": {{...}}}}, "
            f"got {got}; send {MARKER_EXAMPLE}",
            code="invalid_value",
        )
    return marker_added(net, session_id, value["location"], value["data"], source="user",
                        request_id=request_id)


def user_message(net: Net, session_id: str, text: str, *, request_id: str | None = None) -> UserMessage:
    if not text.strip():
        raise InvalidInput("a user message needs some text; got an empty one", code="invalid_value")
    return UserMessage(bot=net.bot, session_id=session_id, text=text, request_id=request_id)


def marker_added(net: Net, session_id: str, location: str, data: Any, *, source: str,
                 request_id: str | None = None) -> MarkerAdded:
    """A user's marker, validated by its location's model (so it keeps its real types)."""
    try:
        validated = net.validate_marker(location, data, exposed_only=True)
    except InvalidInput as exc:
        raise type(exc)(
            f"{exc.message}; see each location's JSON schema at GET /bots", code=exc.code
        ) from None
    return MarkerAdded(bot=net.bot, session_id=session_id, source=source,  # type: ignore[arg-type]
                       marker=Marker(location=location, data=validated), request_id=request_id)


def _described(payload: dict[str, Any]) -> str:
    if "value" not in payload:
        return "no value"
    value = payload["value"]
    return "null" if value is None else f"{_kind(value)} {snippet(value)}"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
