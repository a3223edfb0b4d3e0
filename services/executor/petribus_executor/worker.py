"""The worker process: imports the bot apps once, then runs firings for its executor, many at a time.

A worker is forked from the executor's fork server (see ``pool.py``), so it starts with petribus,
pydantic and, where they could be preloaded, the apps already imported. It lives for many firings.

Three threads of its own share the work:

- The **reader** reads the pipe and only dispatches, so nothing but the pipe ever holds it up:
  ``run`` of an ``async def`` transition goes to the event loop (``call_soon_threadsafe``), ``run`` of a
  plain ``def`` to the main thread, a ``reply`` to whoever waits for it (a blocked thread through a
  ``threading.Event``, a coroutine through its loop), ``cancel`` to the loop, ``stop`` or the end of the
  pipe ends the process.
- The **event loop** (a thread that lives as long as the process) runs every async firing as a task,
  so hundreds can wait on I/O at once; the executor bounds how many it sends
  (``PETRIBUS_WORKER_CONCURRENCY``). ``cancel`` cancels one task; the run then reports ``done``.
- The **main thread** runs a ``def`` transition, where it always ran. The executor sends one only to a
  worker with nothing else to do, and sends nothing more until it is done: a sync firing has the
  process to itself, and can be stopped only by killing the process.

Sends come from all of them (and from threads a transition starts) and are serialised by one lock.
Since the reader takes every reply, a blocking ``context.confirm`` waits safely in any thread, the
loop's included, where it stalls the other async firings of the process; the ``a``-methods don't.

The executor kills the worker when a sync firing times out or is abandoned, and when an async one does
not stop within a grace after ``cancel`` (its code blocks the loop). The worker exits on its own when
the executor process dies, so a ``kill -9`` of the executor leaves no orphans running transitions.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from petribus.context import BotContext
from petribus.errors import AlreadyAnswered, FileTooLarge, InvalidInput, PetribusError, TransitionOutputError
from petribus.loader import load_bot
from petribus.net import Net, TransitionDef
from pydantic import BaseModel, ValidationError

from petribus_executor import protocol as p

Conn = multiprocessing.connection.Connection
READ_SIZE = 1 << 18
Reply = tuple[Any, ...]

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
        p.write(conn.fileno(), p.frame((p.BOOT_FAILED, f"{type(exc).__name__}: {exc}")))
        return
    Runner(Pipe(conn), nets).serve()


def _exit_with_parent() -> None:
    # The parent sentinel turns ready when the executor process is gone (however it died).
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(70)

    threading.Thread(target=watch, name="petribus-lifeline", daemon=True).start()


class Pipe:
    """The worker's end of the pipe: sends serialised across threads, replies handed to their caller."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn  # owns the socket; read and written raw, in frames (``protocol.py``)
        self._fd = conn.fileno()
        self._frames = p.Frames()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._waiting: dict[tuple[int, int], Callable[[Reply], None]] = {}  # (job, call id) -> deliver
        self._call_ids = itertools.count(1)

    def post(self, msg: tuple[Any, ...]) -> None:
        data = p.frame(msg)
        with self._send_lock:
            p.write(self._fd, data)

    def read(self) -> list[tuple[Any, ...]]:
        """The messages that have arrived, once at least one has (the reader thread's alone)."""
        while True:
            data = os.read(self._fd, READ_SIZE)
            if not data:
                raise EOFError
            if msgs := self._frames.feed(data):
                return msgs

    def call(self, job: int, kind: str, payload: Any, timeout: float | None) -> Any:
        """Ask the executor; block this thread (whichever it is) until the reply or ``timeout``."""
        answered = threading.Event()
        replies: list[Reply] = []

        def deliver(reply: Reply) -> None:
            replies.append(reply)
            answered.set()

        key = self._expect(job, deliver)
        try:
            self.post((p.CALL, job, key[1], kind, payload, timeout))
            answered.wait(timeout)
        finally:
            self._forget(key)
        return _unpack(kind, timeout, replies[0] if replies else None)

    async def acall(self, job: int, kind: str, payload: Any, timeout: float | None) -> Any:
        """``call`` for a coroutine: its event loop runs on while it waits."""
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[Reply] = loop.create_future()

        def deliver(reply: Reply) -> None:
            loop.call_soon_threadsafe(_settle, answered, reply)

        key = self._expect(job, deliver)
        try:
            self.post((p.CALL, job, key[1], kind, payload, timeout))
            try:
                reply: Reply | None = await asyncio.wait_for(answered, timeout)
            except TimeoutError:
                reply = None
        finally:
            self._forget(key)
        return _unpack(kind, timeout, reply)

    def deliver(self, reply: Reply) -> None:
        """A reply from the executor, to its caller (a late one, for a call that gave up, is dropped)."""
        with self._lock:
            deliver = self._waiting.pop((reply[1], reply[2]), None)
        if deliver is not None:
            deliver(reply)

    def abort(self, job: int) -> None:
        """``job`` is being cancelled: its calls get an error now. That frees a thread blocked in one
        (the loop's, even), so the cancellation can land; a coroutine's wait is cancelled anyway."""
        with self._lock:
            keys = [key for key in self._waiting if key[0] == job]
            delivers = [self._waiting.pop(key) for key in keys]
        for (_, call_id), deliver in zip(keys, delivers):
            deliver((p.REPLY, job, call_id, False,
                     {"message": "the firing was cancelled by its executor", "code": "cancelled"}))

    def _expect(self, job: int, deliver: Callable[[Reply], None]) -> tuple[int, int]:
        key = (job, next(self._call_ids))
        with self._lock:
            self._waiting[key] = deliver
        return key

    def _forget(self, key: tuple[int, int]) -> None:
        with self._lock:
            self._waiting.pop(key, None)


