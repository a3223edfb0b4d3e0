"""The worker process: imports the bot apps once, then runs one firing at a time for its executor.

A worker is forked from the executor's fork server (see ``pool.py``), so it starts with petribus,
pydantic and, where they could be preloaded, the apps already imported. It lives for many firings.
The executor kills it when a firing times out or is abandoned; it exits on its own when the executor
process dies, so a ``kill -9`` of the executor leaves no orphans running transitions.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from petribus.context import BotContext
from petribus.errors import AlreadyAnswered, FileTooLarge, InvalidInput, PetribusError, TransitionOutputError
from petribus.loader import load_bot
from petribus.net import Net, TransitionDef
from petribus_executor import protocol as p

Conn = multiprocessing.connection.Connection

# Errors a context call can raise in the transition, by code: so it can catch the specific type.
_ERRORS: dict[str, type[PetribusError]] = {
    "file_too_large": FileTooLarge, "already_answered": AlreadyAnswered, "invalid_input": InvalidInput,
}


def main(conn: Conn, apps: list[str]) -> None:
    """Process entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the executor decides
    _exit_with_parent()
    try:
        nets = {net.bot: net for net in (load_bot(spec).net() for spec in apps)}
    except Exception as exc:
        conn.send((p.BOOT_FAILED, f"{type(exc).__name__}: {exc}"))
        return
    channel = PipeChannel(conn)
    channel.post((p.READY, os.getpid()))
    while True:
        msg = channel.next_command()
        if msg is None or msg[0] == p.STOP:
            return
        if msg[0] == p.RUN:
            channel.post((p.DONE, run_firing(nets, msg[1], channel)))


def _exit_with_parent() -> None:
    # The parent sentinel turns ready when the executor process is gone (however it died).
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(70)

    threading.Thread(target=watch, name="petribus-lifeline", daemon=True).start()


