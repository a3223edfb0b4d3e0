"""What clients send, turned into events, or refused with an error a person can act on.

A client message is one JSON object with an optional ``request_id`` echoed in the metadata of what it
causes (and, for an add or a task answer, its idempotency key: see ``idempotency``):

- ``{"type": "user_message", "value": "..."}``
- ``{"type": "marker_added", "value": {"location": "UserName", "data": {...}}}``
- ``{"type": "accept_transition", "value": "<task id>"}`` (or ``{"task_id": ...}``)
- ``{"type": "reject_transition", "value": "<task id>"}`` (or ``{"task_id": ..., "reason": ...}``)
- ``{"type": "confirm_response", "value": {"request_id": "<id>", "accepted": true}}``

Anything else raises ``InvalidInput`` (with a specific ``code``) and never reaches the log. Answers are
then checked against the session's fold (``append_answer``): an unknown or already answered id is
refused too. The REST routes share the same constructors.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import Message

from petribus.answers import answer_once, to_confirmation, to_file_request, to_question
from petribus.bus import EventLog
from petribus.core import SessionState
from petribus.errors import InvalidInput
from petribus.events import (
    AcceptTransition,
    ConfirmResponse,
    InputFileResponse,
    Marker,
    MarkerAdded,
    RejectTransition,
    UserMessage,
    _Event,
)
from petribus.net import Net
from petribus_gateway import idempotency

CLIENT_TYPES = ("user_message", "marker_added", "accept_transition", "reject_transition", "confirm_response")
ANSWERS = (AcceptTransition, RejectTransition, ConfirmResponse)
ALLOWED_KEYS = {"type", "value", "request_id", "metadata", "pair_id"}
# What a Beam client puts in ``metadata`` (beta9's bot gateway reads these), all optional.
BEAM_METADATA = {"task_id", "transition_name", "session_id", "request_id"}
EXAMPLE = '{"type": "user_message", "value": "hello"}'
MARKER_EXAMPLE = '{"type": "marker_added", "value": {"location": "<Location>", "data": {...}}}'
CONFIRM_EXAMPLE = '{"type": "confirm_response", "value": {"request_id": "<id>", "accepted": true}}'
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
MAX_REASON = 500
# Bounds of any JSON a client sends (docs/limits.md); its size is bounded by the frame or body limit.
MAX_DEPTH = 64
MAX_MEMBERS = 10_000
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


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


def check_shape(text: str, what: str = "message") -> None:
    """Refuse JSON nested deeper than ``MAX_DEPTH`` or with more than ``MAX_MEMBERS`` object members, before
    it is parsed: the parser, and everything after it that walks the value, recurse. Counts the brackets
    outside strings; a message with few brackets costs two ``str.count``."""
    if text.count("[") + text.count("{") <= MAX_DEPTH and text.count(":") <= MAX_MEMBERS:
        return
    bare = _STRINGS.sub("", text)
    depth = deepest = 0
    for bracket in _BRACKETS.findall(bare):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            raise InvalidInput(f"{what} nests arrays and objects deeper than {MAX_DEPTH} levels; send flatter "
                               "data", code="too_deep")
    members = bare.count(":")
    if members > MAX_MEMBERS:
        raise InvalidInput(f"{what} has {members} object members, more than the {MAX_MEMBERS} allowed; send "
                           "less at once", code="too_many_members")


def parse(text: str) -> dict[str, Any]:
    """One client message as a JSON object with a known shape (not yet checked against a net)."""
    check_shape(text)
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
    if request_id is not None:
        idempotency.check_key(request_id, "request_id")  # it names the message: a resend lands once
    return _beam_shape(payload)


def _beam_shape(payload: dict[str, Any]) -> dict[str, Any]:
    """Check the fields a Beam client sends the way Beam's gateway reads them (``metadata`` with
    ``task_id``, ``transition_name``, ``session_id``, ``request_id``; a top-level ``pair_id``), and take
    ``metadata.request_id`` as the message's ``request_id``."""
    metadata = payload.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str | None) for v in metadata.values()):
            raise InvalidInput(f"metadata must be an object of strings, got {_kind(metadata)} {snippet(metadata)}",
                               code="invalid_value")
        extra = sorted(set(metadata) - BEAM_METADATA)
        if extra:
            raise InvalidInput(f"metadata has unknown field(s) {extra}; it may have {sorted(BEAM_METADATA)}",
                               code="unknown_field")
        inner = metadata.get("request_id") or None
        if inner is not None:
            if payload.get("request_id") not in (None, inner):
                raise InvalidInput("the message names two different request ids (request_id and "
                                   "metadata.request_id); send one", code="invalid_value")
            payload = {**payload, "request_id": idempotency.check_key(inner, "request_id")}
    pair_id = payload.get("pair_id")
    if pair_id is not None and pair_id != "":
        check_id(pair_id, "pair_id")
    return payload