def _settle(answered: asyncio.Future[Reply], reply: Reply) -> None:
    if not answered.done():
        answered.set_result(reply)


def _unpack(kind: str, timeout: float | None, reply: Reply | None) -> Any:
    if reply is None:
        raise PetribusError(f"context.{kind} got no answer within {timeout}s", code="context_timeout",
                            retryable=True)
    _, _, _, ok, value = reply
    if ok:
        return value
    code = value.get("code") or "context_error"
    raise _ERRORS.get(code, PetribusError)(value["message"], code=code)


class JobChannel:
    """The worker's :class:`petribus.context.Channel`: one run's side of the pipe, tagged with its job."""

    __slots__ = ("_job", "_pipe")

    def __init__(self, pipe: Pipe, job: int) -> None:
        self._pipe = pipe
        self._job = job

    def send(self, kind: str, payload: Any) -> None:
        if kind == "remember":
            try:
                json.dumps(payload)
            except (TypeError, ValueError) as exc:
                raise InvalidInput(
                    "context.remember needs JSON data or a pydantic model, "
                    f"got {type(payload).__name__}: {exc}"
                ) from None
        self._pipe.post((p.EVENT, self._job, kind, payload))

    def call(self, kind: str, payload: Any, timeout: float | None) -> Any:
        return self._pipe.call(self._job, kind, payload, timeout)

    async def acall(self, kind: str, payload: Any, timeout: float | None) -> Any:
        return await self._pipe.acall(self._job, kind, payload, timeout)


