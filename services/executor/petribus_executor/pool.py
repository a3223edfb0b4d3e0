"""Warm worker processes: the executor's side of the pipes, one firing per worker at a time.

Workers are forked from a ``multiprocessing`` fork server that has petribus, pydantic, the main module
and the bot apps preloaded, so a new worker is ready in milliseconds. Measured on a 2-core machine:
spawning fresh interpreters took 0.12 s for one and 2.7 s for 25; forking 24 from the warm fork server
takes 0.09 s. Workers start lazily, up to ``size``, and are reused; one that crashes, times out or is
abandoned is killed and never reused, so the next firing starts a fresh one.

Each pipe is watched with ``loop.add_reader``: what a worker says arrives as soon as it is written,
with no polling. A message is read whole once its first bytes are there; the worker is writing the
rest at that moment, so the wait is bounded by the size of one message.
"""

from __future__ import annotations

import asyncio
import atexit
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.util  # its atexit hook must be registered before ours, so that ours runs first
import os
from collections import deque
from multiprocessing import spawn
from collections.abc import Awaitable, Callable
from typing import Any

from petribus import logs
from petribus.errors import PetribusError, SandboxCrashed, TransitionTimeout
from petribus_executor import protocol as p
from petribus_executor import worker as worker_main
from petribus_executor.preload import ENV as PRELOAD_ENV
from petribus_executor.preload import MAIN_ENV as PRELOAD_MAIN_ENV

log = logs.get("petribus.executor.pool")

BOOT_TIMEOUT_S = 60.0
STOP_GRACE_S = 2.0

OnEvent = Callable[[str, Any], None]
OnCall = Callable[[str, Any, "float | None"], Awaitable[Any]]

