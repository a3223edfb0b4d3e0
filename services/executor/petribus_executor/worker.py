"""The worker process: imports the bot apps once, then runs firings for its executor, many at a time.

A worker is forked from the executor's fork server (see ``pool.py``), so it starts with petribus,
pydantic and, where they could be preloaded, the apps already imported. It lives for many firings.
What one run does (inputs built, the function called, outputs checked) is ``invoke.py``'s.

Two threads share the work:

- The **main thread** reads the pipe while it has nothing to run, and dispatches: ``run`` of an
  ``async def`` transition goes to the event loop (``call_soon_threadsafe``), a ``reply`` to whoever
  waits for it (a blocked thread through a ``threading.Event``, a coroutine through its loop),
  ``cancel`` to the loop, ``stop`` or the end of the pipe ends the process. ``run`` of a plain ``def``
  it runs itself, where a ``def`` always ran (signal handlers, ``SIGXCPU``'s included, run there). The
  executor sends one only to a worker with nothing else to do, and sends nothing more until it is done:
  a sync firing has the process to itself, and can be stopped only by killing the process.
- The **event loop** (a thread that lives as long as the process) runs every async firing as a task,
  so hundreds can wait on I/O at once; the executor bounds how many it sends
  (``PETRIBUS_WORKER_CONCURRENCY``). ``cancel`` cancels one task; the run then reports ``done``.

While the main thread runs a ``def``, nobody reads the pipe unless a thread waits for a reply (a
``context.confirm`` in the run, or in a thread it started): then that thread reads it, hands other
waiters their replies and leaves anything else for the main thread, until its own reply comes. A
``def`` run's hand-over thus wakes one thread, not a reader and then the main thread (a reader thread
that handed each run over cost a tenth of a no-op run's CPU). Whoever reads holds ``Pipe._reader``.

Sends come from all of them (and from threads a transition starts) and are serialised by one lock.
A blocking ``context.confirm`` waits safely in any thread, the loop's included, where it stalls the
other async firings of the process; the ``a``-methods don't.

The executor kills the worker when a sync firing times out or is abandoned, and when an async one does
not stop within a grace after ``cancel`` (its code blocks the loop). The worker exits on its own when
the executor process dies, so a ``kill -9`` of the executor leaves no orphans running transitions (a
container's worker, which has no parent process to watch, when its socket's other end closes).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from petribus.errors import AlreadyAnswered, FileTooLarge, InvalidInput, PetribusError
from petribus.loader import load_bot
from petribus.net import Net
from petribus.service import settle_collector

from petribus_executor import protocol as p
from petribus_executor.failures import describe, error_message
from petribus_executor.invoke import cancelled, run_async, run_sync
from petribus_executor.limits import CpuTimeExceeded, Sandbox

Conn = multiprocessing.connection.Connection
READ_SIZE = 1 << 18
Reply = tuple[Any, ...]

# Errors a context call can raise in the transition, by code: so it can catch the specific type.
_ERRORS: dict[str, type[PetribusError]] = {
    "file_too_large": FileTooLarge, "already_answered": AlreadyAnswered, "invalid_input": InvalidInput,
}


def main(conn: Conn, apps: list[str], boot: dict[str, Any] | None = None) -> None:
    """Process entry point. ``boot``: the sandbox (``limits.Sandbox``): profile, CPUs, folder."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the executor decides
    _exit_with_parent()
    sandbox = Sandbox(boot)
    try:
        nets = {net.bot: net for net in (load_bot(spec).net() for spec in apps)}
        settle_collector(collect=False)  # what it loaded is kept out of every collection its runs cause
        sandbox.enter()
    except Exception as exc:
        p.write(conn.fileno(), p.frame((p.BOOT_FAILED, f"{type(exc).__name__}: {exc}")))
        sandbox.exit()
        return
    try:
        Runner(Pipe(conn), nets, sandbox, exit_on_eof=bool((boot or {}).get("exit_on_eof"))).serve()
    finally:
        sandbox.exit()


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
        self._reader = threading.Lock()  # held by the thread reading the pipe
        # Notified when a reply was delivered, a message left for the main thread, the pipe let go or ended.
        self._turn = threading.Condition()
        self._left: list[tuple[Any, ...]] = []  # read by a thread waiting for its reply: the main thread's
        self.ended = False  # the other end closed

    def post(self, msg: tuple[Any, ...]) -> None:
        data = p.frame(msg)
        with self._send_lock:
            p.write(self._fd, data)

    def read(self) -> list[tuple[Any, ...]]:
        """The messages that have arrived, once at least one has (whoever holds ``_reader``)."""
        while True:
            data = os.read(self._fd, READ_SIZE)
            if not data:
                self.ended = True
                raise EOFError
            if msgs := self._frames.feed(data):
                return msgs

    def fileno(self) -> int:
        return self._fd

    def _readable(self, timeout: float) -> bool:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def take(self) -> list[tuple[Any, ...]]:
        """The main thread's next messages: those a waiting caller left it, or what it reads itself (it
        waits meanwhile for a caller that reads the pipe). ``EOFError`` once the pipe has ended."""
        with self._turn:
            while not self._left:
                if self.ended:
                    raise EOFError
                if self._reader.acquire(blocking=False):
                    break
                self._turn.wait()
            else:
                msgs, self._left = self._left, []
                return msgs
        try:
            return self._hand_on(self.read(), keep=True)
        finally:
            self._let_go()

    def _hand_on(self, msgs: list[tuple[Any, ...]], *, keep: bool) -> list[tuple[Any, ...]]:
        """Replies to their callers, the rest returned (``keep``, to the main thread reading) or left for
        the main thread; while the pipe is still held, so that a caller who takes it next has its reply
        already, and the main thread finds what was left before it reads."""
        kept = []
        for msg in msgs:
            if msg[0] == p.REPLY:
                self.deliver(msg)
            elif keep:
                kept.append(msg)
            else:
                with self._turn:
                    self._left.append(msg)
        return kept

    def _let_go(self) -> None:
        self._reader.release()
        with self._turn:
            self._turn.notify_all()

    def _wait(self, answered: threading.Event, timeout: float | None) -> None:
        """Until ``answered`` is set, the pipe ends, or ``timeout``: reading the pipe meanwhile if no
        other thread does (replies to their callers, anything else left for the main thread)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._turn:
                while True:
                    if answered.is_set() or self.ended:
                        return
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return
                    if self._reader.acquire(blocking=False):
                        break
                    self._turn.wait(left)
            try:
                if answered.is_set():
                    return  # answered by the thread that had the pipe, before it let go
                if left is not None and not self._readable(left):
                    continue  # its time is up: the loop above says so
                self._hand_on(self.read(), keep=False)
            except EOFError:
                return
            finally:
                self._let_go()

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
            self._wait(answered, timeout)
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
            with self._turn:  # a blocked caller waits on the turn, in case it has to read the pipe itself
                self._turn.notify_all()

    def abort(self, job: int) -> None:
        """``job`` is being cancelled: its calls get an error now. That frees a thread blocked in one
        (the loop's, even), so the cancellation can land; a coroutine's wait is cancelled anyway."""
        with self._lock:
            keys = [key for key in self._waiting if key[0] == job]
            delivers = [self._waiting.pop(key) for key in keys]
        for (_, call_id), deliver in zip(keys, delivers):
            deliver((p.REPLY, job, call_id, False,
                     {"message": "the firing was cancelled by its executor", "code": "cancelled"}))
        if delivers:
            with self._turn:
                self._turn.notify_all()

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

    __slots__ = ("_folder", "_job", "_make_folder", "_pipe")

    def __init__(self, pipe: Pipe, job: int, folder: str | Callable[[], str]) -> None:
        self._pipe = pipe
        self._job = job
        self._folder = folder if isinstance(folder, str) else None
        self._make_folder = None if isinstance(folder, str) else folder

    @property
    def folder(self) -> str:
        """The run's own folder (made on first use): files are received here, and sent only from here."""
        if self._folder is None:
            assert self._make_folder is not None
            self._folder = self._make_folder()
        return self._folder

    @property
    def made_folder(self) -> str | None:
        return self._folder

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
        return self._pipe.call(self._job, kind, self._placed(kind, payload), timeout)

    async def acall(self, kind: str, payload: Any, timeout: float | None) -> Any:
        return await self._pipe.acall(self._job, kind, self._placed(kind, payload), timeout)

    def _placed(self, kind: str, payload: Any) -> Any:
        """File calls name the run's folder; a relative path is relative to it (an async run's working
        directory is its worker's, which it shares)."""
        if kind in ("send_file", "get_file") and isinstance(payload, dict):
            payload = {**payload, "dir": self.folder}
            if kind == "send_file" and isinstance(payload.get("path"), str):
                payload["shown_path"] = payload["path"]  # as the transition said it, for its errors
                payload["path"] = os.path.join(self.folder, payload["path"])
        return payload


class Runner:
    """This process's runs: async ones as tasks on the event loop, sync ones in the main thread."""

    def __init__(self, pipe: Pipe, nets: dict[str, Net], sandbox: Sandbox | None = None, *,
                 exit_on_eof: bool = False) -> None:
        self.pipe = pipe
        self.nets = nets
        self.sandbox = sandbox or Sandbox(None)
        self.exit_on_eof = exit_on_eof  # a container's worker has no parent process to watch: the socket is it
        self.loop = asyncio.new_event_loop()
        self.tasks: dict[int, asyncio.Task[p.Outcome]] = {}  # the loop thread's alone
        self.channels: dict[int, JobChannel] = {}  # async runs' channels, the loop thread's alone

    def serve(self) -> None:
        """The main thread's work (see the top of this module): read, dispatch, run the def runs."""
        threading.Thread(target=self._run_loop, name="petribus-loop", daemon=True).start()
        if self.exit_on_eof:
            threading.Thread(target=self._watch_end, name="petribus-lifeline", daemon=True).start()
        sandbox = self.sandbox
        sandbox.limit_memory()
        try:
            self.pipe.post((p.READY, os.getpid(), sandbox.root))
            while True:
                try:
                    msgs = self.pipe.take()
                except CpuTimeExceeded:
                    # The last def run's CPU bound stays set while the worker waits (limits.py); waiting
                    # used what little it had left. Nothing runs: wait on, unbounded until the next run.
                    self.sandbox.disarm_cpu()
                    continue
                if not self._dispatch(msgs):
                    return
        except (EOFError, OSError):
            if self.exit_on_eof:
                self.sandbox.exit()
                os._exit(70)  # nobody to report to

    def _dispatch(self, msgs: list[tuple[Any, ...]]) -> bool:
        """Hand out what was read, then run its def runs here, in order; False once told to stop."""
        runs: list[tuple[int, p.Request]] = []  # async runs that came together start together
        sync: list[tuple[int, p.Request]] = []
        going = True
        for msg in msgs:
            kind = msg[0]
            if kind == p.RUN:
                (runs if self._is_async(msg[2]) else sync).append((msg[1], msg[2]))
            elif kind == p.REPLY:
                self.pipe.deliver(msg)
            elif kind == p.CANCEL:
                self._start_soon(runs)  # a run before its cancel
                self.pipe.abort(msg[1])
                self.loop.call_soon_threadsafe(self._cancel, msg[1])
            elif kind == p.STOP:
                going = False
                break
        self._start_soon(runs)
        for job, request in sync:
            self.pipe.post((p.DONE, job, self._run_sync(job, request)))
        return going

    def _watch_end(self) -> None:
        """A container's worker has no parent process to watch: the end of its socket is its executor's
        end, and a def run must not outlive it. Polled for the hang-up alone, so it never reads."""
        poller = select.poll()
        poller.register(self.pipe.fileno(), select.POLLRDHUP)
        while True:
            for _, events in poller.poll():
                if events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    self.sandbox.exit()
                    os._exit(70)

    def _run_sync(self, job: int, request: p.Request) -> p.Outcome:
        sandbox = self.sandbox
        folder = sandbox.begin_sync()  # a def run has the process: its working directory and temp files
        try:
            sandbox.arm_cpu(request.cpu_seconds)  # left set after the run: see limits.py
            outcome = run_sync(self.nets, request, JobChannel(self.pipe, job, folder))
        finally:
            sandbox.end_sync()
        return sandbox.explain(request, outcome, request.cpu_seconds)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

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
        self.sandbox.leave_sync()  # the process is shared now: no def run's folder or CPU bound
        for job, request in runs:
            channel = self.channels[job] = JobChannel(self.pipe, job, functools.partial(self.sandbox.async_dir, job))
            task = self.loop.create_task(run_async(self.nets, request, channel))
            self.tasks[job] = task
            task.add_done_callback(functools.partial(self._ended, job, request))

    def _cancel(self, job: int) -> None:
        task = self.tasks.get(job)
        if task is not None:
            task.cancel()

    def _ended(self, job: int, request: p.Request, task: asyncio.Task[p.Outcome]) -> None:
        del self.tasks[job]
        self.sandbox.end_async(self.channels.pop(job).made_folder)
        if task.cancelled():  # before it began: run_async never saw the cancellation
            outcome = cancelled()
        elif (exc := task.exception()) is not None:
            outcome = p.Outcome(ok=False, error=error_message(exc), error_type=type(exc).__name__, retryable=True,
                                traceback=describe(exc))
        else:
            outcome = self.sandbox.explain(request, task.result())
        try:
            self.pipe.post((p.DONE, job, outcome))
        except OSError:
            pass  # the executor is gone; the lifeline ends this process
