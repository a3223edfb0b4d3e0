"""Warm worker processes: the executor's side of the pipes, and which worker runs which firing.

Workers are forked from a ``multiprocessing`` fork server that has petribus, pydantic, the main module
and the bot apps preloaded, so a new worker is ready in milliseconds. Measured on a 2-core machine:
spawning fresh interpreters took 0.12 s for one and 2.7 s for 25; forking 24 from the warm fork server
takes 0.09 s. At most ``size`` workers run (``PETRIBUS_WORKERS``); they start lazily and are reused.

Which worker runs which firing is ``placement.py``'s: ``async def`` firings share a worker's event
loop, up to ``concurrency`` of them (``PETRIBUS_WORKER_CONCURRENCY``); a ``def`` firing has a worker to
itself. When an async firing had to share, one more worker is started in the background (up to
``size``): load spreads over processes as it grows, and no firing waits for a boot it does not need.

A timeout, or a firing the executor abandons (its task cancelled: drain, stop):

- A sync firing's worker is killed: a thread cannot be stopped.
- An async firing is cancelled in its worker (``cancel``), which confirms with ``done``. A worker that
  does not confirm within ``cancel_grace`` seconds has a blocked event loop (CPU work, ``time.sleep``
  in an ``async def``): it is killed, and every other firing it ran fails with a retryable
  ``SandboxCrashed`` that names the culprit.

A worker that dies, whatever the cause, fails every firing it held with ``SandboxCrashed`` and is never
reused; the next firing that needs room starts a fresh one.

Every worker boots under one sandbox profile (``sandbox.py``: memory, CPUs, open files, environment,
devices, process or container) and only runs firings of that profile (``placement.py`` keys workers by
it). A run that went over a limit (``Outcome.replace_worker``) retires its worker: it takes no more
firings and is stopped once its others are done. A container worker (``container.py``) speaks the same
protocol over a unix socket instead of a pipe.

Each pipe is watched with ``loop.add_reader``: what a worker says arrives as soon as it is written,
with no polling. Each wake-up reads what has arrived with one ``read`` and handles every whole message
in it (a message split across reads waits for its rest); what the pool sends a worker in one loop tick
goes in one ``write``. Messages name their run by a job id (``protocol.py``), so events, questions and
answers reach the right firing's callbacks.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.util  # its atexit hook must be registered before ours, so that ours runs first
import os
import shutil
import signal
from collections.abc import Awaitable, Callable, Coroutine
from multiprocessing import spawn
from typing import Any

from petribus import logs
from petribus.errors import PetribusError, SandboxCrashed, TransitionTimeout
from petribus.settings import Settings
from petribus_executor import protocol as p
from petribus_executor import worker as worker_main
from petribus_executor.placement import Host, Placement
from petribus_executor.placement import Lease as _Lease
from petribus_executor.preload import ENV as PRELOAD_ENV
from petribus_executor.preload import MAIN_ENV as PRELOAD_MAIN_ENV
from petribus_executor.sandbox import ENV_ALLOWED, Profile, as_dict, passed_names

log = logs.get("petribus.executor.pool")

BOOT_TIMEOUT_S = 60.0
STOP_GRACE_S = 2.0
CANCEL_GRACE_S = 2.0  # how long a cancelled async firing may take to stop before its worker is killed
READ_SIZE = 1 << 18

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
    """One run of one firing in a worker, as the executor sees it."""

    __slots__ = ("calls", "id", "lease", "on_call", "on_event", "open", "request", "result", "waiter")

    def __init__(self, job_id: int, request: p.Request, on_event: OnEvent, on_call: OnCall) -> None:
        self.id = job_id
        self.request = request
        self.on_event = on_event
        self.on_call = on_call
        self.open = True  # the executor still listens to what it says and asks
        # Set once, by the worker's answer or its death; outlives a cancelled ``run`` (``_cancel`` waits on it).
        self.result: asyncio.Future[p.Outcome] = asyncio.get_running_loop().create_future()
        self.waiter: asyncio.Future[None] | None = None  # what ``run`` awaits: woken by the result or the timeout
        self.lease: Lease | None = None  # held while it runs; given back as soon as its answer arrives
        self.calls: set[asyncio.Task[None]] = set()  # context calls being answered for this run

    def finish(self, outcome: p.Outcome | None = None, error: BaseException | None = None) -> None:
        if self.result.done():
            return
        if error is not None:
            self.result.set_exception(error)
        else:
            self.result.set_result(outcome)  # type: ignore[arg-type]
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def close(self) -> None:
        """The run is over for the executor: nobody waits for what it asked (a confirmation, a file),
        and whatever it still says is dropped."""
        self.open = False
        for task in self.calls:
            task.cancel()


class Worker(Host):
    def __init__(self, proc: Any, conn: Any, profile: Profile) -> None:
        super().__init__(profile)
        self.proc = proc  # a multiprocessing.Process, or a container.ContainerProcess that acts like one
        self.conn = conn
        self.pid = proc.pid
        self.fd = conn.fileno()
        self.profile = profile
        self.frames = p.Frames()
        self.outbox: list[tuple[Any, ...]] = []  # messages to send at the end of this loop tick
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.jobs: dict[int, _Job] = {}
        self.lost = False
        self.retired = False  # takes no more firings; stopped once the ones it has are done
        self.root: str | None = None  # its work folder, as the worker sees it (from ``ready``)
        self.host_root: str | None = getattr(proc, "host_root", None)  # the same folder on this machine
        self.channel = "pipe" if profile.kind == "process" else "socket"  # what its messages come through

    def __repr__(self) -> str:
        return f"Worker(pid={self.pid}, load={self.load}{', sync' if self.exclusive else ''})"

    def host_path(self, path: str) -> str:
        """A path as the worker sees it, as this machine sees it (they differ in a container)."""
        if self.root and self.host_root and self.root != self.host_root:
            if path == self.root or path.startswith(self.root + os.sep):
                return self.host_root + path[len(self.root):]
        return path

    def worker_path(self, path: str) -> str:
        if self.root and self.host_root and self.root != self.host_root:
            if path == self.host_root or path.startswith(self.host_root + os.sep):
                return self.root + path[len(self.host_root):]
        return path


Lease = _Lease[Worker]


class WorkerPool:
    def __init__(self, apps: list[str], size: int, *, concurrency: int = 1, prewarm: int = 1,
                 cancel_grace: float = CANCEL_GRACE_S, settings: Settings | None = None) -> None:
        self.apps = list(apps)
        self.size = max(1, size)
        self.concurrency = max(1, concurrency)
        self.prewarm = min(prewarm, self.size)
        self.cancel_grace = cancel_grace
        self.settings = settings or Settings()
        # What a transition with every option at its default runs under (and what prewarmed workers get).
        self.default_profile = Profile(max_files=self.settings.sandbox_max_files)
        self._ctx = multiprocessing.get_context("forkserver")
        self._all: set[Worker] = set()  # live processes, booting ones included
        self._placement: Placement[Worker] = Placement(self.size, self.concurrency, on_evict=self._evict)
        self._containers: Any = None  # container.ContainerLauncher, made for the first container firing
        self._job_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()  # reaping, cancelling, background boots
        self._calls: set[asyncio.Task[None]] = set()
        self._closed = False
        self.started = 0  # workers ever started, for the curious (and the tests)

    async def start(self) -> None:
        await asyncio.to_thread(self._ensure_fork_server)
        for _ in range(self.prewarm):
            self._placement.reserve_start(self.default_profile)
            self._placement.add(await self._boot(self.default_profile))

    def _ensure_fork_server(self) -> None:
        # Global per process: the first pool to start it decides what is preloaded; later ones import
        # what they miss in each worker, once. The fork server starts with the sandbox's environment
        # (``sandbox.ENV_ALLOWED`` and the variables the apps read at import), not the executor's: no
        # worker forked from it inherits a key or a credential of the executor's, even in its memory.
        self._ctx.set_forkserver_preload(["petribus_executor.preload"])
        main_path = spawn.get_preparation_data("petribus-worker").get("init_main_from_path")
        passed = passed_names(self.settings.sandbox_env)
        env = {k: v for k, v in os.environ.items() if k in ENV_ALLOWED or k.startswith("LC_") or k in passed}
        env[PRELOAD_ENV] = os.pathsep.join(self.apps) if self.settings.preload else ""
        env[PRELOAD_MAIN_ENV] = main_path or ""
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    # ------------------------------------------------------------ leases

    async def acquire(self, *, asynchronous: bool = False, profile: Profile | None = None) -> Lease:
        """Room for one firing on a worker of ``profile`` (default: ``default_profile``): a shared worker
        for an ``async def`` transition, else a worker of its own. Hand it to ``run`` (which gives it
        back) or to ``release``."""
        placement = self._placement
        profile = profile or self.default_profile
        while True:
            if self._closed:
                raise PetribusError("the executor's worker pool is closed")
            lease = placement.take(asynchronous, profile)
            if lease is not None:
                if lease.host.load > 1:
                    self._grow(profile)  # it had to share: have another process ready for what comes next
                return lease
            if placement.reserve_start(profile):
                lease = placement.add(await self._boot(profile), asynchronous)
                assert lease is not None
                return lease
            lease = await placement.wait(asynchronous, profile)
            if lease is not None:
                return lease

    def release(self, lease: Lease) -> None:
        """Give back a lease (``run`` does it itself)."""
        self._placement.give_back(lease)
        worker = lease.host
        if (self._closed or worker.retired) and not worker.lost and worker.load == 0 and not worker.jobs:
            self._stop(worker)

    def _grow(self, profile: Profile) -> None:
        if self._placement.can_start() and self._placement.reserve_start(profile):
            self._spawn(self._grow_one(profile))

    async def _grow_one(self, profile: Profile) -> None:
        try:
            worker = await self._boot(profile)
        except Exception as exc:
            if not self._closed:
                log.warning("a worker did not start", error=repr(exc))
            return
        self._placement.add(worker)

    def _evict(self, worker: Worker) -> None:
        """Placement took an idle worker of another profile out of service to make room: stop it."""
        asyncio.get_running_loop().call_soon(self._stop, worker)

    def retire(self, worker: Worker, why: str) -> None:
        """No more firings for ``worker``: it is stopped once the ones it runs are done."""
        if worker.retired or worker.lost:
            return
        worker.retired = True
        log.info("worker retired", pid=worker.pid, why=why)
        self._placement.remove(worker)
        if worker.load == 0 and not worker.jobs:
            self._stop(worker)

    # ------------------------------------------------------------ runs

    async def run(self, request: p.Request, *, on_event: OnEvent, on_call: OnCall, timeout: float | None,
                  worker: Lease | None = None, asynchronous: bool = False,
                  profile: Profile | None = None,
                  handed: Callable[[], Awaitable[None]] | None = None) -> p.Outcome:
        """Run one firing on ``worker`` (a lease from ``acquire``, given back here) or on a lease taken
        here for an async (shared) or sync (exclusive) firing. Raises ``TransitionTimeout`` or
        ``SandboxCrashed``.

        ``handed`` is awaited once the run is handed to its worker, before its outcome: its worker is
        written to first, at the end of this turn of the loop, ahead of what ``handed`` sends meanwhile
        (the executor's start event). If it raises, the run is abandoned (as on a cancellation) and the
        error raised."""
        lease = worker if worker is not None else await self.acquire(asynchronous=asynchronous, profile=profile)
        while lease.host.lost or lease.host.retired:  # it died or retired since the lease was taken: move
            self.release(lease)
            lease = await self.acquire(asynchronous=not lease.exclusive, profile=lease.host.profile)
        w = lease.host
        job = _Job(next(self._job_ids), request, on_event, on_call)
        job.lease = lease
        w.jobs[job.id] = job
        self._send(w, (p.RUN, job.id, request))
        if handed is not None:
            try:
                await handed()
            except BaseException:
                job.close()
                self._abandon(lease, job, "its firing was abandoned")
                raise
        try:
            outcome = await _outcome(job, timeout)
        except TimeoutError:
            job.close()
            if lease.exclusive:
                self._kill(lease, job, "its firing timed out")
                raise TransitionTimeout(
                    f"transition {request.transition!r} ran longer than its timeout of {timeout:g}s; "
                    f"its worker (pid {w.pid}) was killed. Raise timeout= if it needs longer"
                ) from None
            how = await asyncio.shield(self._spawn(self._cancel(lease, job)))
            raise TransitionTimeout(
                f"transition {request.transition!r} ran longer than its timeout of {timeout:g}s {how}"
            ) from None
        except asyncio.CancelledError:
            job.close()
            self._abandon(lease, job, "its firing was abandoned")
            raise
        except BaseException:  # SandboxCrashed: the worker died under it
            job.close()
            self._detach(lease, job)
            raise
        job.close()
        self._done(w, job, outcome)  # (done already when its answer came in: then this changes nothing)
        return outcome

    def _abandon(self, lease: Lease, job: _Job, why: str) -> None:
        """A run nobody waits for any more: a def run's worker is killed, an async run cancelled."""
        if job.lease is None:  # it answered already: its worker serves another firing now
            return
        if lease.exclusive:
            self._kill(lease, job, why)
        else:
            self._spawn(self._cancel(lease, job))

    def _done(self, w: Worker, job: _Job, outcome: p.Outcome) -> None:
        """A run answered: its worker is free for the next firing (retired first if the run went over
        a limit). Done the moment the answer is read, so a firing waiting for a worker gets it at once,
        not after the finished firing's task has been scheduled again."""
        if job.lease is None:
            return
        if outcome.replace_worker:
            self.retire(w, f"{job.request.transition!r} went over a limit ({outcome.error_type})")
        self._detach(job.lease, job)
        job.lease = None

    def _detach(self, lease: Lease, job: _Job) -> None:
        lease.host.jobs.pop(job.id, None)
        self.release(lease)

    def _kill(self, lease: Lease, job: _Job, why: str) -> None:
        lease.host.jobs.pop(job.id, None)  # it fails on its own terms, not as a crash
        self._lose(lease.host, why)
        self.release(lease)

    async def _cancel(self, lease: Lease, job: _Job) -> str:
        """Stop an async run in its worker, killing the worker if the run does not stop; how it ended."""
        w = lease.host
        try:
            if not w.lost:
                self._send(w, (p.CANCEL, job.id))
            try:
                await asyncio.wait_for(asyncio.shield(job.result), self.cancel_grace)
            except TimeoutError:
                w.jobs.pop(job.id, None)
                others = len(w.jobs)
                self._lose(w, (
                    f"it was killed because {job.request.transition!r} (firing {job.request.firing_id}), "
                    f"which it also ran, ran past its timeout and did not stop within {self.cancel_grace:g}s "
                    "of being cancelled: that transition blocks the event loop it shares with other async "
                    "firings (CPU work, or a blocking call such as time.sleep in an async def). This firing "
                    "was not at fault and can be run again"
                ))
                return (
                    f"and did not stop within {self.cancel_grace:g}s of being cancelled: something in it "
                    "blocks the event loop (CPU work, or a blocking call such as time.sleep in an async def). "
                    f"Its worker (pid {w.pid}) was killed, and with it {others} other firing(s). Run the "
                    "blocking part with `await asyncio.to_thread(...)`, or make the transition a plain def"
                )
            except PetribusError:  # the worker died meanwhile, of something else
                return f"; its worker (pid {w.pid}) died while it was being cancelled"
            return "and was cancelled. Raise timeout= if it needs longer"
        finally:
            self._detach(lease, job)

    async def close(self) -> None:
        """Stop idle workers (killing any that linger), kill busy ones, and reap them all."""
        self._closed = True
        self._placement.close("the executor's worker pool is closed")
        for w in list(self._all):
            if w in self._placement.hosts and w.load == 0 and not w.jobs:
                self._stop(w)
            else:
                self._lose(w, f"the executor's worker pool closed while it ran {len(w.jobs)} firing(s)")
        while self._tasks:
            await asyncio.wait(list(self._tasks))
        for task in list(self._calls):
            task.cancel()
        if self._containers is not None:
            await self._containers.close()

    # ------------------------------------------------------------ processes

    async def _boot(self, profile: Profile | None = None) -> Worker:
        """Start one worker and wait until it is ready; the caller reserved its start (``placement``)
        and puts it in service."""
        try:
            return await self._launch(profile or self.default_profile)
        except BaseException:
            self._placement.start_failed()
            raise

    async def _launch(self, profile: Profile) -> Worker:
        boot = {"profile": as_dict(profile), "root": None, "exit_on_eof": False,
                "passed": sorted(passed_names(self.settings.sandbox_env))}
        if profile.kind == "container":
            if self._containers is None:
                from petribus_executor.container import ContainerLauncher

                self._containers = ContainerLauncher(self.settings, self.apps)
            proc, fd = await self._containers.launch(profile, boot)
            worker = Worker(proc, _FdConn(fd), profile)
            self._all.add(worker)
            self.started += 1
            asyncio.get_running_loop().add_reader(worker.fd, self._on_readable, worker)
            return await self._ready(worker)
        parent_conn, child_conn = self._ctx.Pipe()
        proc = self._ctx.Process(target=worker_main.main, args=(child_conn, self.apps, boot),
                                 name="petribus-worker")
        try:
            await asyncio.to_thread(proc.start)  # a round trip to the fork server; keep the loop free
        except BaseException:
            parent_conn.close()
            raise
        finally:
            child_conn.close()
        _live.add(proc)
        worker = Worker(proc, parent_conn, profile)
        self._all.add(worker)
        self.started += 1
        asyncio.get_running_loop().add_reader(worker.fd, self._on_readable, worker)
        return await self._ready(worker)

    async def _ready(self, worker: Worker) -> Worker:
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), BOOT_TIMEOUT_S)
        except TimeoutError:
            self._lose(worker, "it did not boot")
            raise SandboxCrashed(f"a worker did not import the apps within {BOOT_TIMEOUT_S:g}s") from None
        except BaseException:
            self._lose(worker, "it failed to boot")
            raise
        if self._closed:
            self._lose(worker, "the pool closed")
            raise PetribusError("the executor's worker pool is closed")
        log.debug("worker started", pid=worker.pid)
        return worker

    def _on_readable(self, worker: Worker) -> None:
        try:
            data = os.read(worker.fd, READ_SIZE)  # readable: this does not block
        except OSError:
            data = b""
        if not data:
            self._lose(worker, f"its {worker.channel} closed")
            return
        try:
            msgs = worker.frames.feed(data)
        except Exception as exc:  # not what a worker writes: nothing it says can be trusted any more
            self._lose(worker, f"it sent something unreadable ({exc!r})")
            return
        for msg in msgs:
            if worker.lost:
                return
            self._dispatch(worker, msg)

    def _send(self, worker: Worker, msg: tuple[Any, ...]) -> None:
        """Send at the end of this tick, together with whatever else the worker gets in it."""
        if not worker.outbox:
            asyncio.get_running_loop().call_soon(self._flush, worker)
        worker.outbox.append(msg)

    def _flush(self, worker: Worker) -> None:
        msgs, worker.outbox = worker.outbox, []
        if not msgs or worker.lost:  # a lost worker is being killed: it needs nothing more
            return
        try:
            p.write(worker.fd, b"".join([p.frame(msg) for msg in msgs]))
        except OSError:
            self._lose(worker, f"its {worker.channel} broke")

    def _dispatch(self, worker: Worker, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == p.DONE:
            job = worker.jobs.get(msg[1])
            if job is not None and not job.result.done():
                job.finish(msg[2])
                self._done(worker, job, msg[2])
        elif kind == p.EVENT:
            job = worker.jobs.get(msg[1])
            if job is not None and job.open:
                try:
                    job.on_event(msg[2], msg[3])
                except Exception as exc:  # a bad event must not break the pipe; the firing logs it
                    log.error("context event dropped", pid=worker.pid, kind=msg[2], error=repr(exc))
        elif kind == p.CALL:
            job = worker.jobs.get(msg[1])
            if job is not None and job.open:  # else the run is over or being cancelled: nobody asks
                task = asyncio.ensure_future(self._answer(worker, job, *msg[2:]))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
                job.calls.add(task)
                task.add_done_callback(job.calls.discard)
        elif kind == p.READY:
            worker.root = msg[2] if len(msg) > 2 else None
            if worker.host_root is None:
                worker.host_root = worker.root
            if not worker.ready.done():
                worker.ready.set_result(None)
        elif kind == p.BOOT_FAILED:
            if not worker.ready.done():
                worker.ready.set_exception(SandboxCrashed(f"a worker could not load the apps: {msg[1]}",
                                                          retryable=False))
            self._lose(worker, "it could not load the apps")
        else:
            log.warning("unknown message from a worker ignored", pid=worker.pid, kind=kind)

    async def _answer(self, worker: Worker, job: _Job, call_id: int, kind: str, payload: Any,
                      timeout: float | None) -> None:
        try:
            if kind in ("send_file", "get_file") and isinstance(payload, dict):
                payload = self._files_payload(worker, job, payload)
            value = await job.on_call(kind, payload, timeout)
            if kind == "get_file" and isinstance(value, str):
                value = worker.worker_path(value)
            reply = (p.REPLY, job.id, call_id, True, value)
        except PetribusError as exc:
            reply = (p.REPLY, job.id, call_id, False, {"message": exc.message, "code": exc.code})
        except Exception as exc:
            reply = (p.REPLY, job.id, call_id, False,
                     {"message": f"context.{kind} failed: {exc!r}", "code": "context_error"})
        if job.open and not worker.lost:
            self._send(worker, reply)

    @staticmethod
    def _files_payload(worker: Worker, job: _Job, payload: dict[str, Any]) -> dict[str, Any]:
        """A file call with the firing's folder and the bot's volumes as this machine sees them: a sent
        file must lie inside one of them, and a received one is written to the firing's folder.

        The folder the worker names is taken only if it is the one this run may have (``limits.py``:
        ``run`` for a def run, ``run-<job>`` for an async one), never a folder it chose."""
        folder = payload.get("dir")
        own = {os.path.join(worker.root, "run"), os.path.join(worker.root, f"run-{job.id}")} if worker.root else set()
        out = {k: v for k, v in payload.items() if k != "dir"}
        out["host_dir"] = worker.host_path(folder) if folder in own else None
        out["allowed"] = [d for d, _ in worker.profile.volumes]
        if isinstance(out.get("path"), str):
            out.setdefault("shown_path", out["path"])
            out["path"] = worker.host_path(out["path"])
        return out

    def _stop(self, worker: Worker) -> None:
        self._send(worker, (p.STOP,))
        self._flush(worker)  # now, before it counts as lost
        self._lose(worker, "the pool closed", grace=STOP_GRACE_S)

    def _lose(self, worker: Worker, why: str, *, grace: float = 0.0) -> None:
        """Take a worker out of service for good: kill it (after ``grace`` seconds to exit on its own),
        reap it, and fail every firing it still ran."""
        if worker.lost:
            return
        worker.lost = True
        self._all.discard(worker)
        asyncio.get_running_loop().remove_reader(worker.fd)
        self._spawn(self._reap(worker, why, grace))
        self._placement.remove(worker)

    async def _reap(self, worker: Worker, why: str, grace: float) -> None:
        proc = worker.proc
        if not (grace and await _exited(proc, grace)) and proc.is_alive():
            proc.kill()
        await _exited(proc)
        code = _exit_code(proc)
        reason = proc.exit_reason() if hasattr(proc, "exit_reason") else None
        worker.conn.close()
        try:
            proc.close()
        except ValueError:  # no exit status to be had (the fork server is gone); it was killed
            pass
        _live.discard(proc)
        if worker.root is not None and worker.host_root == worker.root:  # a killed worker leaves its folder
            await asyncio.to_thread(shutil.rmtree, worker.root, True)
        if not worker.ready.done():
            worker.ready.set_exception(SandboxCrashed(f"a worker exited while booting ({_describe(code)})"))
        jobs = list(worker.jobs.values())
        worker.jobs.clear()
        for job in jobs:
            job.finish(error=SandboxCrashed(
                f"the worker running {job.request.transition!r} (pid {worker.pid}) died "
                f"({reason or _describe(code, job.request)}): {why}"
            ))
        log.debug("worker gone", pid=worker.pid, why=why, exit=_describe(code), firings=len(jobs))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def _outcome(job: _Job, timeout: float | None) -> p.Outcome:
    """The run's outcome, or TimeoutError after ``timeout`` seconds. One wake-up from the worker's answer
    to the caller (``wait_for`` over ``shield`` took three turns of a busy event loop); cancelling the
    caller leaves ``job.result`` alone."""
    if not job.result.done():
        loop = asyncio.get_running_loop()
        job.waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, job.wake)
        try:
            await job.waiter
        finally:
            job.waiter = None
            if timer is not None:
                timer.cancel()
        if not job.result.done():
            raise TimeoutError
    return job.result.result()


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


def _describe(code: int | None, request: p.Request | None = None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        if -code == signal.SIGXCPU and request is not None and request.cpu_seconds is not None:
            return (f"killed by signal {-code}, SIGXCPU: over its CPU time limit of {request.cpu_seconds:g}s "
                    "(PETRIBUS_SANDBOX_CPU_SECONDS, or timeout= times cpu=)")
        return f"killed by signal {-code}"
    return f"exit code {code}"


class _FdConn:
    """A connected socket's fd with the two methods the pool uses of a ``Connection``."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