_live: set[multiprocessing.process.BaseProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    # multiprocessing joins non-daemon children at exit; a pool nobody closed would hang it forever.
    for proc in list(_live):
        if proc.is_alive():
            proc.kill()


class _Job:
    def __init__(self, request: p.Request, on_event: OnEvent, on_call: OnCall) -> None:
        self.request = request
        self.on_event = on_event
        self.on_call = on_call
        self.result: asyncio.Future[p.Outcome] = asyncio.get_running_loop().create_future()
        self.calls: set[asyncio.Task[None]] = set()  # context calls being answered for this run

    def end_calls(self) -> None:
        """The run is over: nobody waits for what it asked (a confirmation, a file) any more."""
        for task in self.calls:
            task.cancel()


class Worker:
    def __init__(self, proc: multiprocessing.process.BaseProcess,
                 conn: multiprocessing.connection.Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.pid = proc.pid
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.job: _Job | None = None
        self.lost = False

    def __repr__(self) -> str:
        return f"Worker(pid={self.pid})"


class WorkerPool:
    def __init__(self, apps: list[str], size: int, *, prewarm: int = 1) -> None:
        self.apps = list(apps)
        self.size = max(1, size)
        self.prewarm = min(prewarm, self.size)
        self._ctx = multiprocessing.get_context("forkserver")
        self._all: set[Worker] = set()
        self._idle: list[Worker] = []
        self._starting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._reaping: set[asyncio.Task[None]] = set()
        self._calls: set[asyncio.Task[None]] = set()
        self._closed = False
        self.started = 0  # workers ever started, for the curious (and the tests)

    async def start(self) -> None:
        await asyncio.to_thread(self._ensure_fork_server)
        for _ in range(self.prewarm):
            self._release(await self._start_worker())

    def _ensure_fork_server(self) -> None:
        # Global per process: the first pool to start it decides what is preloaded; later ones import
        # what they miss in each worker, once.
        self._ctx.set_forkserver_preload(["petribus_executor.preload"])
        main_path = spawn.get_preparation_data("petribus-worker").get("init_main_from_path")
        env = {PRELOAD_ENV: os.pathsep.join(self.apps), PRELOAD_MAIN_ENV: main_path or ""}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    async def acquire(self) -> Worker:
        """A warm worker for one firing: hand it to ``run`` (which gives it back) or to ``release``."""
        return await self._acquire()

    def release(self, worker: Worker) -> None:
        self._release(worker)

    async def run(self, request: p.Request, *, on_event: OnEvent, on_call: OnCall,
                  timeout: float | None, worker: Worker | None = None) -> p.Outcome:
        """Run one firing in a warm worker. Raises ``TransitionTimeout`` or ``SandboxCrashed``."""
        if worker is None:
            worker = await self._acquire()
        job = _Job(request, on_event, on_call)
        worker.job = job
        try:
            worker.conn.send((p.RUN, request))
        except OSError:
            self._lose(worker, "its pipe broke")
        try:
            outcome = await asyncio.wait_for(asyncio.shield(job.result), timeout)
        except TimeoutError:
            job.result.cancel()
            self._lose(worker, "timed out")
            raise TransitionTimeout(
                f"transition {request.transition!r} ran longer than its timeout of {timeout:g}s; "
                f"its worker (pid {worker.pid}) was killed. Raise timeout= if it needs longer"
            ) from None
        except asyncio.CancelledError:
            job.result.cancel()
            self._lose(worker, "its firing was abandoned")
            raise
        finally:
            job.end_calls()
        worker.job = None
        self._release(worker)
        return outcome

    async def close(self) -> None:
        """Stop idle workers (killing any that linger), kill busy ones, and reap them all."""
        self._closed = True
        for w in list(self._all):
            if w.job is None:
                try:
                    w.conn.send((p.STOP,))
                except OSError:
                    pass
                self._lose(w, "the pool closed", grace=STOP_GRACE_S)
            else:
                self._lose(w, "the pool closed while it ran a firing")
        if self._reaping:
            await asyncio.wait(list(self._reaping))
        for task in list(self._calls):
            task.cancel()
        for f in self._waiters:
            if not f.done():
                f.set_exception(PetribusError("the executor's worker pool is closed"))

    async def _acquire(self) -> Worker:
        while True:
            if self._closed:
                raise PetribusError("the executor's worker pool is closed")
            if self._idle:
                return self._idle.pop()
            if len(self._all) + self._starting < self.size:
                return await self._start_worker()
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def _release(self, worker: Worker) -> None:
        if worker.lost:
            return
        if self._closed:
            self._lose(worker, "the pool is closed")
            return
        self._idle.append(worker)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _start_worker(self) -> Worker:
        self._starting += 1
        try:
            parent_conn, child_conn = self._ctx.Pipe()
            proc = self._ctx.Process(target=worker_main.main, args=(child_conn, self.apps),
                                     name="petribus-worker")
            try:
                await asyncio.to_thread(proc.start)  # a round trip to the fork server; keep the loop free
            except BaseException:
                parent_conn.close()
                raise
            finally:
                child_conn.close()
            _live.add(proc)
            worker = Worker(proc, parent_conn)
            self._all.add(worker)
            self.started += 1
            asyncio.get_running_loop().add_reader(parent_conn.fileno(), self._on_readable, worker)
            try:
                await asyncio.wait_for(asyncio.shield(worker.ready), BOOT_TIMEOUT_S)
            except TimeoutError:
                self._lose(worker, "it did not boot")
                raise SandboxCrashed(f"a worker did not import the apps within {BOOT_TIMEOUT_S:g}s") from None
            except BaseException:
                self._lose(worker, "it failed to boot")
                raise
            log.debug("worker started", pid=worker.pid)
            return worker
        finally:
            self._starting -= 1
            self._wake()  # a failed start frees a slot for someone else

    def _on_readable(self, worker: Worker) -> None:
        try:
            while not worker.lost and worker.conn.poll():
                self._dispatch(worker, worker.conn.recv())
        except (EOFError, OSError):
            self._lose(worker, "its pipe closed")

    def _dispatch(self, worker: Worker, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        job = worker.job
        if kind == p.READY:
            if not worker.ready.done():
                worker.ready.set_result(None)
        elif kind == p.BOOT_FAILED:
            if not worker.ready.done():
                worker.ready.set_exception(SandboxCrashed(f"a worker could not load the apps: {msg[1]}",
                                                          retryable=False))
            self._lose(worker, "it could not load the apps")
        elif job is None:
            log.warning("message from an idle worker ignored", pid=worker.pid, kind=kind)
        elif kind == p.EVENT:
            try:
                job.on_event(msg[1], msg[2])
            except Exception as exc:  # a bad event must not break the pipe; the firing logs it
                log.error("context event dropped", pid=worker.pid, kind=msg[1], error=repr(exc))
        elif kind == p.CALL:
            task = asyncio.ensure_future(self._answer(worker, job, *msg[1:]))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
            job.calls.add(task)
            task.add_done_callback(job.calls.discard)
        elif kind == p.DONE and not job.result.done():
            job.result.set_result(msg[1])

    async def _answer(self, worker: Worker, job: _Job, call_id: int, kind: str, payload: Any,
                      timeout: float | None) -> None:
        try:
            reply = (p.REPLY, call_id, True, await job.on_call(kind, payload, timeout))
        except PetribusError as exc:
            reply = (p.REPLY, call_id, False, {"message": exc.message, "code": exc.code})
        except Exception as exc:
            reply = (p.REPLY, call_id, False,
                     {"message": f"context.{kind} failed: {exc!r}", "code": "context_error"})
        if worker.job is job and not worker.lost:
            try:
                worker.conn.send(reply)
            except OSError:
                self._lose(worker, "its pipe broke")

    def _lose(self, worker: Worker, why: str, *, grace: float = 0.0) -> None:
        """Take a worker out of service for good: kill it (after ``grace`` seconds to exit on its own),
        reap it, and fail its firing if it had one."""
        if worker.lost:
            return
        worker.lost = True
        self._all.discard(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        asyncio.get_running_loop().remove_reader(worker.conn.fileno())
        task = asyncio.ensure_future(self._reap(worker, why, grace))
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)
        self._wake()

    async def _reap(self, worker: Worker, why: str, grace: float) -> None:
        proc = worker.proc
        if not (grace and await _exited(proc, grace)) and proc.is_alive():
            proc.kill()
        await _exited(proc)
        code = _exit_code(proc)
        worker.conn.close()
        try:
            proc.close()
        except ValueError:  # no exit status to be had (the fork server is gone); it was killed
            pass
        _live.discard(proc)
        if not worker.ready.done():
            worker.ready.set_exception(SandboxCrashed(f"a worker exited while booting ({_describe(code)})"))
        job = worker.job
        if job is not None and not job.result.done():
            job.result.set_exception(SandboxCrashed(
                f"the worker running {job.request.transition!r} (pid {worker.pid}) died: {why}, "
                f"{_describe(code)}"
            ))
        log.debug("worker gone", pid=worker.pid, why=why, exit=_describe(code))


async def _exited(proc: multiprocessing.process.BaseProcess, timeout: float | None = None) -> bool:
    """Wait (without blocking the loop) until a process has ended; False if ``timeout`` came first."""
    if proc.exitcode is not None:
        return True
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[None] = loop.create_future()

    def ended() -> None:
        if not gone.done():
            gone.set_result(None)

    loop.add_reader(proc.sentinel, ended)
    try:
        await asyncio.wait_for(gone, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(proc.sentinel)


def _exit_code(proc: multiprocessing.process.BaseProcess) -> int | None:
    try:
        proc.join(0)
    except (EOFError, OSError):
        return None
    return proc.exitcode


def _describe(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"
