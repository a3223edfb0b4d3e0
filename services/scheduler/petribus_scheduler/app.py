"""The scheduler: folds every session's log and appends the firings its marking allows.

One durable consumer (``scheduler``) over PB_EVENTS, shared by every scheduler process: every event;
``transition_started``, which decides nothing, is acked as it arrives (``STARTED``). The others
go to a queue per session (``petribus.session_queues``): sessions in parallel, one session's events in
order, everything queued for a session folded together and decided on once. Each session's state is
cached and, when not cached, rebuilt from the session's subject.

Claims: the firings a decision allows are appended as ``transition_fired`` events, each at the expected
last sequence of the session's claims, so two schedulers can never both consume a marker (the loser's
claim is refused; it re-folds and decides again): a few one after another (``SEQUENTIAL_CLAIMS``, on a
one-replica stream, where nats-server stages an atomic batch on disk), more in atomic batches of up to
``CLAIM_BATCH`` (``EventLog.append_batch``), so a fan-out of 1,000 costs one round trip, not 1,000. A
decision with more firings continues with the rest of its plan in the same call. Work is sent with
each claim made one by one (``WorkItem.claim_pending``: executors run it once the claim's republish says
it is stored, ``_send_with_claim``) or right after a batch commits, pipelined, with a ``Nats-Msg-Id``
made from the firing id, and an event is acked only once its consequences are in the log, so a
scheduler killed anywhere leaves nothing undone for the next one. Claims that land past events not
folded yet are folded first, and those events as they come (``Ahead``).

A ``confirm=True`` firing is claimed like any other, then asked about (``confirm_transition``, Msg-Id
``confirm:<firing>``) and given a durable deadline (``deadlines.py``); it is dispatched once the log
holds its ``accept_transition``. Asking, like dispatching, is redone for any firing this process has
not handled, so a scheduler that died between claiming and asking leaves nothing unasked.

No firing stuck (``leases.py``): a session with firings in flight has a durable lease timer; every
``PETRIBUS_WORK_LEASE_S`` (60 s) whichever scheduler is alive checks that each of its firings in flight
still has its work item in PB_WORK, and sends again the ones that were lost. A lost work item is thus
sent again within one lease period while any scheduler runs.

A session never poisons the service: when folding or deciding for a session raises, its events are
nak'ed with a pause that doubles with each delivery (``PETRIBUS_SCHEDULER_RETRY_S`` up to
``PETRIBUS_SCHEDULER_RETRY_MAX_S``), the session gets one ``error`` event (code ``scheduler_failed``,
Msg-Id and expected sequence made from the log position, so retries at the same position do not
repeat it), and every other session keeps flowing. A failure of the bus itself is retried the same way
but not reported in the session: it is not the session's fault.

Deleted sessions stay deleted (``petribus.deletion``): the scheduler follows the ``PB_DELETED`` bucket
through a KV watch and acks a deleted session's events without acting on them; one delivered after the
deletion was appended after its purge (a firing or a reply still on its way), so the subject is purged
again. Idle sessions expire (``expiry.py``, ``PETRIBUS_SESSION_TTL_S``): each has a durable idle check,
armed by the first process that folds it.

Cache coherence when several schedulers share the consumer: each process tracks the consumer
sequence it was delivered. While it is contiguous, every event went through this process and the
cached states are exact. A gap (another process got some events) or a redelivery of an event this
process did not nak itself bumps an epoch; a session whose cache predates the epoch reads the events
it missed before deciding.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, NamedTuple

from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from petribus import deletion, deploy, subjects, tracing
from petribus.deployed import Deployed
from petribus.deployed import follow as follow_deployments
from petribus.bus import (
    MAX_BATCH,
    EventLog,
    WrongLastSequence,
    claims_republished,
    ensure_event_consumer,
    on_reconnect,
)
from petribus.consumer import PullConsumer
from petribus.core import Firing, PlannedFiring, SessionState, apply, choose_firings, fold, locate
from petribus.deletion import SessionDeleted, Tombstones
from petribus.errors import PetribusError
from petribus.events import (
    ConfirmTransition,
    ErrorEvent,
    Marker,
    TransitionFailed,
    TransitionFired,
    decode,
    new_id,
)
from petribus.files import FileStore
from petribus.net import Net
from petribus.registry import Registry
from petribus.service import Service
from petribus.session_queues import SessionQueues
from petribus.settings import Settings
from petribus.work import WorkItem
from petribus_scheduler.deadlines import ConfirmDeadline, Deadlines
from petribus_scheduler.expiry import IdleChecks
from petribus_scheduler.leases import Lease, Leases
from petribus_scheduler.pools import MissingPools
from petribus_scheduler.timers import retry_delay

Key = tuple[str, str]
# Only these can make a transition enabled (markers arrive or come back, a firing ends and frees a
# concurrency slot) or make a firing ready to dispatch (accept). Other events need no decision.
ENABLING = frozenset({"marker_added", "transition_completed", "transition_failed", "reject_transition",
                      "accept_transition"})
OPENINGS = ("session_created", "session_forked")  # how a session's log begins (unless a test wrote it)
IN_FLIGHT = ("claimed", "started")  # a firing whose work item is in PB_WORK (or should be)
# ``transition_started`` decides nothing (a quarter of a busy log): it is acked as it arrives and never
# folded. Its status is for readers of the log: this process treats a started firing as claimed (both
# are in flight; work it sent is not sent again, and a rebuild reads the whole log), and reads the log
# itself where the difference counts (pools.py). It is delivered all the same: a consumer filtered on
# the other kinds costs nats-server a walk of every subject of a message block per message delivered
# (measured in docs/benchmarks.md), against a parse and an ack here.
STARTED = ".transition_started"
MAX_CONFLICT_RETRIES = 50
CLAIM_BATCH = MAX_BATCH  # firings claimed by one atomic append: the most the server takes
# Up to this many firings of one decision are claimed one after another rather than in an atomic batch,
# when the stream has one replica: nats-server stages such a batch in a file store of its own, made,
# fsynced and removed for every batch (2.7-2.8 ms whatever its size, where 8, 12 and 16 guarded appends
# one after another take 1.8, 2.5 and 3.3 ms; docs/benchmarks.md). Under load the staging was a quarter to
# two fifths of the server's CPU with 12 here; with 32, sustained firings went up by a seventh and the
# server's CPU per firing down by a quarter, and each claim's work goes out with it, so half of a
# 32-firing decision is running before a batch would have landed. A replicated stream stages
# batches in memory.
SEQUENTIAL_CLAIMS = 32
SCHEDULER_FAILED = "scheduler_failed"
ENVELOPE_BYTES = 4096  # room left in max_payload for the subject, the headers and the protocol line


class ClaimContention(PetribusError):
    """Other writers kept moving the session on while this scheduler tried to claim."""

    code = "claim_contention"
    retryable = True


class Delivered(NamedTuple):
    """An event delivered by the ``scheduler`` consumer, with the cache epoch it arrived in."""

    msg: Msg
    epoch: int


class Revalidate(NamedTuple):
    """Re-read a cached session and act on whatever it allows: after a reconnect, and in the sweep."""

    reason: str


class StaleRead(PetribusError):
    """A read of the session came back without the event being decided on (a replica behind its leader)."""

    code = "stale_read"
    retryable = True


READ_AGAIN = (0.05, 0.1, 0.2, 0.4, 0.8)  # pauses before reading a session again that came back behind


class Ahead:
    """This process's claims that landed past events it had not folded yet (others' markers, starts,
    outputs appended between its fold and its claims), folded before those events.

    The claims are checked against the session's claims only, so they hold whatever else landed; the
    events in between are folded as they are delivered, in order, after the claims (``_fold_behind``):
    the fold takes markers in and firings out by id, so the marking comes out as folded in log order.
    Reading them from the log instead, at once, is a search of the stream from ``low`` for the
    session's subjects: the costliest request nats-server serves here. No decision is made on the
    session until the claims are delivered back (``pending`` empty): by then every event before them
    was delivered (a consumer delivers in stream order), the fold is the log's up to its last sequence
    again, and what the decision records (``planned_at``) replays exactly. A gap that deliveries
    cannot close (another scheduler process was delivered some) is read from the log.
    """

    __slots__ = ("low", "top", "mine", "pending", "filled")

    def __init__(self, low: int) -> None:
        self.low = low  # the fold holds every event up to here
        self.top = low  # the newest claim of this process folded
        self.mine: set[int] = set()  # those claims' sequences
        self.pending: set[int] = set()  # of those, the ones not delivered back yet
        self.filled: set[int] = set()  # events between low and top folded since

    def claimed(self, seqs: list[int]) -> None:
        self.top = seqs[-1]
        self.mine.update(seqs)
        self.pending.update(seqs)


def _fold_behind(state: SessionState, seq: int, event: Any) -> None:
    """Fold an event that landed before claims already folded (``Ahead``)."""
    top, fired = state.last_seq, state.last_fired
    state.last_seq = seq - 1  # ``apply`` folds only what is past the last sequence
    try:
        apply(state, seq, event)
    finally:
        state.last_seq, state.last_fired = top, max(fired, state.last_fired)


class LeaseCheck(NamedTuple):
    """A due lease, checked in its session's queue so it never races the session's own events."""

    lease: Lease
    result: asyncio.Future[float | None]  # when the lease is due again; None: it is done


class Scheduler(Service):
    name = "scheduler"

    def __init__(self, settings: Settings, nets: Iterable[Net], *, instance: str | None = None,
                 cache_size: int = 10_000, ack_wait_s: float = 30.0) -> None:
        super().__init__(settings)
        self.nets: dict[str, Net] = {}
        self.shapes: dict[str, Any] = {}
        self.guarded: set[str] = set()
        for net in nets:
            self.add_net(net)
        self.deployments = False  # whether bots are deployed versions, loaded while running (add_net)
        self.deployed: Deployed | None = None
        self.instance = instance or f"scheduler-{uuid.uuid4().hex[:8]}"
        self.cache_size = cache_size
        self.sequential_claims = SEQUENTIAL_CLAIMS if settings.replicas <= 1 else 1
        self.pipelined = False  # work sent together with its claim (start: PB_EVENTS republishes claims)
        self.ack_wait_s = ack_wait_s
        self.sessions: OrderedDict[Key, SessionState] = OrderedDict()
        self.verified: dict[Key, int] = {}
        self.ahead: dict[Key, Ahead] = {}  # sessions whose fold has own claims past events not yet folded
        self.epoch = 0
        self.last_consumer_seq = 0
        self.nakked: OrderedDict[int, None] = OrderedDict()  # stream seqs this process nak'ed
        self.dispatched: OrderedDict[str, None] = OrderedDict()
        # When this process last armed or renewed a session's lease: that lease is pending for a period.
        self.leased: OrderedDict[Key, float] = OrderedDict()
        self.asked: OrderedDict[str, None] = OrderedDict()  # confirmations asked and given a deadline
        self.confirm_timeout = settings.confirm_timeout_s if settings.confirm_timeout_s > 0 else None
        self.stats = {"fired": 0, "claim_batches": 0, "conflicts": 0, "rebuilds": 0, "catchups": 0,
                      "failed": 0, "redispatched": 0, "stalled": 0, "stale_reads": 0, "claimed_past": 0,
                      "starts_acked": 0, "atomic_batches": 0, "sent_with_claim": 0, "orphaned_work": 0}
        self.log = self.log.bind(instance=self.instance)
        self._sweep_now = asyncio.Event()
        self.missing = MissingPools(self.log)
        self.idle: IdleChecks | None = None  # expiry, when PETRIBUS_SESSION_TTL_S is set
        self.queues: SessionQueues[Delivered | LeaseCheck | Revalidate] = SessionQueues(
            self._serve, done=self._done, spawn=self.spawn, log=self.log)

    def add_net(self, net: Net) -> None:
        """Schedule ``net``'s sessions too, from now on (a deployed version loaded while running)."""
        self.nets[net.bot] = net
        self.shapes[net.bot] = net.shape()
        if any(t.when for t in net.transitions):
            self.guarded.add(net.bot)

    async def start(self) -> None:
        nc = await self.connect()
        self.js = nc.jetstream()
        self.events = EventLog(nc, self.js)
        if self.deployments:  # every deployed version, before the first event is taken
            self.deployed = await follow_deployments(nc, role="scheduler", instance=self.instance,
                                                     data_dir=self.settings.data_dir, add_net=self.add_net,
                                                     replicas=self.settings.replicas)
        async def ensure() -> None:
            await ensure_event_consumer(self.js, subjects.SCHEDULER_DURABLE, ack_wait_s=self.ack_wait_s)

        await ensure()
        # Work sent together with its claim needs executors told when the claim is stored (bus.py).
        self.pipelined = await claims_republished(self.js)
        # Before the first dispatch: whether a pool has executors is asked at every one (pools.py).
        await self.missing.start(Registry(self.js, heartbeat_s=self.settings.registry_heartbeat_s,
                                          replicas=self.settings.replicas), self.events)
        self.consumer = PullConsumer(nc, subjects.EVENTS_STREAM, subjects.SCHEDULER_DURABLE,
                                     max_inflight=self.settings.scheduler_batch * 4, ensure=ensure)
        await self.consumer.start()
        retry = {"retry_s": self.settings.scheduler_retry_s,
                 "retry_max_s": self.settings.scheduler_retry_max_s}
        self.deadlines = Deadlines(nc, self.events, self.log, ack_wait_s=self.ack_wait_s, **retry)
        await self.deadlines.start()
        self.leases = Leases(nc, self.log, self.renew, period_s=self.settings.work_lease_s,
                             ack_wait_s=self.ack_wait_s, **retry)
        await self.leases.start()
        # Deleted sessions (petribus.deletion): their late events are acked, and purged again.
        self.tombstones = Tombstones(nc)
        await self.tombstones.start()
        if self.settings.session_ttl_s > 0:
            self.idle = IdleChecks(nc, self.events, FileStore(self.js, self.settings.max_file_bytes), self.log,
                                   ttl_s=self.settings.session_ttl_s, ack_wait_s=self.ack_wait_s, **retry)
            await self.idle.start()
            self.spawn(self.idle.run(), "expiry")
        self.spawn(self._receive(), "receive")
        self.spawn(self.deadlines.run(), "deadlines")
        self.spawn(self.leases.run(), "leases")
        self.spawn(self._sweep(), "sweep")

        async def reconnected() -> None:
            self.revalidate("reconnected")

        on_reconnect(nc, reconnected)
        self.log.info("scheduler started", bots=sorted(self.nets))

    def revalidate(self, reason: str = "reconnected") -> None:
        """Re-read every session held here and act on it, soon (e.g. after a reconnect to NATS: what was
        appended or lost meanwhile may have woken nobody)."""
        self.epoch += 1  # every cached state must catch up before it decides again
        self._sweep_reason = reason
        self._sweep_now.set()

    async def _sweep(self) -> None:
        """Now and then (and at once after a reconnect), put a ``Revalidate`` in the queue of every cached
        session that holds markers or firings in flight: the few that need something get it, in their
        own order; the rest cost one read of nothing new."""
        while True:
            try:
                await asyncio.wait_for(self._sweep_now.wait(), self.settings.scheduler_sweep_s)
                reason = getattr(self, "_sweep_reason", "reconnected")
            except TimeoutError:
                reason = "sweep"
            self._sweep_now.clear()
            for key, state in list(self.sessions.items()):
                if state.in_flight or any(state.places.values()):
                    self.queues.put(key, Revalidate(reason))

    async def drain(self) -> None:
        await self.consumer.stop()
        await self.leases.stop()  # its checks run in the session queues, which are still served
        await self.queues.idle()  # session tasks finish the events they hold; the rest is redelivered
        await self.deadlines.stop()  # after them: they may still arm deadlines
        await self.missing.stop()
        if self.idle is not None:
            await self.idle.stop()
        await self.tombstones.close()
        if self.deployed is not None:
            await self.deployed.close()

    async def _receive(self) -> None:
        while True:
            for msg in await self.consumer.next_batch(self.settings.scheduler_batch):
                md = msg.metadata
                # A redelivery of what we nak'ed ourselves tells nothing new; any other may follow another
                # process's work on the session, as does a gap in the consumer sequence.
                foreign = md.num_delivered > 1 and md.sequence.stream not in self.nakked
                self.nakked.pop(md.sequence.stream, None)
                if md.sequence.consumer != self.last_consumer_seq + 1 or foreign:
                    self.epoch += 1  # someone else saw events we did not: caches need checking
                self.last_consumer_seq = md.sequence.consumer
                if msg.subject.endswith(STARTED):  # decides nothing: acked as it arrives, never queued
                    self.stats["starts_acked"] += 1
                    await msg.ack()
                    self.consumer.release()
                    continue
                try:
                    key = subjects.parse_events(msg.subject)
                except ValueError:
                    await msg.term()
                    self.consumer.release()
                    continue
                if key[0] not in self.nets:
                    if self.deployed is not None and deploy.split_internal(key[0]) is not None:
                        # A deployed version this process has not loaded: another scheduler's, or ours in a
                        # moment. Not ours to drop.
                        await msg.nak(delay=self.deployed.retry_after(key[0]))
                    else:
                        await msg.ack()  # another deployment's bot: not ours to schedule
                    self.consumer.release()
                    continue
                self.queues.put(key, Delivered(msg, self.epoch))

    async def _serve(self, key: Key, items: list[Delivered | LeaseCheck | Revalidate]) -> None:
        """Serve what is queued for one session: its events first (folded together, one decision, acked
        together), then any due lease, which so sees the session as those events left it, then a
        revalidation if one was asked for and the events did not just do its work."""
        batch = [i for i in items if isinstance(i, Delivered)]
        checks = [i for i in items if isinstance(i, LeaseCheck)]
        revalidate = next((i for i in items if isinstance(i, Revalidate)), None)
        if self.tombstones.deleted(*key):
            await self._deleted(key, batch, checks)
            return
        try:
            if batch:
                try:
                    await self._handle(key, batch)
                except SessionDeleted:
                    await self._deleted(key, batch, [])
                except Exception as exc:
                    await self._park(key, batch, exc)
                else:
                    for msg, _ in batch:
                        await msg.ack()
            if revalidate is not None and not batch:
                await self._revalidate(key, revalidate.reason)
            for check in checks:
                try:
                    due = await self._renew(key, check.lease)
                except Exception as exc:
                    self._forget(key)
                    if not check.result.done():
                        check.result.set_exception(exc)
                else:
                    if not check.result.done():
                        check.result.set_result(due)
        finally:
            for check in checks:  # never leave a lease waiting (an ack failed, the service stops)
                if not check.result.done():
                    check.result.set_exception(PetribusError("the session's lease was not checked",
                                                             code="lease_unchecked", retryable=True))

    async def _deleted(self, key: Key, batch: list[Delivered], checks: list[LeaseCheck]) -> None:
        """A deleted session's events are acked and not acted on; one that was delivered landed after the
        deletion's purge (a firing or reply still on its way), so the subject is purged again."""
        self._forget(key)
        for check in checks:
            if not check.result.done():
                check.result.set_result(None)  # nothing in flight any more: the lease is done
        if batch:
            try:
                await deletion.purge_again(self.events, *key)
            except Exception as exc:  # the bus is down: the events come back, and the purge is tried again
                self.log.warning("could not purge a deleted session again", session_id=key[1], error=repr(exc))
                for msg, _ in batch:
                    await msg.nak(delay=1.0)
                return
        for msg, _ in batch:
            await msg.ack()

    async def _revalidate(self, key: Key, reason: str) -> None:
        """Catch the cached session up and claim, dispatch and ask whatever it allows. Finding anything to
        do here means events alone had left the session stalled: say so."""
        state = self.sessions.get(key)
        if state is None:
            return  # evicted: its next event rebuilds it
        before = (self.stats["fired"], len(self.dispatched), len(self.asked))
        try:
            await self._catch_up(key, state)
            self.verified[key] = self.epoch
            await self._advance(key, state)
        except Exception as exc:  # the next sweep or event tries again
            self._forget(key)
            self.log.warning("revalidation failed", session_id=key[1], reason=reason, error=repr(exc))
            return
        if (self.stats["fired"], len(self.dispatched), len(self.asked)) != before:
            self.stats["stalled"] += 1
            self.log.warning("stalled session found and resumed", session_id=key[1], reason=reason,
                             fired=self.stats["fired"] - before[0])

    def _done(self, items: list[Delivered | LeaseCheck | Revalidate]) -> None:
        delivered = sum(isinstance(i, Delivered) for i in items)
        if delivered:
            self.consumer.release(delivered)

    async def _park(self, key: Key, batch: list[Delivered], exc: Exception) -> None:
        """A session step failed: forget the session's cache, say so in its log (once per log position)
        unless the bus itself failed, and hand its events back with a pause that grows per delivery."""
        self._forget(key)
        deliveries = max(d.msg.metadata.num_delivered or 1 for d in batch)
        first, most = self.settings.scheduler_retry_s, self.settings.scheduler_retry_max_s
        log = self.log.bind(session_id=key[1], deliveries=deliveries,
                            retry_in_s=retry_delay(deliveries, first_s=first, max_s=most))
        if isinstance(exc, PetribusError) and exc.retryable:
            log.warning("session step failed; will retry", error=repr(exc))
        else:
            self.stats["failed"] += 1
            log.error("session step failed; session parked", error=repr(exc), exc_info=exc)
            await self._report(key, batch, exc)
        for msg, _ in batch:
            try:
                await msg.nak(delay=retry_delay(msg.metadata.num_delivered or 1, first_s=first, max_s=most))
                self.nakked[msg.metadata.sequence.stream] = None
            except Exception as nak_exc:  # disconnected: JetStream redelivers after ack_wait anyway
                log.warning("could not nak", error=repr(nak_exc))
        while len(self.nakked) > 100_000:
            self.nakked.popitem(last=False)

    async def _report(self, key: Key, batch: list[Delivered], exc: Exception) -> None:
        """One ``error`` event right after the newest event that failed, unless that event is such an
        error already. Appended at that position only, so retries (which fail at the same position)
        never repeat it; a newer event that fails too is reported after itself."""
        last = max(batch, key=lambda d: d.msg.metadata.sequence.stream).msg
        seq = last.metadata.sequence.stream
        try:
            failed = decode(last.data)
        except ValidationError:
            failed = None
        if isinstance(failed, ErrorEvent) and failed.code == SCHEDULER_FAILED:
            return
        error = ErrorEvent(
            bot=key[0], session_id=key[1], cause=failed.id if failed is not None else None,
            code=SCHEDULER_FAILED,
            message=f"The scheduler could not process this session ({type(exc).__name__}: {str(exc)[:300]}). "
                    "Nothing fires in it until that is fixed; its markers stay where they are, and it is "
                    f"tried again with growing pauses (up to {self.settings.scheduler_retry_max_s:g} s). "
                    f"Look for session_id={key[1]} in the scheduler's log, fix the bot or the event that "
                    "fails, and the session carries on by itself.")
        try:
            await self.events.append(error, expected_last_seq=seq,
                                     msg_id=f"{SCHEDULER_FAILED}:{key[1]}:{seq}")
        except WrongLastSequence:
            pass  # the session moved on: the newer event's own failure (if it fails) is reported after it
        except Exception as report_exc:
            self.log.error("could not report a failed session", session_id=key[1], error=repr(report_exc))

    async def _handle(self, key: Key, batch: list[Delivered]) -> None:
        decide = False
        for msg, epoch in batch:
            state, due = await self._fold_one(key, msg, epoch)
            decide = decide or due
        if decide:
            # The state object itself, not a cache lookup: another session's rebuild may evict it.
            if tracing.active():
                with await self._decision_span(key, batch, state):
                    await self._advance(key, state)
            else:
                await self._advance(key, state)

    async def _decision_span(self, key: Key, batch: list[Delivered], state: SessionState) -> Any:
        """The span of a decision: a child of the newest event folded (of its append), linked to the other
        events delivered with it. A read may have folded events not delivered yet (a rebuild or catch-up
        reads to the end of the subject); then the newest of those is the parent, its traceparent read
        back from the log: it is what the decision acts on, and its own delivery will find it folded."""
        causes = [tracing.parent_of(d.msg.headers) for d in batch]
        if state.last_seq > max(d.msg.metadata.sequence.stream for d in batch):
            try:
                newest = await self.js.get_msg(subjects.EVENTS_STREAM, seq=state.last_seq)
                causes.append(tracing.parent_of(newest.headers))
            except Exception as exc:  # only the trace's shape depends on it: decide anyway
                self.log.debug("could not read the newest event's trace", session_id=key[1], error=repr(exc))
        return tracing.span("scheduler decide", parent=causes[-1], links=causes[-2::-1], kind="consumer",
                            attributes={"petribus.bot": key[0], "petribus.session_id": key[1],
                                        "petribus.events": len(batch)})

    async def _fold_one(self, key: Key, msg: Msg, epoch: int) -> tuple[SessionState, bool]:
        """Bring the cached state up to ``msg``; the state, and whether a decision may be due."""
        seq = msg.metadata.sequence.stream
        state = self.sessions.get(key)
        decide = True
        if state is None:
            # A session's first event needs no read: nothing precedes it (a fork's may enable firings).
            state = self._opened(key, seq, msg) or await self._rebuild(key, at_least=seq)
            await self._reach(key, state, seq)
            self.verified[key] = epoch
            if self.idle is not None and state.last_seq:
                await self.idle.watch(*key, state.last_seq)  # first fold here: the session's idle check
        elif (ahead := self.ahead.get(key)) is not None and self.verified.get(key, -1) >= epoch:
            decide = await self._fold_ahead(key, state, ahead, seq, msg)
        elif seq <= state.last_seq and ahead is None:
            decide = False  # already folded (our own append, or read during a catch-up)
        elif self.verified.get(key, -1) < epoch:
            await self._catch_up(key, state, at_least=seq)
            await self._reach(key, state, seq)
            self.verified[key] = epoch
        else:
            try:
                event = decode(msg.data)
                apply(state, seq, event)
                decide = event.type in ENABLING
            except ValidationError:
                self.log.error("undecodable event skipped", session_id=key[1], seq=seq)
                state.last_seq = seq
                decide = False
        if key in self.sessions:
            self.sessions.move_to_end(key)
        else:
            self.sessions[key] = state  # evicted meanwhile by another session's rebuild: keep it
        return state, decide

    async def _fold_ahead(self, key: Key, state: SessionState, ahead: Ahead, seq: int, msg: Msg) -> bool:
        """``_fold_one`` for a session with own claims folded ahead (``Ahead``): whether to decide now."""
        if seq in ahead.pending:
            ahead.pending.discard(seq)
            if ahead.pending:
                return False
            del self.ahead[key]  # every event up to the claims is folded: decide on all of it
            return True
        if seq <= ahead.low or seq in ahead.mine or seq in ahead.filled:
            return False  # folded already
        if seq > ahead.top:  # past the claims, which were not delivered here: read what is missing
            await self._catch_up(key, state, at_least=seq)
            return True
        try:
            _fold_behind(state, seq, decode(msg.data))
        except ValidationError:
            self.log.error("undecodable event skipped", session_id=key[1], seq=seq)
        ahead.filled.add(seq)
        return False

    def _opened(self, key: Key, seq: int, msg: Msg) -> SessionState | None:
        """The state of a session whose first event ``msg`` is (``session_created``, ``session_forked``),
        folded from it alone; None for any other event.

        Every opening is appended to an empty subject (a fresh id, or ``expected_last_seq=0``), so
        nothing precedes it and reading the subject would find only it: but that read is a search of
        the stream from its start for the session's subject, the costliest request nats-server serves
        here (once per new session, in proportion to the stream's size). Only on a first delivery: a
        redelivered opening (a restart, a nak) may have later events acked already, which a read finds.
        Events after it delivered to another scheduler process are a gap in this one's consumer
        sequence, which the epoch check catches up on like any cached session's.
        """
        if msg.subject.rsplit(".", 1)[-1] not in OPENINGS or msg.metadata.num_delivered != 1:
            return None  # pb.ev.<bot>.<session>.<kind>
        try:
            event = decode(msg.data)
        except ValidationError:
            return None  # the rebuild logs and skips it
        state = fold([(seq, event)])
        state.bot, state.session_id = key
        self._cache(key, state)
        return state

    def _cache(self, key: Key, state: SessionState) -> None:
        self.sessions[key] = state
        self.ahead.pop(key, None)  # a state just folded from the log holds it all
        while len(self.sessions) > self.cache_size:
            old, _ = self.sessions.popitem(last=False)
            self.verified.pop(old, None)
            self.ahead.pop(old, None)

    async def _rebuild(self, key: Key, *, at_least: int | None = None) -> SessionState:
        self.stats["rebuilds"] += 1
        log = await self.events.read(*key, at_least=at_least)
        if log and log[0][1].type not in OPENINGS and await deletion.is_deleted(self.js, *key):
            # Appended around a deletion, before this process's watch knew of it: still deleted.
            raise SessionDeleted(f"session {key[1]} was deleted; its log holds only late events")
        state = fold(log)
        state.bot, state.session_id = key
        self._cache(key, state)
        return state

    async def _catch_up(self, key: Key, state: SessionState, *, at_least: int | None = None) -> None:
        self.stats["catchups"] += 1
        ahead = self.ahead.pop(key, None)
        if ahead is None:
            fold(await self.events.read(*key, after=state.last_seq, at_least=at_least), state)
            return
        # Own claims folded ahead: fill in what landed before them, then go on past them.
        for seq, event in await self.events.read(*key, after=ahead.low, at_least=at_least):
            if seq > ahead.top:
                apply(state, seq, event)
            elif seq not in ahead.mine and seq not in ahead.filled:
                _fold_behind(state, seq, event)

    async def _reach(self, key: Key, state: SessionState, seq: int) -> None:
        """Make sure the state includes event ``seq``, which was just delivered: a direct get may be served
        by a replica behind the stream's leader, and deciding on such a read would act on a marking that
        lacks the very event being decided on (and ack it without a claim). Read again, briefly, else
        fail the step (it is retried)."""
        for pause in READ_AGAIN:
            if state.last_seq >= seq:
                return
            self.stats["stale_reads"] += 1
            await asyncio.sleep(pause)
            await self._catch_up(key, state)
        if state.last_seq < seq:
            try:
                await self.js.get_msg(subjects.EVENTS_STREAM, seq=seq)  # asks the stream's leader
            except NotFoundError:
                return  # the event is gone (the session was deleted): decide on what the log holds
            raise StaleRead(f"session {key[1]}: reads stay behind event {seq} (last read {state.last_seq}); "
                            "a replica is lagging its leader; tried again shortly")

    def _forget(self, key: Key) -> None:
        self.sessions.pop(key, None)
        self.verified.pop(key, None)
        self.ahead.pop(key, None)

    async def _advance(self, key: Key, state: SessionState) -> None:
        """Claim every firing the marking allows, then dispatch every claimed, undispatched firing.

        The plan is claimed one by one (up to ``SEQUENTIAL_CLAIMS`` firings) or in atomic batches of up to
        ``CLAIM_BATCH``; after a batch commits the rest of the plan still holds (only our own claims
        changed the state), so the next batch follows at once. A refused claim (another claim landed)
        re-folds and plans the rest again. Each claim's work is sent with it (one by one) or right after
        its batch commits, and every send is acknowledged before this returns, so the triggering event is
        acked only after all of it.
        """
        net = self.nets[key[0]]
        # Only nets with a ``when=`` pay for guard calls (and for the guard's wider candidate search).
        guard = (lambda t, picked: self._guard(net, t, picked)) if key[0] in self.guarded else None
        conflicts = 0
        while True:
            sent: dict[str, asyncio.Future] = {}
            catchups = self.stats["catchups"]
            plan = self._plan(key, state, guard)
            while plan:
                # The claim's span is the parent of its transition_fired events and of their work items.
                firings = min(len(plan), CLAIM_BATCH)
                with tracing.span("scheduler claim", attributes={"petribus.firings": firings}):
                    past = self.stats["claimed_past"]
                    try:
                        refused = await self._claim(net, state, plan[:CLAIM_BATCH], sent)
                    except WrongLastSequence:
                        refused = True
                    if refused:
                        self.stats["conflicts"] += 1
                        conflicts += 1
                        if conflicts >= MAX_CONFLICT_RETRIES:
                            raise ClaimContention(f"session {key[1]}: still conflicting after {conflicts} "
                                                  "re-folds; it is tried again shortly") from None
                        await self._catch_up(key, state)
                        plan = self._plan(key, state, guard)
                        continue
                    plan = plan[CLAIM_BATCH:]
                    if self.stats["claimed_past"] != past:
                        # Others' events are still to be folded: the rest of the plan waits for the fold
                        # to reach the claims again (``Ahead``), and is then decided on that fold.
                        plan = []
            await self._dispatch(net, state, sent)
            if self.stats["catchups"] == catchups:
                return
            # A claim that landed past others' events, or asking about a confirmation, caught up with
            # events appended meanwhile: delivered later, they look folded already and nothing else
            # would decide on them (a stalled session, found only by the next lease or sweep). Decide on
            # them now.

    def _plan(self, key: Key, state: SessionState, guard: Any) -> list[PlannedFiring]:
        """What the marking allows, within the session's environment's ``max_concurrent_firings`` (a
        deployed version's policy): firings running or claimed count against it."""
        plan = choose_firings(self.shapes[key[0]], state, guard=guard)
        cap = self._cap(key, state)
        if cap is not None and plan:
            running = sum(1 for f in state.in_flight.values() if f.status in IN_FLIGHT)
            plan = plan[:max(0, cap - running)]
        return plan

    def _cap(self, key: Key, state: SessionState) -> int | None:
        if self.deployed is None or (named := deploy.split_internal(key[0])) is None:
            return None
        dep = self.deployed.catalog.deployments().get((state.env or deploy.DEFAULT_ENV, named[0]))
        return None if dep is None else dep.policies.max_concurrent_firings

    async def _claim(self, net: Net, state: SessionState, plan: list[PlannedFiring],
                     sent: dict[str, asyncio.Future]) -> bool:
        """Append one ``transition_fired`` per planned firing if no claim landed since the last one
        folded, and send the work of each as it lands (into ``sent``); whether a claim was refused.

        Only claims consume markers, so events of other kinds appended meanwhile (a marker, a firing's
        start or outputs) leave the plan valid and do not refuse it; they are folded after the claims, as
        they are delivered (``Ahead``). A few firings are claimed one after another, each checked against
        the one before (``SEQUENTIAL_CLAIMS``); more, in one atomic batch. Claimed one by one, a plan may
        land in part: the claims that landed hold, and the caller plans the rest again.
        """
        fired = [TransitionFired(bot=net.bot, session_id=state.session_id, firing_id=new_id(),
                                 transition=p.transition, consumed=list(p.consumed),
                                 confirm=net.transition(p.transition).confirm
                                 or p.transition in state.halt_before, planned_at=state.last_seq) for p in plan]
        key = (net.bot, state.session_id)
        if len(fired) > self.sequential_claims:
            seqs = await self.events.append_batch(fired, expected_last_seq=state.last_fired, kind="transition_fired",
                                                  msg_ids=[f"fire:{f.firing_id}" for f in fired])
            self.stats["atomic_batches"] += 1
            self._claimed(key, state, seqs, fired)
            await self._send_claimed(net, state, fired, sent)
            return False
        for i, event in enumerate(fired):
            # Its work goes out first, on the same connection, marked as waiting for this claim: the two
            # round trips overlap, and executors run it once the claim's republish says it is stored.
            work = await self._send_with_claim(net, state, plan[i], event) if self.pipelined else None
            try:
                seq = await self.events.append(event, expected_last_seq=state.last_fired, kind="transition_fired",
                                               msg_id=f"fire:{event.firing_id}")
            except WrongLastSequence:
                if work is not None:
                    # Never stored, so never republished: its executor finds no claim in the log and drops it.
                    self.stats["orphaned_work"] += 1
                    work.add_done_callback(_retrieved)
                if i == 0:
                    raise
                return True  # another claim landed: the rest of the plan is made again on a fresh fold
            except BaseException:
                if work is not None:  # the claim may have landed or not: its executor asks the log
                    work.add_done_callback(_retrieved)
                raise
            self._claimed(key, state, [seq], [event])
            if work is not None:
                sent[event.firing_id] = work
            else:
                await self._send_claimed(net, state, [event], sent)
        return False

    async def _send_with_claim(self, net: Net, state: SessionState, planned: PlannedFiring,
                               event: TransitionFired) -> asyncio.Future | None:
        """Send the work of a claim about to be made (``WorkItem.claim_pending``), or None if it must wait
        for the claim: a firing to be confirmed first, or inputs too large for one work item (then the
        claim lands, and its work fails it as after any claim)."""
        if event.confirm:
            return None
        inputs = _markers(state, planned.consumed)
        if inputs is None:
            return None
        item = WorkItem(bot=net.bot, session_id=state.session_id, firing_id=event.firing_id,
                        transition=event.transition, inputs=inputs, fired_seq=0, fresh=True,
                        claim_pending=True, trace=tracing.traceparent())
        payload = item.model_dump_json().encode()
        if len(payload) > self._work_limit:
            return None
        self.stats["sent_with_claim"] += 1
        return await self._publish_work(item, net.transition(event.transition).pool, payload)

    @property
    def _work_limit(self) -> int:
        """The largest work item the bus takes in one message."""
        return self.events.nc.max_payload - ENVELOPE_BYTES

    async def _publish_work(self, item: WorkItem, pool: str, payload: bytes,
                            redispatch: str | None = None) -> asyncio.Future:
        traced = None if item.trace is None else {tracing.TRACEPARENT: item.trace}
        # Through the log's publisher: a send whose answer died with a server is resent (same Msg-Id).
        return await self.events.publisher.publish_soon(item.subject(pool), payload,
                                                        msg_id=item.msg_id(redispatch), headers=traced)

    def _claimed(self, key: Key, state: SessionState, seqs: list[int], fired: list[TransitionFired]) -> None:
        if seqs[-1] - state.last_seq != len(seqs) or key in self.ahead:
            # Others' events landed between the fold and the claims: folded when they are delivered.
            self.stats["claimed_past"] += 1
            self.ahead.setdefault(key, Ahead(state.last_seq)).claimed(seqs)
        for seq, event in zip(seqs, fired):
            apply(state, seq, event)
        self.stats["fired"] += len(fired)
        self.stats["claim_batches"] += 1
        self.log.debug("fired", session_id=state.session_id, firings=len(fired), first_seq=seqs[0])

    async def _send_claimed(self, net: Net, state: SessionState, fired: list[TransitionFired],
                            sent: dict[str, asyncio.Future]) -> None:
        for event in fired:
            firing = state.in_flight.get(event.firing_id)
            if firing is not None and firing.status == "claimed":
                sent[firing.id] = await self._send_work(net, state, firing, fresh=True)

    async def _ask(self, net: Net, state: SessionState, asks: list[Firing]) -> None:
        """Ask the user about each confirm firing (once: Msg-Id and fold) and arm its deadline."""
        key = (net.bot, state.session_id)
        for f in asks:
            for _ in range(MAX_CONFLICT_RETRIES):
                if (f.asked_at is not None or f.status != "awaiting_confirmation"
                        or state.in_flight.get(f.id) is not f):
                    break
                t = net.transition(f.transition) if net.has_transition(f.transition) else None
                ask = ConfirmTransition(bot=net.bot, session_id=state.session_id, firing_id=f.id,
                                        transition=f.transition, description=t.description if t else None,
                                        markers=[pm.marker for pm in f.consumed],
                                        timeout=self.confirm_timeout, cause=f.id)
                try:
                    # At the folded sequence, so the cache never skips an event appended meanwhile.
                    seq = await self.events.append_once(ask, msg_id=f"confirm:{f.id}",
                                                        expected_last_seq=state.last_seq)
                except WrongLastSequence:
                    seq = None
                if seq is None:  # someone else appended something (maybe this very ask): look again
                    await self._catch_up(key, state)
                else:
                    apply(state, seq, ask)
        due = [ConfirmDeadline(bot=net.bot, session_id=state.session_id, firing_id=f.id, due=d)
               for f in asks if f.status == "awaiting_confirmation" and (d := f.confirm_deadline) is not None]
        if due:
            await self.deadlines.publish(due)
        for f in asks:
            self.asked[f.id] = None
        while len(self.asked) > 100_000:
            self.asked.popitem(last=False)

    async def _dispatch(self, net: Net, state: SessionState, sent: dict[str, asyncio.Future] | None = None) -> None:
        """Send the work of every claimed firing not yet sent by this process (after a restart, a
        rival's claim, an accept), ask about every waiting confirmation, arm the session's lease, and
        wait for all of it.

        The lease is armed when this sends the session's oldest firing in flight (its work starts
        here) unless this process armed or renewed one less than half a period ago (that one is still
        pending and will see the new firing), and on this process's first decision for the session
        (a lease lost with the server's last unsynced writes comes back with the session's next event
        after a restart).
        """
        sent = dict(sent or {})
        asks: list[Firing] = []
        for f in state.in_flight.values():
            if f.status == "claimed":
                if f.id not in self.dispatched and f.id not in sent:
                    sent[f.id] = await self._send_work(net, state, f)
            elif f.status == "awaiting_confirmation" and f.id not in self.asked:
                asks.append(f)
        if asks:
            await self._ask(net, state, asks)
        acks = list(sent.values())
        key = (net.bot, state.session_id)
        oldest = _oldest_in_flight(state)
        armed = self.leased.get(key)
        now = time.time()
        lease = None
        if oldest is not None and (armed is None or (
                oldest.id in sent and now - armed >= self.settings.work_lease_s / 2)):
            lease = self.leases.lease(net.bot, state.session_id, oldest.id)
            acks.append(await self.leases.arm(lease))
        if not acks:
            return
        done = await asyncio.gather(*acks)  # acked by JetStream before the triggering event is acked
        self._sent(sent)
        if sent:
            self.missing.check(net, state, sent)  # work for a pool nobody serves: say so, once
        if lease is not None:
            self._armed(key, now, duplicate=bool(done[-1].duplicate))

    def _armed(self, key: Key, at: float | None, *, duplicate: bool = False) -> None:
        """Note that this process armed or renewed the session's lease at ``at`` (None: it dropped it).

        A publish that JetStream dropped as a duplicate found another process's lease pending, whose
        due time is unknown here: noted as armed long enough ago not to hold back the next arming.
        """
        self.leased.pop(key, None)
        if at is not None:
            self.leased[key] = at - self.settings.work_lease_s / 2 if duplicate else at
            while len(self.leased) > 100_000:
                self.leased.popitem(last=False)

    def _sent(self, firing_ids: Iterable[str]) -> None:
        for firing_id in firing_ids:
            self.dispatched[firing_id] = None
        while len(self.dispatched) > 100_000:
            self.dispatched.popitem(last=False)

    async def _send_work(self, net: Net, state: SessionState, f: Firing, *,
                         redispatch: str | None = None, fresh: bool = False) -> asyncio.Future:
        """Send a firing's work item. ``fresh``: this process made the claim a moment ago and sends its
        work for the first time (its executor may then skip reading the log on the first delivery)."""
        item = WorkItem(bot=net.bot, session_id=state.session_id, firing_id=f.id, transition=f.transition,
                        inputs=[pm.marker for pm in f.consumed], fired_seq=f.fired_seq, fresh=fresh,
                        trace=tracing.traceparent())
        pool = net.transition(f.transition).pool if net.has_transition(f.transition) else "cpu"
        payload = item.model_dump_json().encode()
        limit = self._work_limit
        if len(payload) > limit:
            # The bus would refuse it on every try: the firing fails for good, saying why, and its
            # markers go back (not to be offered to this transition again, or it would loop).
            return asyncio.ensure_future(self.events.append(TransitionFailed(
                bot=net.bot, session_id=state.session_id, firing_id=f.id, transition=f.transition,
                error_type="InputsTooLarge", retryable=False, attempt=max(1, f.attempts), cause=f.id,
                error=f"the {len(f.consumed)} marker(s) transition {f.transition!r} consumes take "
                      f"{len(payload):,} bytes as one work item, over the {limit:,} bytes the bus takes "
                      "(nats-server max_payload); consume fewer markers per firing or keep large data in "
                      "files, or raise max_payload on the server"), msg_id=f"fail:{f.id}"))
        return await self._publish_work(item, pool, payload, redispatch)

    async def renew(self, lease: Lease) -> float | None:
        """A due lease, checked in the session's queue: when it is due again, or None when it is done."""
        key = (lease.bot, lease.session_id)
        if key[0] not in self.nets:
            return time.time() + self.settings.work_lease_s  # another deployment's bot: for its schedulers
        check = LeaseCheck(lease, asyncio.get_running_loop().create_future())
        self.queues.put(key, check)
        return await check.result

    async def _renew(self, key: Key, lease: Lease) -> float | None:
        """Fold the session up to now and send again the work of every firing in flight whose work item
        is gone from PB_WORK. Then keep ``lease`` (its next due time) while its firing is the oldest in
        flight, move it to the oldest (a new lease; None: this one is done), or drop it (None)."""
        self._armed(key, time.time())  # this very lease is pending: deciding here need not arm another
        state = self.sessions.get(key)
        if state is None:
            state = await self._rebuild(key)
        else:
            await self._catch_up(key, state)
        lost: list[Firing] = []
        if _oldest_in_flight(state) is not None:
            items = await self.js.stream_info(subjects.WORK_STREAM,
                                              subjects_filter=subjects.session_work(*key))
            present = {s.rsplit(".", 1)[1] for s in items.state.subjects or {}}
            in_flight = [f for f in state.in_flight.values() if f.status in IN_FLIGHT]
            lost = [f for f in in_flight if f.id not in present]
            # Their work is there, or is sent again below: not the business of the decision that follows.
            self._sent(f.id for f in in_flight)
        # Events folded here will look already folded when they are delivered: decide on them now.
        await self._advance(key, state)
        if lost:
            # An executor acks only after the outcome is in the log: an outcome that landed since the
            # fold explains a missing item. Fold the session again from its whole log, not only after the
            # cached state's last sequence: a cached state that passed an event without folding it (seen
            # after a fail-over, when reads met a replica that had rejoined) would never see that outcome,
            # and the markers it output would never be decided on. Decide on what the log allows, and send
            # again only the work that is truly lost.
            state = await self._rebuild(key)
            self.verified[key] = self.epoch
            await self._advance(key, state)
            lost = [g for f in lost if (g := state.in_flight.get(f.id)) is not None and g.status in IN_FLIGHT]
        if lost:
            net = self.nets[key[0]]
            round_ = str(int(time.time() // self.settings.work_lease_s))  # the same for every scheduler
            await asyncio.gather(*[await self._send_work(net, state, f, redispatch=round_) for f in lost])
            self._sent(f.id for f in lost)
            self.stats["redispatched"] += len(lost)
            self.log.warning("work items lost; sent again", session_id=key[1], firings=[f.id for f in lost])
        self.missing.check(self.nets[key[0]], state)  # its pool's executors may have gone since
        oldest = _oldest_in_flight(state)
        now = time.time()
        if oldest is None:
            self._armed(key, None)
            return None
        if oldest.id == lease.firing_id:
            self._armed(key, now)
            return now + self.settings.work_lease_s
        # The key ended: the session's lease moves to its oldest firing now. However many old leases of
        # the session move to it at once, its Msg-Id lets one land.
        ack = await (await self.leases.arm(self.leases.lease(key[0], key[1], oldest.id)))
        self._armed(key, now, duplicate=bool(ack.duplicate))
        return None

    def _guard(self, net: Net, transition: str, picked: dict) -> bool:
        ok, why = net.judge(transition, picked)
        if not ok and why != "returns false for them":
            self.log.warning("guard not passed", transition=transition, why=why)
        return ok


async def run(settings: Settings, nets: Iterable[Net]) -> None:
    await Scheduler(settings, nets).run()


def _markers(state: SessionState, ids: Iterable[str]) -> list[Marker] | None:
    """The markers of ``ids`` in the marking, in that order (None if one is not there)."""
    found = []
    for marker_id in ids:
        if (where := locate(state, marker_id)) is None:
            return None
        found.append(where[1].marker)
    return found


def _retrieved(sent: asyncio.Future) -> None:
    """The send of an orphaned work item: whatever became of it, nobody waits on it."""
    if not sent.cancelled():
        sent.exception()


def _oldest_in_flight(state: SessionState) -> Firing | None:
    # in_flight keeps claim order (the fold adds firings in log order).
    return next((f for f in state.in_flight.values() if f.status in IN_FLIGHT), None)