def to_event(net: Net, session_id: str, payload: dict[str, Any]) -> _Event:
    """The event a parsed client message asks for, validated against ``net`` (answers: in shape only)."""
    value = payload.get("value")
    request_id = payload.get("request_id")
    metadata = payload.get("metadata") or {}
    got = _described(payload)
    kind = payload["type"]
    if metadata.get("session_id") not in (None, "", session_id):
        raise InvalidInput(f"metadata.session_id {snippet(metadata['session_id'])} is not this connection's "
                           f"session ({session_id}); send it on that session's connection", code="invalid_value")
    if payload.get("pair_id") and kind not in ("confirm_response", "user_message"):
        raise InvalidInput(f"pair_id goes with a confirm_response (the pair_id of the confirm_request it "
                           f"answers) or a user_message, not with {kind!r}", code="invalid_value")
    if kind in ("accept_transition", "reject_transition"):
        task = metadata.get("task_id") or None
        if task is not None:  # Beam's form: the task in metadata, the value empty or the same task
            if value not in (None, "", task) and not (isinstance(value, dict) and value.get("task_id") == task):
                raise InvalidInput(f"{kind!r} names two different tasks (metadata.task_id {snippet(task)} and "
                                   f"value {got}); send one", code="invalid_value")
            if value in (None, ""):
                value = task
        return task_answer(net, session_id, kind, value, got, request_id=request_id,
                           transition=metadata.get("transition_name") or None)
    if kind == "confirm_response":
        pair_id = payload.get("pair_id") or None
        if pair_id is not None:  # Beam's form: the question's pair_id, the answer "true" or "false"
            answer = {"true": True, "false": False}.get(value.strip().lower()) if isinstance(value, str) else value
            return confirm_response(net, session_id, {"request_id": pair_id, "accepted": answer}, got)
        return confirm_response(net, session_id, value, got, request_id=request_id)
    if kind == "user_message":  # Beam's client may pair a message with its reply
        if not isinstance(value, str):
            raise InvalidInput(f"'user_message' needs a string value, got {got}; send {EXAMPLE}",
                               code="invalid_value")
        return user_message(net, session_id, value, request_id=request_id, pair_id=payload.get("pair_id") or None)
    if not (isinstance(value, dict) and isinstance(value.get("location"), str) and "data" in value
            and set(value) <= {"location", "data"}):
        raise InvalidInput(
            f"'marker_added' needs a value of the form {{\"location\": NAME, \"data\": {{...}}}}, "
            f"got {got}; send {MARKER_EXAMPLE}",
            code="invalid_value",
        )
    return marker_added(net, session_id, value["location"], value["data"], source="user",
                        request_id=request_id)


def task_answer(net: Net, session_id: str, kind: str, value: Any, got: str, *,
                request_id: str | None = None, transition: str | None = None) -> AcceptTransition | RejectTransition:
    """``accept_transition`` / ``reject_transition``: a task id, or ``{"task_id": ..., "reason": ...}``."""
    reason = None
    if isinstance(value, dict):
        allowed = {"task_id", "reason"} if kind == "reject_transition" else {"task_id"}
        if "task_id" not in value or not set(value) <= allowed:
            raise InvalidInput(f"{kind!r} needs the task id (the metadata.task_id of a confirm_transition "
                               f"event) as its value or as {{\"task_id\": ...}}, got {got}",
                               code="invalid_value")
        task, reason = value["task_id"], value.get("reason")
    else:
        task = value
    task = check_id(task, f"{kind!r} task id")
    if reason is not None and (not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON):
        raise InvalidInput(f"a reject reason must be a non-empty string of at most {MAX_REASON} characters, "
                           f"got {snippet(reason)}", code="invalid_value")
    if kind == "accept_transition":
        return AcceptTransition(bot=net.bot, session_id=session_id, firing_id=task, request_id=request_id,
                                transition=transition)
    return RejectTransition(bot=net.bot, session_id=session_id, firing_id=task, reason=reason or "rejected",
                            request_id=request_id, transition=transition)


def confirm_response(net: Net, session_id: str, value: Any, got: str, *,
                     request_id: str | None = None) -> ConfirmResponse:
    """``confirm_response``: ``{"request_id", "accepted"}``, or ``accepted`` with a top-level request_id."""
    if isinstance(value, dict):
        if set(value) != {"request_id", "accepted"}:
            raise InvalidInput(f"'confirm_response' needs a value of the form {{\"request_id\": ID, "
                               f"\"accepted\": true|false}}, got {got}; send {CONFIRM_EXAMPLE}",
                               code="invalid_value")
        if request_id is not None and request_id != value["request_id"]:
            raise InvalidInput("'confirm_response' names two different request ids; send only the one in "
                               "its value", code="invalid_value")
        rid, accepted = value["request_id"], value["accepted"]
    else:
        rid, accepted = request_id, value
    rid = check_id(rid, "'confirm_response' request_id")
    if not isinstance(accepted, bool):
        raise InvalidInput(f"'confirm_response' needs accepted to be true or false, got "
                           f"{snippet(accepted)}; send {CONFIRM_EXAMPLE}", code="invalid_value")
    return ConfirmResponse(bot=net.bot, session_id=session_id, request_id=rid, accepted=accepted)


def check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        shown = "nothing" if value is None else f"{_kind(value)} {snippet(value)}"
        raise InvalidInput(f"{what} must be an id of 1-128 letters, digits, '_' or '-' (as an event gave "
                           f"it), got {shown}", code="invalid_value")
    return value


async def append_answer(events: EventLog, event: _Event, *,
                        state: SessionState | None = None) -> tuple[int, _Event]:
    """Append a client's answer if the session still waits for it (``UnknownRequest`` or
    ``AlreadyAnswered`` if not); ``state`` is a cached fold of the session, brought up to date."""
    if isinstance(event, (AcceptTransition, RejectTransition)):
        decide, target = to_confirmation(event), event.firing_id
    elif isinstance(event, ConfirmResponse):
        decide, target = to_question(event), event.request_id or ""
    elif isinstance(event, InputFileResponse):
        decide, target = to_file_request(event), event.file_id
    else:
        raise TypeError(f"not an answer: {event.type}")  # type: ignore[attr-defined]
    return await answer_once(events, event.bot, event.session_id, decide, target=target, state=state)


def user_message(net: Net, session_id: str, text: str, *, request_id: str | None = None,
                 pair_id: str | None = None) -> UserMessage:
    if not text.strip():
        raise InvalidInput("a user message needs some text; got an empty one", code="invalid_value")
    return UserMessage(bot=net.bot, session_id=session_id, text=text, request_id=request_id, pair_id=pair_id)


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
