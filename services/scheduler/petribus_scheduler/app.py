"""The scheduler: folds every session's log and appends the firings its marking allows.

One durable consumer (``scheduler``) over all of PB_EVENTS, shared by every scheduler process. Each
session's state is cached and, when not cached, rebuilt from the session's subject. A firing is
claimed by appending ``transition_fired`` at the expected last subject sequence, so two schedulers
can never both consume a marker: the loser re-folds and decides again. Work is dispatched with a
``Nats-Msg-Id`` made from the firing id, and an event is acked only once its consequences are in
the log, so a scheduler killed anywhere leaves nothing undone for the next one.

A ``confirm=True`` firing is claimed like any other, then asked about (``confirm_transition``, Msg-Id
``confirm:<firing>``) and given a durable deadline (``deadlines.py``); it is dispatched once the log
holds its ``accept_transition``. Asking, like dispatching, is redone for any firing this process has
not handled, so a scheduler that died between claiming and asking leaves nothing unasked.

Cache coherence when several schedulers share the consumer: each process tracks the consumer
sequence it was delivered. While it is contiguous, every event went through this process and the
cached states are exact. A gap (another process got some events) or a redelivery bumps an epoch;
a session whose cache predates the epoch reads the events it missed before deciding.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable

from nats.aio.msg import Msg
from pydantic import ValidationError

from petribus import subjects
from petribus.bus import EventLog, WrongLastSequence, ensure_event_consumer
from petribus.consumer import PullConsumer
from petribus.core import Firing, PlannedFiring, SessionState, apply, choose_firings, fold
from petribus.events import ConfirmTransition, TransitionFired, decode, new_id
from petribus.net import Net
from petribus.service import Service
from petribus.settings import Settings
from petribus.work import WorkItem
from petribus_scheduler.deadlines import ConfirmDeadline, Deadlines

Key = tuple[str, str]
# Only these can make a transition enabled (markers arrive or come back, a firing ends and frees a
# concurrency slot) or make a firing ready to dispatch (accept). Other events need no decision.
ENABLING = frozenset({"marker_added", "transition_completed", "transition_failed", "reject_transition",
                      "accept_transition"})
MAX_CONFLICT_RETRIES = 50


class Scheduler(Service):
    name = "scheduler"

    def __init__(self, settings: Settings, nets: Iterable[Net], *, instance: str | None = None,
                 cache_size: int = 10_000, ack_wait_s: float = 30.0) -> None:
        super().__init__(settings)
        self.nets = {n.bot: n for n in nets}
        self.shapes = {bot: n.shape() for bot, n in self.nets.items()}
        self.guarded = {bot for bot, n in self.nets.items() if any(t.when for t in n.transitions)}
        self.instance = instance or f"scheduler-{uuid.uuid4().hex[:8]}"
        self.cache_size = cache_size
        self.ack_wait_s = ack_wait_s
        self.sessions: OrderedDict[Key, SessionState] = OrderedDict()
        self.verified: dict[Key, int] = {}
        self.epoch = 0
        self.last_consumer_seq = 0
        self.dispatched: OrderedDict[str, None] = OrderedDict()
        self.asked: OrderedDict[str, None] = OrderedDict()  # confirmations asked and given a deadline
        self.confirm_timeout = settings.confirm_timeout_s if settings.confirm_timeout_s > 0 else None
        self.queues: dict[Key, deque[tuple[Msg, int]]] = {}
        self.active: set[Key] = set()
        self._idle = asyncio.Event()  # set while no session task runs
        self._idle.set()
        self.stats = {"fired": 0, "conflicts": 0, "rebuilds": 0, "catchups": 0}
        self.log = self.log.bind(instance=self.instance)

    async def start(self) -> None:
        nc = await self.connect()
        self.js = nc.jetstream()
        self.events = EventLog(nc, self.js)
        await ensure_event_consumer(self.js, subjects.SCHEDULER_DURABLE, ack_wait_s=self.ack_wait_s)
        self.consumer = PullConsumer(nc, subjects.EVENTS_STREAM, subjects.SCHEDULER_DURABLE,
                                     max_inflight=self.settings.scheduler_batch * 4)
        await self.consumer.start()
        self.deadlines = Deadlines(nc, self.events, self.log, ack_wait_s=self.ack_wait_s)
        await self.deadlines.start()
        self.spawn(self._receive(), "receive")
        self.spawn(self.deadlines.run(), "deadlines")
        self.log.info("scheduler started", bots=sorted(self.nets))

    async def drain(self) -> None:
        await self.consumer.stop()
        await self._idle.wait()  # session tasks finish the events they hold; the rest is redelivered
        await self.deadlines.stop()  # after them: they may still arm deadlines

    async def _receive(self) -> None:
        while True:
            for msg in await self.consumer.next_batch(self.settings.scheduler_batch):
                md = msg.metadata
                if md.sequence.consumer != self.last_consumer_seq + 1 or md.num_delivered > 1:
                    self.epoch += 1  # someone else saw events we did not: caches need checking
                self.last_consumer_seq = md.sequence.consumer
                try:
                    key = subjects.parse_events(msg.subject)
                except ValueError:
                    await msg.term()
                    self.consumer.release()
                    continue
                if key[0] not in self.nets:
                    await msg.ack()  # another deployment's bot: not ours to schedule
                    self.consumer.release()
                    continue
                self.queues.setdefault(key, deque()).append((msg, self.epoch))
                if key not in self.active:
                    self.active.add(key)
                    self._idle.clear()
                    asyncio.create_task(self._drain_session(key), name=f"session:{key[1]}")

    async def _drain_session(self, key: Key) -> None:
        """Serve one session's queued events in order: fold all that are here, decide once, ack them.

        A burst of markers for one session thus costs one decision, and the claims it makes no longer
        race the markers already waiting behind them (fewer expected-sequence conflicts).
        """
        queue = self.queues[key]
        try:
            while queue:
                batch = list(queue)
                queue.clear()
                try:
                    await self._handle(key, batch)
                    for msg, _ in batch:
                        await msg.ack()
                except Exception as exc:
                    # Forget what we cached (it may be half-updated) and let JetStream redeliver.
                    self.log.error("session step failed", session_id=key[1], error=repr(exc), exc_info=exc)
                    self._forget(key)
                    for msg, _ in batch:
                        await msg.nak(delay=1.0)
                finally:
                    self.consumer.release(len(batch))
        finally:
            self.active.discard(key)
            if not queue:
                self.queues.pop(key, None)
                if not self.active:
                    self._idle.set()
            else:  # messages arrived between the last pop and now
                self.active.add(key)
                asyncio.create_task(self._drain_session(key), name=f"session:{key[1]}")

    async def _handle(self, key: Key, batch: list[tuple[Msg, int]]) -> None:
        decide = False
        for msg, epoch in batch:
            state, due = await self._fold_one(key, msg, epoch)
            decide = decide or due
        if decide:
            # The state object itself, not a cache lookup: another session's rebuild may evict it.
            await self._advance(key, state)

    async def _fold_one(self, key: Key, msg: Msg, epoch: int) -> tuple[SessionState, bool]:
        """Bring the cached state up to ``msg``; the state, and whether a decision may be due."""
        seq = msg.metadata.sequence.stream
        state = self.sessions.get(key)
        decide = True
        if state is None:
            state = await self._rebuild(key)
            self.verified[key] = epoch
        elif seq <= state.last_seq:
            decide = False  # already folded (our own append, or read during a catch-up)
        elif self.verified.get(key, -1) < epoch:
            await self._catch_up(key, state)
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

    async def _rebuild(self, key: Key) -> SessionState:
        self.stats["rebuilds"] += 1
        state = fold(await self.events.read(*key))
        state.bot, state.session_id = key
        self.sessions[key] = state
        while len(self.sessions) > self.cache_size:
            old, _ = self.sessions.popitem(last=False)
            self.verified.pop(old, None)
        return state

    async def _catch_up(self, key: Key, state: SessionState) -> None:
        self.stats["catchups"] += 1
        fold(await self.events.read(*key, after=state.last_seq), state)

    def _forget(self, key: Key) -> None:
        self.sessions.pop(key, None)
        self.verified.pop(key, None)

    async def _advance(self, key: Key, state: SessionState) -> None:
        """Claim every firing the marking allows, then dispatch every claimed, undispatched firing.

        Each firing's work is sent as soon as its claim is in the log (claims of one session must be
        appended one after another; work need not wait for the rest of them), and every send is
        acknowledged before this returns, so the triggering event is acked only after all of it.
        """
        net = self.nets[key[0]]
        # Only nets with a ``when=`` pay for guard calls (and for the guard's wider candidate search).
        guard = (lambda t, picked: self._guard(net, t, picked)) if key[0] in self.guarded else None
        sent: dict[str, asyncio.Future] = {}
        for _ in range(MAX_CONFLICT_RETRIES):
            plan = choose_firings(self.shapes[key[0]], state, guard=guard)
            if not plan:
                break
            try:
                for p in plan:
                    firing = await self._claim(net, state, p)
                    if firing.status == "claimed":
                        sent[firing.id] = await self._send_work(net, state, firing)
            except WrongLastSequence:
                self.stats["conflicts"] += 1
                await self._catch_up(key, state)
        else:
            raise RuntimeError(f"session {key[1]}: still conflicting after {MAX_CONFLICT_RETRIES} re-folds")
        await self._dispatch(net, state, sent)

    async def _claim(self, net: Net, state: SessionState, p: PlannedFiring) -> Firing:
        t = net.transition(p.transition)
        firing_id = new_id()
        fired = TransitionFired(bot=net.bot, session_id=state.session_id, firing_id=firing_id,
                                transition=p.transition, consumed=list(p.consumed), confirm=t.confirm)
        seq = await self.events.append(fired, expected_last_seq=state.last_seq, msg_id=f"fire:{firing_id}")
        apply(state, seq, fired)
        self.stats["fired"] += 1
        self.log.debug("fired", session_id=state.session_id, firing_id=firing_id, transition=p.transition, seq=seq)
        return state.in_flight[firing_id]

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
        rival's claim, an accept), ask about every waiting confirmation, and wait for all of it."""
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
        if not sent:
            return
        await asyncio.gather(*sent.values())  # acked by JetStream before the triggering event is acked
        for firing_id in sent:
            self.dispatched[firing_id] = None
        while len(self.dispatched) > 100_000:
            self.dispatched.popitem(last=False)

    async def _send_work(self, net: Net, state: SessionState, f: Firing) -> asyncio.Future:
        item = WorkItem(bot=net.bot, session_id=state.session_id, firing_id=f.id, transition=f.transition,
                        inputs=[pm.marker for pm in f.consumed], fired_seq=f.fired_seq)
        pool = net.transition(f.transition).pool if net.has_transition(f.transition) else "cpu"
        return await self.js.publish_async(
            subjects.work(pool), item.model_dump_json().encode(), headers={"Nats-Msg-Id": item.msg_id()})

    def _guard(self, net: Net, transition: str, picked: dict) -> bool:
        t = net.transition(transition)
        if t.when is None:
            return True
        inputs = {net.locations[loc].model: [net.locations[loc].model.model_validate(m.data) for m in ms]
                  for loc, ms in picked.items()}
        try:
            return bool(t.when(inputs))
        except Exception as exc:
            self.log.warning("guard raised; treating as false", transition=transition, error=repr(exc))
            return False


async def run(settings: Settings, nets: Iterable[Net]) -> None:
    await Scheduler(settings, nets).run()
