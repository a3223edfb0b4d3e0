"""What the client raises: one ``ClientError`` per kind of answer a caller acts on differently.

A gateway error body ``{"code", "message"}`` keeps its ``code`` and ``message``; the class says what to
do: ``NotFound`` (wrong bot, session, task or file), ``Conflict`` (already answered, or a key reused),
``Invalid`` (the input does not validate), ``Unauthorized`` (no valid API key, or a foreign Origin), ``Unavailable`` (the gateway or its log stayed unreachable
through every retry: try again later), ``ConnectionLost`` (an event stream could not be resumed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from petribus.errors import PetribusError

if TYPE_CHECKING:
    from petribus.client._event import Event


class ClientError(PetribusError):
    """A request to the gateway did not do what was asked. ``status`` is the HTTP status, if any."""

    code = "client_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


class NotFound(ClientError, LookupError):
    code = "not_found"


class Conflict(ClientError):
    """It no longer waits (answered, timed out, ended), or an idempotency key named another request."""

    code = "conflict"


class Unauthorized(ClientError, PermissionError):
    """No valid API key where one is needed (401, WebSocket 4401), or a page of a foreign origin (403, 1008)."""

    code = "unauthorized"


class Invalid(ClientError, ValueError):
    code = "invalid_input"


class Unavailable(ClientError, ConnectionError):
    """The gateway, or the session log behind it, could not be reached through every retry."""

    code = "bus_unavailable"
    retryable = True


class ConnectionLost(Unavailable):
    """An event stream dropped and could not be resumed (``RECONNECT_ATTEMPTS`` tries)."""

    code = "connection_lost"


class RunFailed(ClientError):
    """``Session.run``: a transition it waits for failed for good; ``event`` is that ``transition_failed``."""

    code = "transition_failed"

    def __init__(self, event: Event) -> None:
        value = event.value if isinstance(event.value, dict) else {}
        super().__init__(f"transition {event.transition!r} failed (seq {event.seq}, task {event.task_id}): "
                         f"{value.get('error_type', 'Exception')}: {value.get('error')}; its markers went back "
                         "where they were; Session.state() shows them")
        self.event = event


NOT_FOUND_CODES = ("unknown_bot", "unknown_session", "unknown_request", "unknown_file")


def from_answer(status: int | None, code: str | None, message: str) -> ClientError:
    """The error for a gateway answer (an HTTP status, or a WebSocket error event's code)."""
    if status == 404 or (status is None and code in NOT_FOUND_CODES):
        kind: type[ClientError] = NotFound
    elif status == 409 or code in ("already_answered", "idempotency_key_reused"):
        kind = Conflict
    elif status in (401, 403) or code in ("unauthorized", "forbidden_origin"):
        kind = Unauthorized
    elif status == 503 or code == "bus_unavailable":
        kind = Unavailable
    elif status in (400, 413, 422) or status is None:
        kind = Invalid
    else:
        kind = ClientError
    return kind(message, code=code, status=status)
