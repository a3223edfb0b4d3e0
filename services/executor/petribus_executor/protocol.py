"""What an executor and its worker processes say to each other over their pipe.

Messages are tuples (pickled by ``multiprocessing.connection``), first item the kind. A worker runs
several firings at once (``async def`` ones share its event loop), so every message about a firing
names it by ``job``: an int the executor's pool gives each run, unique within the pool.

executor -> worker
    ``("run", job, Request)``                       start a run: on the worker's event loop when the
                                                    transition is ``async def``, else in its main
                                                    thread (then the worker runs nothing else)
    ``("reply", job, call_id, ok, value)``          the answer to a ``call`` (``{"message", "code"}``
                                                    if not ok)
    ``("cancel", job)``                             cancel an async run (its timeout passed, or the
                                                    executor gave it up); the worker answers ``done``
    ``("stop",)``                                   finish: exit the process (sent to an idle worker)

worker -> executor
    ``("ready", pid, root)``                        the apps are imported and the sandbox is set up
                                                    (``root``: its work folder); send work
    ``("boot_failed", message)``                    the apps could not be imported; the worker exits
    ``("event", job, kind, payload)``               fire-and-forget from ``BotContext`` (``say``,
                                                    ``remember``)
    ``("call", job, call_id, kind, payload, timeout)``  ask, wait for the ``reply`` (prompt, confirm,
                                                    files); ``call_id`` is unique within the worker
    ``("done", job, Outcome)``                      the run ended (a cancelled one too: that is the
                                                    confirmation of ``cancel``)

Only plain data crosses: marker data as JSON-ready dicts, errors as text. Nothing a transition returns
is unpickled by the executor except through these shapes.

On the wire each message is a frame: its pickle's length (``!i``; ``-1`` then ``!Q`` when it does not
fit) and the pickle, as ``multiprocessing.connection`` frames them. Both ends read and write the raw
socket themselves, so the executor reads every frame that has arrived with one ``read`` and writes all
it has for a worker in a tick with one ``write``; ``Connection.poll``/``recv`` cost a selector and two
reads per message.
"""

from __future__ import annotations

import os
import pickle
import struct
from dataclasses import dataclass, field
from typing import Any

RUN = "run"
REPLY = "reply"
CANCEL = "cancel"
STOP = "stop"
READY = "ready"
BOOT_FAILED = "boot_failed"
EVENT = "event"
CALL = "call"
DONE = "done"

CANCELLED = "Cancelled"  # ``Outcome.error_type`` of a run that ended because of ``cancel``


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
    cpu_seconds: float | None = None  # CPU time a def run may use (SIGXCPU past it); None: unbounded


@dataclass(frozen=True)
class Outcome:
    """How a run ended. ``outputs`` are ``(location, data)`` pairs, already validated by their models."""

    ok: bool
    outputs: tuple[tuple[str, dict[str, Any]], ...] = ()
    duration_ms: float = 0.0
    error: str = ""
    error_type: str = ""
    retryable: bool = False
    traceback: str = field(default="", repr=False)  # failures.describe: the user's frames, bounded, masked
    replace_worker: bool = False  # the run went over a limit: its worker may be in a bad state, retire it


_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")


def frame(msg: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) <= 0x7FFFFFFF:
        return _SHORT.pack(len(body)) + body
    return _SHORT.pack(-1) + _LONG.pack(len(body)) + body


def write(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a blocking ``fd`` (raises ``OSError`` when the other end is gone)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Frames:
    """Turns the bytes read from a pipe, in whatever pieces they come, back into messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[Any, ...]]:
        buf = self._buf
        buf += data
        msgs = []
        pos = 0
        while len(buf) - pos >= _SHORT.size:
            (size,) = _SHORT.unpack_from(buf, pos)
            head = _SHORT.size
            if size < 0:
                if len(buf) - pos < head + _LONG.size:
                    break
                (size,) = _LONG.unpack_from(buf, pos + head)
                head += _LONG.size
            end = pos + head + size
            if len(buf) < end:
                break
            msgs.append(pickle.loads(buf[pos + head:end]))
            pos = end
        del buf[:pos]
        return msgs
