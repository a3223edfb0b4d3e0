"""What an executor and its worker processes say to each other over their pipe.

Messages are tuples (pickled by ``multiprocessing.connection``), first item the kind:

executor -> worker
    ``("run", Request)``                  run one firing; sent only to an idle worker
    ``("reply", call_id, ok, value)``      the answer to a ``call`` (``{"message", "code"}`` if not ok)
    ``("stop",)``                          finish: exit the process

worker -> executor
    ``("ready", pid)``                     the apps are imported; send work
    ``("boot_failed", message)``           the apps could not be imported; the worker exits
    ``("event", kind, payload)``           fire-and-forget from ``BotContext`` (``say``, ``remember``)
    ``("call", call_id, kind, payload, timeout)``   ask, wait for the ``reply`` (prompt, confirm, files)
    ``("done", Outcome)``                  the firing's result; the worker is idle again

Only plain data crosses: marker data as JSON-ready dicts, errors as text. Nothing a transition returns
is unpickled by the executor except through these shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RUN = "run"
REPLY = "reply"
STOP = "stop"
READY = "ready"
BOOT_FAILED = "boot_failed"
EVENT = "event"
CALL = "call"
DONE = "done"


@dataclass(frozen=True)
class InputMarker:
    id: str
    location: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Request:
    """One run of one firing."""

    bot: str
    session_id: str
    firing_id: str
    transition: str
    attempt: int
    inputs: tuple[InputMarker, ...]


@dataclass(frozen=True)
class Outcome:
    """How a run ended. ``outputs`` are ``(location, data)`` pairs, already validated by their models."""

    ok: bool
    outputs: tuple[tuple[str, dict[str, Any]], ...] = ()
    duration_ms: float = 0.0
    error: str = ""
    error_type: str = ""
    retryable: bool = False
    traceback: str = field(default="", repr=False)
