"""One work item, from delivery to a durable outcome: started, run (with retries), completed or failed.

The order of effects is what makes a firing land exactly once in the log:

1. ``transition_started`` (Msg-Id ``start:<firing>:<attempt>``), then the run, with the JetStream
   message heartbeated (``in_progress``) every ``ack_wait / 3`` so a long firing is not redelivered.
2. What the transition says or remembers while it runs is appended as it happens, in order; so are
   its questions, file requests and sent files (``interact.py``), which it waits for.
3. ``transition_completed`` (``done:<firing>``) or the final ``transition_failed`` (``fail:<firing>``).
4. Only once JetStream has acknowledged that append is the work message acked. An executor that dies
   before step 4 leaves the message to be redelivered; the log's fold ignores a second outcome, and a
   redelivery of a firing the log already finished is acked without running it again. A redelivery
   of a firing still running here (its heartbeats lapsed) is adopted by that run, not run twice.

A firing whose session is deleted (``DELETE``, or expired) before its outcome is written is cancelled:
the executor's log refuses every append for a deleted session (``petribus.deletion.GuardedEventLog``), and
the work is acked with nothing more appended.

``attempt`` counts runs of the firing across deliveries and retries: with ``retries=r``, delivery ``d``
runs attempts ``(d-1)*(r+1)+1`` onwards, so it equals the delivery count when ``r`` is 0 and no two runs
share a ``start:`` Msg-Id.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import datetime
import random
import time
from pathlib import Path
from typing import Any

import structlog
from nats.aio.msg import Msg

from petribus import metrics, tracing
from petribus.bus import EventLog
from petribus.core import Firing, SessionState
from petribus.deletion import SessionDeleted
from petribus.errors import PetribusError, SandboxCrashed, TransitionTimeout
from petribus.events import (
    AgentMessage,
    Marker,
    MemoryUpdated,
    TransitionCompleted,
    TransitionFailed,
    TransitionStarted,
    _Event,
    encode,
)
from petribus.net import Net, TransitionDef
from petribus.work import WorkItem
from petribus_executor import protocol as p
from petribus_executor.effects import Effects
from petribus_executor.failures import fitted, mask
from petribus_executor.folds import SessionFolds
from petribus_executor.interact import Interactions
from petribus_executor.landed import Landed
from petribus_executor.pool import WorkerPool
from petribus_executor.prompts import Prompts
from petribus_executor.sandbox import Profile, profile_for

ENVELOPE_BYTES = 4096  # room left in max_payload for the subject, the headers and the protocol line

# What the context calls will do once their issues land; until then a transition gets a clear error.
NOT_YET: dict[str, str] = {}


class Outbox:
    """Appends a firing's side events (say, remember, questions, files) in the order they were made."""

    def __init__(self, events: EventLog) -> None:
        self._events = events
        # Both made by the first event: most firings say nothing, and a fan-out makes thousands of these.
        self._queue: asyncio.Queue[tuple[_Event, str, asyncio.Future[int] | None] | None] | None = None
        self._task: asyncio.Task[None] | None = None
        # The firing's context (its span, its log fields): the first event may come from a worker's callback.
        self._context = contextvars.copy_context()

    def _start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._write(), context=self._context)
        return self._task

    def put(self, event: _Event, msg_id: str) -> None:
        self._start()
        assert self._queue is not None
        self._queue.put_nowait((event, msg_id, None))

    async def append(self, event: _Event, msg_id: str) -> int:
        """Append ``event`` after everything put before it; its sequence, once it is in the log (the
        first one's, when an earlier run of the firing appended it already: ``msg_id`` names the effect)."""
        landed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        writer = self._start()
        assert self._queue is not None
        self._queue.put_nowait((event, msg_id, landed))
        await asyncio.wait({landed, writer}, return_when=asyncio.FIRST_COMPLETED)
        if not landed.done():  # the writer died on an earlier event: this one will never be written
            landed.cancel()
            writer.result()
            raise PetribusError("the firing's events could not be written", code="bus_error", retryable=True)
        return landed.result()

    async def _write(self) -> None:
        assert self._queue is not None
        while (entry := await self._queue.get()) is not None:
            event, msg_id, landed = entry
            try:
                seq = await self._events.append(event, msg_id=msg_id)
            except Exception as exc:
                if landed is not None and not landed.done():
                    landed.set_exception(exc)
                raise
            if landed is not None and not landed.done():
                landed.set_result(seq)

    async def flush(self) -> None:
        """Wait until everything put so far is in the log (raises if an append failed)."""
        if self._task is None or self._queue is None:
            return
        self._queue.put_nowait(None)
        await self._task

    def discard(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        # The firing is being abandoned; an append that already failed has nobody left to tell.
        self._task.add_done_callback(lambda task: task.cancelled() or task.exception())


# Work sent together with its claim: how long its first delivery waits for the claim's republish before
# the log decides instead, and how long after it was sent a claim not in the log may still land (a send
# retried through a bus outage); past that, the claim was refused and the work is dropped.
LANDED_WAIT_S = 1.0
CLAIM_LANDS_WITHIN_S = 30.0


class Delivery:
    """The newest delivery of a firing running here: heartbeats and the final ack go to it."""

    def __init__(self, msg: Msg) -> None:
        self.msg = msg


class FiringRunner:
    """Runs work items for one executor: shared by all its firings."""

    def __init__(self, *, instance: str, nets: dict[str, Net], events: EventLog, workers: WorkerPool,
                 ack_wait_s: float, log: Any, interactions: Interactions | None = None,
                 max_lost_runs: int = 5, retry_backoff_s: float = 1.0, retry_backoff_max_s: float = 60.0,
                 devices: Any = None, secrets: Any = None, callbacks: Any = None,
                 landed: Landed | None = None) -> None:
        self.instance = instance
        self.settings = workers.settings
        self.devices = devices  # devices.DeviceAllocator of this executor's GPUs, or None
        self.secrets = secrets  # petribus.secrets.SecretStore, made on the first transition with secrets=
        self._secrets_ready: asyncio.Future[Any] | None = None
        self.callbacks = callbacks  # callbacks.Callbacks, made on the first transition with callback_url=
        self._images: dict[int, str] = {}  # container image tag per transition
        self._missing_packages: dict[int, list[str]] = {}
        self._volume_dirs: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}  # per bot and sandbox kind  # python_packages not installed, per transition
        self.nets = nets
        self.events = events
        self.workers = workers
        self.interactions = interactions
        self.prompts = Prompts(events)
        self.folds = SessionFolds(events)
        self.max_lost_runs = max_lost_runs
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.heartbeat_s = max(0.1, ack_wait_s / 3)
        self.log = log
        self._running: dict[str, Delivery] = {}
        self.landed = landed  # claims known stored (landed.py): work sent with its claim runs on them
        self.fresh_runs = 0  # first deliveries of fresh work, run without reading the log (for the tests)
        self.landed_runs = 0  # of those, work sent with its claim, run once the claim's republish came
        self.claims_awaited = 0  # work sent with its claim whose claim was not in the log yet: handed back
        self.cancelled = 0  # firings whose session was deleted before their outcome was written
        self._heartbeats: asyncio.Task[None] | None = None

    async def execute(self, msg: Msg) -> None:
        """Run one delivered work item to its outcome, then ack. Never raises (but for cancellation)."""
        try:
            item = WorkItem.model_validate_json(msg.data)
        except ValueError as exc:
            self.log.error("malformed work item terminated", subject=msg.subject, error=str(exc)[:500])
            await msg.term()
            return
        # The run's span continues the claim's (the work item's traceparent); its appends are its children.
        with tracing.span("executor run", parent=tracing.parent_of(msg.headers, item.trace), kind="consumer",
                          attributes={"petribus.bot": item.bot, "petribus.session_id": item.session_id,
                                      "petribus.firing_id": item.firing_id,
                                      "petribus.transition": item.transition,
                                      "petribus.delivery": msg.metadata.num_delivered}), \
                structlog.contextvars.bound_contextvars(session_id=item.session_id, firing_id=item.firing_id,
                                                        transition=item.transition):
            running = self._running.get(item.firing_id)
            if running is not None:
                # Heartbeats lapsed and JetStream handed the work out again, to us: keep the one run.
                running.msg = msg
                self.log.warning("redelivered while running here; the run adopts the new delivery",
                                 delivery=msg.metadata.num_delivered)
                return
            delivery = self._running[item.firing_id] = Delivery(msg)
            self._ensure_heartbeats()
            try:
                if self._deleted(item):
                    raise SessionDeleted(f"session {item.session_id!r} was deleted before its firing ran")
                await self._execute(item, delivery)
            except asyncio.CancelledError:
                await _quietly(delivery.msg.nak())  # stopping mid-firing: let another executor have it now
                raise
            except Exception as exc:
                if isinstance(exc, SessionDeleted) or self._deleted(item):
                    # Deleted (DELETE, or expired) while the firing waited or ran: a cancelled firing. Its
                    # work is done with; nothing more is appended (petribus.deletion).
                    self.cancelled += 1
                    self.log.info("firing cancelled: its session was deleted", error=repr(exc))
                    await _quietly(delivery.msg.ack())
                    return
                # The outcome could not be written (the bus is down or refused it): try again later.
                self.log.error("work item not finished; will be redelivered", error=repr(exc), exc_info=exc)
                await _quietly(delivery.msg.nak(delay=1.0))
            finally:
                del self._running[item.firing_id]

    def _deleted(self, item: WorkItem) -> bool:
        """Whether the item's session was deleted, as far as this executor's tombstone watch knows."""
        tombstones = getattr(self.events, "tombstones", None)  # a GuardedEventLog (app.py) has them
        return tombstones is not None and tombstones.deleted(item.bot, item.session_id)

    async def _execute(self, item: WorkItem, current: Delivery) -> None:
        msg = current.msg
        net = self.nets.get(item.bot)
        t = net.transition(item.transition) if net and net.has_transition(item.transition) else None
        if net is None or t is None:
            what = (f"bot {item.bot!r}" if net is None
                    else f"transition {item.transition!r} of bot {item.bot!r}")
            error = (f"no {what} in executor {self.instance} (it serves {sorted(self.nets)}); "
                     "deploy the app to this pool's executors and add the markers again")
            await self._fail(item, error, "UnknownTransition", retryable=False, attempt=1)
            await current.msg.term()
            self.log.error("work for an unknown transition terminated", bot=item.bot)
            return
        first = (msg.metadata.num_delivered or 1) == 1
        if item.claim_pending and first and self.landed is not None:
            # Sent together with its claim: it runs once the claim is known stored (its republish).
            seq = await self.landed.wait(item.firing_id, LANDED_WAIT_S)
            if seq is not None:
                item = item.model_copy(update={"fired_seq": seq, "claim_pending": False})
                self.landed_runs += 1
        if item.fresh and first and not item.claim_pending:
            # Sent by the scheduler that claimed it, right after the claim was durable, and delivered for
            # the first time: the firing cannot have started or ended (a start needs a delivery; a lease
            # sends a new item only when this one is gone). A read of the log would only say "claimed".
            state: SessionState | None = None
            firing: Firing | None = Firing(item.firing_id, item.transition, [], "claimed", item.fired_seq)
            self.fresh_runs += 1
        else:
            # Any other delivery: the log says whether the firing may run.
            state = await self.folds.current(item.bot, item.session_id, since=item.fired_seq)
            firing = state.in_flight.get(item.firing_id)
            if item.claim_pending:
                if firing is None and item.firing_id not in state.finished and \
                        _queued_for(msg) < CLAIM_LANDS_WITHIN_S:
                    # Its claim is not in the log (yet): it may still land, or have been refused (another
                    # claim landed first) and never will. Asked again later; dropped once too old.
                    self.claims_awaited += 1
                    await current.msg.nak(delay=min(CLAIM_LANDS_WITHIN_S, 0.5 * 2 ** min(
                        10, (msg.metadata.num_delivered or 1) - 1)))
                    return
                if firing is not None:
                    item = item.model_copy(update={"fired_seq": firing.fired_seq, "claim_pending": False})
        if firing is None or firing.status == "awaiting_confirmation":
            why = ("it already ended" if state is not None and item.firing_id in state.finished
                   else "the log has it in no runnable state")
            self.log.info("work for a firing that may not run; acked without running", why=why,
                          delivery=msg.metadata.num_delivered)
            await current.msg.ack()
            return
        # After every run the log knows of (a work item sent again by a lease check starts counting
        # deliveries from 1 again; the attempt number must not repeat, its Msg-Ids are made from it).
        attempt = max(msg.metadata.num_delivered or 1, firing.attempts + 1)
        failures = len(firing.failed_attempts)
        # Runs that began and ended with no outcome: their executor died, or the bus stayed down longer
        # than PETRIBUS_BUS_OUTAGE_S while they ran. Deliveries that never got as far as starting a run
        # (the bus was down, the executor was stopping) do not count: bus trouble is not the firing's.
        lost = len(firing.started_attempts - firing.failed_attempts)
        if lost >= self.max_lost_runs:
            await self.give_up(item, f"{lost} runs of the firing ended without an outcome (each one timed "
                                     "out or its executor died); raise PETRIBUS_MAX_DELIVER or look at the "
                                     "executors' logs", firing.attempts)
            await current.msg.ack()
            return
        if t.ttl is not None and not firing.started_attempts and (waited := _queued_for(msg)) > t.ttl:
            await self._fail(item, f"the firing waited {waited:.1f}s for an executor, over the {t.ttl:g}s its "
                                   "task_policy ttl allows; it was not run (start more executors of pool "
                                   f"{t.pool!r}, or raise ttl)", "FiringExpired", retryable=False, attempt=attempt)
            self._notify(item, t, None, "the firing expired in the queue (task_policy ttl)", attempt,
                         error_type="FiringExpired")
            await current.msg.ack()
            return
        if t.gpu_count and t.gpu and self.devices is not None and self.devices.total and not (
                {name.strip().upper() for name in t.gpu.split(",")} & self.devices.types):
            # Pool gpu holds work for several GPU types (gpu=["A10G", "T4"]): this executor has none of
            # them; leave it to one of the pool's executors that has.
            self.log.warning("work wants GPU types this executor lacks; left for another", wants=t.gpu,
                             has=sorted(self.devices.types))
            await current.msg.nak(delay=5.0)
            return
        try:
            profile = await self._profile(net, t)
        except PetribusError as exc:  # a secret not set, a volume that cannot be mounted, an image that fails
            await self._fail(item, exc.message, type(exc).__name__, exc.retryable, attempt,
                             final=not exc.retryable or failures >= t.retries,
                             retry_in_s=None if not exc.retryable else self.backoff(failures + 1))
            if exc.retryable and failures < t.retries:
                await current.msg.nak(delay=self.backoff(failures + 1))
            else:
                self._notify(item, t, None, exc.message, attempt, error_type=type(exc).__name__)
                await current.msg.ack()
            return
        effects = Effects(item.firing_id, rerun=firing.status == "started",
                          known=_known_effects(state) if state is not None and firing.status == "started"
                          else frozenset())
        outcome = await self._run_once(item, net, t, attempt, effects, profile)
        if not outcome.ok:
            outcome = self._masked(outcome, profile)
        completed = self._completion(item, outcome) if outcome.ok else None
        if completed is not None and (too_big := self._too_big(completed)):
            outcome = p.Outcome(ok=False, error=too_big, error_type="TransitionOutputError", retryable=False,
                                duration_ms=outcome.duration_ms)
        if completed is not None and outcome.ok:
            await self.events.append(completed, msg_id=f"done:{item.firing_id}")
            metrics.firing_completed(item.bot, t.name)
            # Debug, not info: one line per firing is most of the executor's own work in a large fan-out.
            self.log.debug("firing completed", attempt=attempt, outputs=len(outcome.outputs),
                          duration_ms=round(outcome.duration_ms, 1))
            self._notify(item, t, completed, None, attempt)
            await current.msg.ack()
            return
        final = not outcome.retryable or failures >= t.retries
        self.log.warning("firing failed", attempt=attempt, final=final, error_type=outcome.error_type,
                         error=outcome.error, traceback=outcome.traceback or None)
        if final:
            await self._fail(item, outcome.error, outcome.error_type, outcome.retryable, attempt,
                             traceback=outcome.traceback or None)
            self._notify(item, t, None, outcome.error, attempt, error_type=outcome.error_type)
            await current.msg.ack()
            return
        # The wait before the retry is JetStream's (a nak with a delay): no process has to live through it.
        delay = self.backoff(failures + 1)
        await self._fail(item, outcome.error, outcome.error_type, outcome.retryable, attempt, final=False,
                         retry_in_s=delay, traceback=outcome.traceback or None)
        await current.msg.nak(delay=delay)

    async def _run_once(self, item: WorkItem, net: Net, t: TransitionDef, attempt: int,
                        effects: Effects, profile: Profile) -> p.Outcome:
        # GPUs first, then a worker: a GPU firing's worker is one booted with its devices.
        devices: tuple[str, ...] = ()
        if t.gpu_count:
            try:
                if self.devices is None or not self.devices.total:
                    raise PetribusError(f"executor {self.instance} has no GPUs for {t.name!r} (gpu_count="
                                        f"{t.gpu_count}); start the executors of pool {t.pool!r} with GPUs "
                                        "(--gpus, or a machine where nvidia-smi lists them)")
                devices = await self.devices.acquire(t.gpu_count)
            except PetribusError as exc:  # it can never have them here: the firing fails, it does not wait
                return p.Outcome(ok=False, error=exc.message, error_type=type(exc).__name__, retryable=False)
            profile = dataclasses.replace(profile, devices=devices)
        try:
            return await self._run_on_worker(item, t, attempt, effects, profile)
        finally:
            if devices:
                self.devices.release(devices)

    async def _run_on_worker(self, item: WorkItem, t: TransitionDef, attempt: int, effects: Effects,
                             profile: Profile) -> p.Outcome:
        # The executor holds more work than it has workers; a firing is started once it has one.
        worker = await self.workers.acquire(asynchronous=t.is_async, profile=profile)
        outbox = Outbox(self.events)
        request = p.Request(
            bot=item.bot, session_id=item.session_id, firing_id=item.firing_id, transition=t.name,
            attempt=attempt, inputs=tuple(p.InputMarker(m.id, m.location, m.data) for m in item.inputs),
            cpu_seconds=self._cpu_seconds(t),
        )

        async def report_start() -> None:
            # Sent once the run is handed to its worker, which is written to first (WorkerPool.run): the
            # run, not this report, is what the next step waits on. With no answer asked for
            # (EventLog.send): nothing waits on it. It lands before anything the run appends (same
            # connection, in order; the run's first message back is read on a later turn); one the bus
            # lost (it failed under it, and then the outcome's append fails too, or lands first on a
            # resend) leaves an outcome the fold takes from "claimed", and one run fewer counted as lost,
            # never one more. One that cannot be sent at all abandons the run.
            await self.events.send(
                TransitionStarted(bot=item.bot, session_id=item.session_id, firing_id=item.firing_id,
                                  transition=t.name, executor=self.instance, attempt=attempt,
                                  cause=item.firing_id, trace=item.trace),
                msg_id=f"start:{item.firing_id}:{attempt}",
            )
            metrics.firing_started(item.bot, t.name, _queued_for(self._running[item.firing_id].msg)
                                   if attempt == 1 else None)  # a first run: how long its work item waited

        started = time.perf_counter()
        try:
            outcome = await self.workers.run(
                request, on_event=lambda kind, payload: self._side_effect(item, outbox, effects, kind, payload),
                on_call=lambda kind, payload, timeout: self._answer(item, outbox, effects, kind, payload),
                timeout=t.timeout, worker=worker, handed=report_start,
            )
        except (TransitionTimeout, SandboxCrashed) as exc:  # the firing failed, not the executor
            outcome = p.Outcome(ok=False, error=exc.message, error_type=type(exc).__name__,
                                retryable=exc.retryable, duration_ms=(time.perf_counter() - started) * 1000)
        except BaseException:
            outbox.discard()
            raise
        finally:
            if self.interactions is not None:
                self.interactions.cleanup(item.firing_id)
        await outbox.flush()  # what it said lands before what it returned
        metrics.firing_ran(item.bot, t.name, outcome.ok, outcome.duration_ms)
        return outcome

    def _cpu_seconds(self, t: TransitionDef) -> float:
        allowed = self.settings.sandbox_cpu_seconds
        return allowed if t.timeout is None else min(allowed, t.timeout * max(1.0, t.cpu))

    async def _profile(self, net: Net, t: TransitionDef) -> Profile:
        """The sandbox a firing of ``t`` runs in: its limits, its secrets, the bot's volumes, its image."""
        # The executor's setting can only make isolation stronger: a transition that asked for a container
        # (or gave an image) never runs as a plain process.
        kind = "container" if "container" in (self.settings.sandbox, t.sandbox) else "process"
        if kind == "process" and t.python_packages:
            self._check_installed(t)
        env = await self._secret_env(t.secrets)
        volumes = self._volumes(net, kind)
        image = await self._image(t) if kind == "container" else None
        return profile_for(t, kind=kind, max_files=self.settings.sandbox_max_files, env=env, image=image,
                           volumes=volumes)

    def _check_installed(self, t: TransitionDef) -> None:
        """A process sandbox runs in the executor's own Python: the packages a transition names must be
        installed there (a container installs them in its image)."""
        missing = self._missing_packages.get(id(t))
        if missing is None:  # looked up once per transition: a search of sys.path costs milliseconds
            missing = self._missing_packages[id(t)] = [name for name in t.python_packages if not _installed(name)]
        if missing:
            raise PetribusError(
                f"transition {t.name!r} needs python_packages {missing}, which are not installed in this "
                f"executor's environment; install them where the executor runs (pip install "
                f"{' '.join(missing)}), or give it sandbox='container' to have them built into its image",
                code="packages_missing")

    async def _secret_env(self, names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        if not names:
            return ()
        if self.secrets is None:
            if self._secrets_ready is None:
                from petribus.secrets import SecretStore

                store = SecretStore(self.events.nc, replicas=self.settings.replicas)
                self._secrets_ready = asyncio.ensure_future(_started(store))
            ready = self._secrets_ready
            try:
                self.secrets = await asyncio.shield(ready)
            except Exception:
                if self._secrets_ready is ready:
                    self._secrets_ready = None  # the bus was away: the next firing tries again
                raise
        values = self.secrets.resolve(tuple(names))  # raises MissingSecret, naming every one not set
        return tuple(sorted(values.items()))

    def _volumes(self, net: Net, kind: str) -> tuple[tuple[str, str], ...]:
        if not net.volumes:
            return ()
        known = self._volume_dirs.get((net.bot, kind))
        if known is None:  # once per bot: not a mkdir per firing
            known = self._volume_dirs[(net.bot, kind)] = self._make_volumes(net, kind)
        return known

    def _make_volumes(self, net: Net, kind: str) -> tuple[tuple[str, str], ...]:
        base = self.settings.volumes_dir or self.settings.data_dir / "volumes"
        out = []
        for volume in net.volumes:
            if kind != "container" and Path(volume.mount_path).is_absolute():
                raise PetribusError(
                    f"volume {volume.name!r} has mount_path={volume.mount_path!r}: a process sandbox can only "
                    "offer a volume at a path relative to the firing's folder (e.g. './data'); use a relative "
                    "mount_path, or sandbox='container'", code="volume_not_mountable")
            folder = base / volume.name
            folder.mkdir(parents=True, exist_ok=True)
            out.append((str(folder), volume.mount_path))
        return tuple(out)

    async def _image(self, t: TransitionDef) -> str:
        tag = self._images.get(id(t))
        if tag is None:
            from petribus_executor.images import ensure_image

            image = t.image if t.image is not None else self.settings.container_image
            tag = await ensure_image(image, settings=self.settings,
                                     progress=lambda line: self.log.info("image build", transition=t.name,
                                                                         line=line))
            self._images[id(t)] = tag
        return tag

    def _notify(self, item: WorkItem, t: TransitionDef, completed: TransitionCompleted | None,
                error: str | None, attempt: int, *, error_type: str | None = None) -> None:
        """Tell the transition's ``callback_url`` how the firing ended; never waits for it."""
        if not t.callback_url:
            return
        from petribus_executor.callbacks import Callbacks, outcome_payload

        if self.callbacks is None:
            self.callbacks = Callbacks()
        outputs: dict[str, list[Any]] | None = None
        if completed is not None:
            outputs = {}
            for m in completed.outputs:
                outputs.setdefault(m.location, []).append(m.data)
        self.callbacks.notify(t.callback_url, outcome_payload(
            bot=item.bot, session_id=item.session_id, firing_id=item.firing_id, transition=item.transition,
            attempt=attempt, final=True, outputs=outputs,
            error=None if completed is not None else {"code": error_type or "failed", "message": error},
        ))

    def _side_effect(self, item: WorkItem, outbox: Outbox, effects: Effects, kind: str, payload: Any) -> None:
        """A ``say`` or ``remember``: appended in order, once per place in the run however often it runs."""
        effect = effects.next(kind)
        event: _Event
        if kind == "say":
            event = AgentMessage(id=effect.id, bot=item.bot, session_id=item.session_id, firing_id=item.firing_id,
                                 transition=item.transition, cause=item.firing_id, trace=item.trace,
                                 text=str(payload))
        elif kind == "remember":
            event = MemoryUpdated(id=effect.id, bot=item.bot, session_id=item.session_id,
                                  firing_id=item.firing_id, transition=item.transition, cause=item.firing_id,
                                  trace=item.trace, memory=payload)
        else:
            raise PetribusError(f"unknown context event {kind!r}")
        if not effects.landed(effect):
            outbox.put(event, effect.key)

    async def _answer(self, item: WorkItem, outbox: Outbox, effects: Effects, kind: str, payload: Any) -> Any:
        if kind == "prompt":
            return await self.prompts.prompt(item, outbox.append, effects, payload)
        if self.interactions is not None and kind in ("confirm", "get_file", "send_file"):
            if not isinstance(payload, dict):
                raise PetribusError(f"context.{kind} sent {type(payload).__name__}, not its arguments",
                                    code="context_error")
            handler = getattr(self.interactions, kind)
            return await handler(item, outbox.append, effects, payload)
        if kind in NOT_YET:
            raise PetribusError(
                f"context.{kind} is not available yet: {NOT_YET[kind]}, which this executor does not have; "
                f"remove the context.{kind}(...) call from the transition for now",
                code="not_available",
            )
        raise PetribusError(f"unknown context call {kind!r}", code="not_available")

    def _completion(self, item: WorkItem, outcome: p.Outcome) -> TransitionCompleted:
        outputs = [Marker(id=f"{item.firing_id}.{i}", location=loc, data=data)
                   for i, (loc, data) in enumerate(outcome.outputs)]
        return TransitionCompleted(bot=item.bot, session_id=item.session_id, firing_id=item.firing_id,
                                   transition=item.transition, outputs=outputs, duration_ms=outcome.duration_ms,
                                   cause=item.firing_id, trace=item.trace)

    def _too_big(self, completed: TransitionCompleted) -> str | None:
        """Why the outputs cannot be one event of the log, or None. A completion the bus refuses would
        fail the same way on every retry; it fails the firing for good instead, saying what to change."""
        limit = self.events.nc.max_payload - ENVELOPE_BYTES
        size = len(encode(completed))
        if size <= limit:
            return None
        return (f"transition {completed.transition!r} returned {len(completed.outputs)} marker(s) taking "
                f"{size:,} bytes as one transition_completed event, over the {limit:,} bytes the bus takes "
                "(nats-server max_payload); return fewer or smaller markers (large data belongs in files: "
                "context.send_file), or raise max_payload on the server")

    async def _fail(self, item: WorkItem, error: str, error_type: str, retryable: bool, attempt: int,
                    *, final: bool = True, retry_in_s: float | None = None, traceback: str | None = None) -> None:
        """Append a ``transition_failed`` with the run's traceback (if it has one) and the markers it
        consumed, as many as fit in one message of the bus (``failures.py``)."""
        def event(error: str, inputs: list[Marker]) -> TransitionFailed:
            return TransitionFailed(bot=item.bot, session_id=item.session_id, firing_id=item.firing_id,
                                    transition=item.transition, error=error, error_type=error_type,
                                    retryable=retryable, final=final, attempt=attempt, retry_in_s=retry_in_s,
                                    traceback=traceback, inputs=inputs, cause=item.firing_id, trace=item.trace)

        failed = fitted(event, error, item.inputs, self.events.nc.max_payload - ENVELOPE_BYTES)
        await self.events.append(
            failed, msg_id=f"fail:{item.firing_id}" if final else f"fail:{item.firing_id}:{attempt}",
        )
        metrics.firing_failed(item.bot, item.transition, final)

    def _masked(self, outcome: p.Outcome, profile: Profile) -> p.Outcome:
        """A failed outcome with no secret value in its message or traceback: the profile's secrets (the
        worker masked them already; what a worker says is not relied on) and the model key, if this
        executor has it."""
        hidden = [value for _, value in profile.env]
        if self.settings.openai_api_key is not None:
            hidden.append(self.settings.openai_api_key.get_secret_value())
        if not hidden:
            return outcome
        return dataclasses.replace(outcome, error=mask(outcome.error, hidden),
                                   traceback=mask(outcome.traceback, hidden))

    async def give_up(self, item: WorkItem, error: str, runs: int) -> None:
        """Fail a firing for good that no run finished (its markers go back to their places)."""
        await self._fail(item, error, "DeliveriesExhausted", retryable=False, attempt=runs)
        self.log.error("firing given up", session_id=item.session_id, firing_id=item.firing_id, runs=runs)

    def backoff(self, failures: int) -> float:
        """Seconds before the retry that follows the ``failures``-th failure: exponential, capped, with
        jitter (half fixed, half random) so that firings failing together do not retry together."""
        ceiling = min(self.retry_backoff_max_s, self.retry_backoff_s * 2 ** (failures - 1))
        return round(ceiling / 2 + random.uniform(0, ceiling / 2), 3)

    def _ensure_heartbeats(self) -> None:
        if self._heartbeats is None or self._heartbeats.done():
            self._heartbeats = asyncio.create_task(self._heartbeat(), name="heartbeats")

    async def _heartbeat(self) -> None:
        """One loop beats for every running firing (a task per firing would cost two more per firing)."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            for delivery in list(self._running.values()):
                try:
                    await delivery.msg.in_progress()
                except Exception as exc:  # disconnected: the next beat may get through; redelivery is safe
                    self.log.warning("heartbeat failed", error=repr(exc))

    def close(self) -> None:
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        self.folds.close()

    async def aclose(self, timeout: float = 5.0) -> None:
        """``close``, and flush callbacks not yet delivered and stop the secret store's watch."""
        self.close()
        if self.callbacks is not None:
            await self.callbacks.close(timeout)
        if self.secrets is not None:
            await self.secrets.close()


def _known_effects(state: SessionState) -> frozenset[str]:
    """Ids of every side effect, question and file the log has: what a re-run need not append again."""
    return frozenset(state.effects).union(state.pending_requests, state.closed_requests, state.pending_files,
                                          state.files)


def _installed(requirement: str) -> bool:
    """Whether a distribution named by ``requirement`` ("requests", "numpy>=2", "pkg[extra]") is installed."""
    import importlib.metadata
    import re

    name = re.split(r"[\s<>=!~;\[@]", requirement.strip(), maxsplit=1)[0]
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _queued_for(msg: Msg) -> float:
    """Seconds since the work item was stored in PB_WORK."""
    stored = msg.metadata.timestamp
    if stored is None:
        return 0.0
    return (datetime.datetime.now(datetime.timezone.utc) - stored).total_seconds()


async def _started(store: Any) -> Any:
    await store.start()
    return store


async def _quietly(aw: Any) -> None:
    try:
        await aw
    except Exception:  # best effort: without it the message is redelivered after ack_wait anyway
        pass