class PipeChannel:
    """The worker's end of :class:`petribus.context.Channel`, over the pipe to the executor.

    Safe to use from several threads of one transition: sends are serialised, and whichever caller is
    waiting reads the pipe for everyone and hands replies out by call id.
    """

    def __init__(self, conn: Conn) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._reading = False
        self._replies: dict[int, tuple[Any, ...]] = {}
        self._abandoned: set[int] = set()
        self._ids = itertools.count(1)

    def post(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def send(self, kind: str, payload: Any) -> None:
        if kind == "remember":
            try:
                json.dumps(payload)
            except (TypeError, ValueError) as exc:
                raise InvalidInput(
                    "context.remember needs JSON data or a pydantic model, "
                    f"got {type(payload).__name__}: {exc}"
                ) from None
        self.post((p.EVENT, kind, payload))

    def call(self, kind: str, payload: Any, timeout: float | None) -> Any:
        call_id = next(self._ids)
        self.post((p.CALL, call_id, kind, payload, timeout))
        reply = self._wait_reply(call_id, timeout)
        if reply is None:
            raise PetribusError(f"context.{kind} got no answer within {timeout}s", code="context_timeout",
                                retryable=True)
        _, _, ok, value = reply
        if ok:
            return value
        code = value.get("code") or "context_error"
        raise _ERRORS.get(code, PetribusError)(value["message"], code=code)

    def next_command(self) -> tuple[Any, ...] | None:
        """The next command for an idle worker (late replies to abandoned calls are dropped); None at EOF."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                return None
            if msg[0] != p.REPLY:
                return msg

    def _wait_reply(self, call_id: int, timeout: float | None) -> tuple[Any, ...] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while call_id not in self._replies:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    self._abandoned.add(call_id)
                    return None
                if self._reading:
                    self._cond.wait(left)
                    continue
                self._reading = True
                self._cond.release()
                try:
                    msg = self._conn.recv() if self._conn.poll(left) else None
                finally:
                    self._cond.acquire()
                    self._reading = False
                    self._cond.notify_all()
                if msg is not None and msg[0] == p.REPLY and msg[1] not in self._abandoned:
                    self._replies[msg[1]] = msg
            return self._replies.pop(call_id)


def run_firing(nets: dict[str, Net], req: p.Request, channel: PipeChannel) -> p.Outcome:
    started = time.perf_counter()
    try:
        net = nets[req.bot]
        t = net.transition(req.transition)
        inputs = build_inputs(net, t, req.inputs)
        context = BotContext(channel, bot=req.bot, session_id=req.session_id, firing_id=req.firing_id,
                             transition=req.transition)
        result = _invoker(t)(context, inputs)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        outputs = collect_outputs(net, t, result)
    except (Exception, SystemExit) as exc:
        return p.Outcome(
            ok=False, error=str(exc) or type(exc).__name__, error_type=type(exc).__name__,
            retryable=exc.retryable if isinstance(exc, PetribusError) else True,
            traceback=traceback.format_exc(), duration_ms=(time.perf_counter() - started) * 1000,
        )
    return p.Outcome(ok=True, outputs=outputs, duration_ms=(time.perf_counter() - started) * 1000)


async def _await(awaitable: Any) -> Any:
    return await awaitable


def build_inputs(net: Net, t: TransitionDef,
                 markers: tuple[p.InputMarker, ...]) -> dict[type[BaseModel], list[Any]]:
    """``{Model: [instances]}`` in the transition's input order, rebuilt from the markers' data."""
    inputs: dict[type[BaseModel], list[Any]] = {net.locations[loc].model: [] for loc, _ in t.inputs}
    for m in markers:
        model = net.locations[m.location].model
        try:
            inputs.setdefault(model, []).append(model.model_validate(m.data))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]["msg"]
            raise InvalidInput(f"marker {m.id} in {m.location} no longer validates as {model.__name__}: "
                               f"{exc.error_count()} error(s), first: {first}") from None
    return inputs


_invokers: dict[int, Callable[[BotContext, Any], Any]] = {}


def _invoker(t: TransitionDef) -> Callable[[BotContext, Any], Any]:
    """A call of ``t.fn`` that passes ``context`` only where the function asks for it, in its own order."""
    cached = _invokers.get(id(t.fn))
    if cached is not None:
        return cached
    try:
        params = list(inspect.signature(t.fn).parameters.values())
    except (TypeError, ValueError):  # not introspectable: the plain (inputs) form
        params = None
    slots: list[tuple[str, str]] = []  # (how, which): how is "pos" or the keyword to pass it by
    for prm in params if params is not None else ():
        if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
            continue
        is_context = t.wants_context and (
            prm.name == "context" or prm.annotation is BotContext or prm.annotation == "BotContext"
        )
        which = "context" if is_context else "inputs"
        if any(w == which for _, w in slots):
            continue  # a further parameter with a default: leave it be
        slots.append(("pos" if prm.kind is prm.POSITIONAL_ONLY else prm.name, which))
    if params is None:
        slots = [("pos", "inputs")]

    def invoke(context: BotContext, inputs: Any) -> Any:
        values = {"context": context, "inputs": inputs}
        args = [values[which] for how, which in slots if how == "pos"]
        kwargs = {how: values[which] for how, which in slots if how != "pos"}
        return t.fn(*args, **kwargs)

    _invokers[id(t.fn)] = invoke
    return invoke


def collect_outputs(net: Net, t: TransitionDef, result: Any) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Check a transition's return value against its declared outputs; ``(location, data)`` pairs.

    Accepted: ``None`` (no outputs) or ``{Model: [instances]}``, where a value may also be one instance
    or ``None``. Anything else, an undeclared model or an instance of another type, is an error.
    """
    if result is None:
        return ()
    declared = ", ".join(t.outputs) or "nothing"
    if not isinstance(result, dict):
        raise TransitionOutputError(
            f"transition {t.name!r} returned {type(result).__name__}; return {{Model: [instances]}} "
            f"for its outputs ({declared}) or None"
        )
    out: list[tuple[str, dict[str, Any]]] = []
    for key, value in result.items():
        label = getattr(key, "__name__", repr(key))
        loc = net.location_of(key) if isinstance(key, type) else None
        if loc is None or loc not in t.outputs:
            raise TransitionOutputError(
                f"transition {t.name!r} returned {label} markers, but its outputs are {declared}; "
                f"add {label} to outputs=[...] or stop returning it"
            )
        items = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if not isinstance(item, key):
                raise TransitionOutputError(
                    f"transition {t.name!r} returned a {type(item).__name__} under {label}; "
                    f"the values of {{{label}: [...]}} must be {label} instances"
                )
            try:
                data = key.model_validate(item.model_dump()).model_dump(mode="json")
            except ValidationError as exc:
                raise TransitionOutputError(
                    f"transition {t.name!r} returned an invalid {label}: {exc}"
                ) from None
            out.append((loc, data))
    return tuple(out)