class Runner:
    """This process's runs: async ones as tasks on the event loop, sync ones in the main thread."""

    def __init__(self, pipe: Pipe, nets: dict[str, Net]) -> None:
        self.pipe = pipe
        self.nets = nets
        self.loop = asyncio.new_event_loop()
        self.tasks: dict[int, asyncio.Task[p.Outcome]] = {}  # the loop thread's alone
        self.sync_runs: queue.SimpleQueue[tuple[int, p.Request] | None] = queue.SimpleQueue()

    def serve(self) -> None:
        threading.Thread(target=self._run_loop, name="petribus-loop", daemon=True).start()
        threading.Thread(target=self._read, name="petribus-reader", daemon=True).start()
        try:
            self.pipe.post((p.READY, os.getpid()))
            while (run := self.sync_runs.get()) is not None:
                job, request = run
                self.pipe.post((p.DONE, job, run_sync(self.nets, request, JobChannel(self.pipe, job))))
        except OSError:
            pass  # the executor is gone

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _read(self) -> None:
        try:
            while True:
                runs: list[tuple[int, p.Request]] = []  # async runs that came together start together
                for msg in self.pipe.read():
                    kind = msg[0]
                    if kind == p.RUN:
                        if self._is_async(msg[2]):
                            runs.append((msg[1], msg[2]))
                        else:
                            self.sync_runs.put((msg[1], msg[2]))
                    elif kind == p.REPLY:
                        self.pipe.deliver(msg)
                    elif kind == p.CANCEL:
                        self._start_soon(runs)  # a run before its cancel
                        self.pipe.abort(msg[1])
                        self.loop.call_soon_threadsafe(self._cancel, msg[1])
                    elif kind == p.STOP:
                        return
                self._start_soon(runs)
        except (EOFError, OSError):
            pass
        finally:
            self.sync_runs.put(None)

    def _start_soon(self, runs: list[tuple[int, p.Request]]) -> None:
        if runs:
            self.loop.call_soon_threadsafe(self._start, runs[:])
            runs.clear()

    def _is_async(self, request: p.Request) -> bool:
        net = self.nets.get(request.bot)
        if net is None or not net.has_transition(request.transition):
            return True  # it fails at once; on the loop that holds nothing up
        return net.transition(request.transition).is_async

    def _start(self, runs: list[tuple[int, p.Request]]) -> None:
        for job, request in runs:
            task = self.loop.create_task(run_async(self.nets, request, JobChannel(self.pipe, job)))
            self.tasks[job] = task
            task.add_done_callback(functools.partial(self._ended, job))

    def _cancel(self, job: int) -> None:
        task = self.tasks.get(job)
        if task is not None:
            task.cancel()

    def _ended(self, job: int, task: asyncio.Task[p.Outcome]) -> None:
        del self.tasks[job]
        if task.cancelled():  # before it began: run_async never saw the cancellation
            outcome = _cancelled(0.0)
        elif (exc := task.exception()) is not None:
            outcome = p.Outcome(ok=False, error=repr(exc), error_type=type(exc).__name__, retryable=True)
        else:
            outcome = task.result()
        try:
            self.pipe.post((p.DONE, job, outcome))
        except OSError:
            pass  # the executor is gone; the lifeline ends this process


def run_sync(nets: dict[str, Net], req: p.Request, channel: JobChannel) -> p.Outcome:
    """Run a firing in this thread, to its outcome."""
    started = time.perf_counter()
    try:
        net, t, call = _prepare(nets, req, channel)
        result = call()
        if inspect.isawaitable(result):  # a def that hands back a coroutine
            result = asyncio.run(_await(result))
        return _completed(net, t, result, started)
    except (Exception, SystemExit) as exc:
        return _failed(exc, started)


async def run_async(nets: dict[str, Net], req: p.Request, channel: JobChannel) -> p.Outcome:
    """Run a firing as a coroutine of the running loop, to its outcome (cancelled is an outcome too)."""
    started = time.perf_counter()
    try:
        net, t, call = _prepare(nets, req, channel)
        result = call()
        if inspect.isawaitable(result):
            result = await result
        return _completed(net, t, result, started)
    except (Exception, SystemExit) as exc:
        return _failed(exc, started)
    except asyncio.CancelledError:
        return _cancelled(started)


def _prepare(nets: dict[str, Net], req: p.Request,
             channel: JobChannel) -> tuple[Net, TransitionDef, Callable[[], Any]]:
    net = nets[req.bot]
    t = net.transition(req.transition)
    inputs = build_inputs(net, t, req.inputs)
    context = BotContext(channel, bot=req.bot, session_id=req.session_id, firing_id=req.firing_id,
                         transition=req.transition)
    invoke = _invoker(t)
    return net, t, lambda: invoke(context, inputs)


def _completed(net: Net, t: TransitionDef, result: Any, started: float) -> p.Outcome:
    outputs = collect_outputs(net, t, result)
    return p.Outcome(ok=True, outputs=outputs, duration_ms=(time.perf_counter() - started) * 1000)


def _cancelled(started: float) -> p.Outcome:
    return p.Outcome(ok=False, error="cancelled by its executor", error_type=p.CANCELLED, retryable=True,
                     duration_ms=(time.perf_counter() - started) * 1000 if started else 0.0)


def _failed(exc: BaseException, started: float) -> p.Outcome:
    return p.Outcome(
        ok=False, error=str(exc) or type(exc).__name__, error_type=type(exc).__name__,
        retryable=exc.retryable if isinstance(exc, PetribusError) else True,
        traceback=traceback.format_exc(), duration_ms=(time.perf_counter() - started) * 1000,
    )


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
