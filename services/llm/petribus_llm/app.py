"""The LLM service: answers every user message of every session, exactly once, in order per session.

One durable consumer (``llm``) over all of PB_EVENTS, shared by every LLM process; only
``user_message`` events are acted on, the rest are acked at once. Sessions are served in parallel;
within a session, messages are answered one after the other (a queue and a task per session).

Exactly once, with several processes and redeliveries: before answering, the session's log is read
(incrementally, from what this process already folded) and a message that already has an
``agent_message`` with its ``reply_to`` is not answered again. The reply goes out with the
``Nats-Msg-Id`` ``reply:<user message id>`` and each proposed marker with ``marker:<id>:<n>``, so two
processes racing on one redelivered message still land one reply. The message is acked only after
the reply is in the log. Order holds across processes too: a message is answered only after every
older unanswered message of its session (answering those first if need be).

What to say comes from ``commands`` (``/add``, ``/help``, the same in every mode) or else from the
bot's ``Responder`` (offline for now). Every proposed marker is validated against the net here,
whoever proposed it; an invalid one never enters the log.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from petribus import subjects
from petribus.bus import EventLog
from petribus.consumer import PullConsumer
from petribus.core import SessionState, apply
from petribus.errors import InvalidInput
from petribus.events import AgentMessage, ErrorEvent, Marker, MarkerAdded, UserMessage, _Event, decode
from petribus.net import Net
from petribus.service import Service
from petribus.settings import Settings

from petribus_llm import commands, describe
from petribus_llm.responder import ProposedMarker, Reply, Responder, responder_for

Key = tuple[str, str]
MAX_DELIVERIES = 5  # a message that failed this often gets an error event instead of another try
GAVE_UP = "llm_failed"


@dataclass
class Conversation:
    """One session as this process last read it: the folded state, and which messages await a reply."""

    state: SessionState = field(default_factory=SessionState)
    replied: set[str] = field(default_factory=set)
    unanswered: OrderedDict[str, UserMessage] = field(default_factory=OrderedDict)  # log order
    markers: dict[str, int] = field(default_factory=dict)  # user message id -> markers added for it

    def absorb(self, events: Iterable[tuple[int, _Event]]) -> None:
        for seq, event in events:
            if seq <= self.state.last_seq:
                continue
            apply(self.state, seq, event)
            if isinstance(event, UserMessage) and event.id not in self.replied:
                self.unanswered[event.id] = event
            elif isinstance(event, AgentMessage) and event.reply_to:
                self.answered(event.reply_to)
            elif isinstance(event, ErrorEvent) and event.code == GAVE_UP and event.cause:
                self.answered(event.cause)
            elif isinstance(event, MarkerAdded) and event.source == "llm" and event.cause:
                self.markers[event.cause] = self.markers.get(event.cause, 0) + 1

    def answered(self, message_id: str) -> None:
        self.replied.add(message_id)
        self.unanswered.pop(message_id, None)

    def before(self, message: UserMessage) -> list[UserMessage]:
        """Unanswered messages older than ``message`` in the log."""
        out = []
        for m in self.unanswered.values():
            if m.id == message.id:
                break
            out.append(m)
        return out


class LLMService(Service):
    name = "llm"

    def __init__(self, settings: Settings, nets: Iterable[Net], *, responder: Responder | None = None,
                 instance: str | None = None, cache_size: int = 1000, ack_wait_s: float = 30.0,
                 max_inflight: int = 64) -> None:
        super().__init__(settings)
        self.nets = {n.bot: n for n in nets}
        self.responders = {bot: responder or responder_for(settings, n) for bot, n in self.nets.items()}
        self.instance = instance or f"llm-{uuid.uuid4().hex[:8]}"
        self.cache_size = cache_size
        self.ack_wait_s = ack_wait_s
        self.max_inflight = max_inflight
        self.consumer: PullConsumer | None = None
        self.conversations: OrderedDict[Key, Conversation] = OrderedDict()
        self.queues: dict[Key, deque[tuple[Msg, UserMessage]]] = {}
        self.active: set[Key] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats = {"answered": 0, "already_answered": 0, "caught_up": 0, "markers": 0, "failed": 0}
        self.log = self.log.bind(instance=self.instance)

    async def start(self) -> None:
        nc = await self.connect()
        js = nc.jetstream()
        self.events = EventLog(nc, js)
        await js.add_consumer(
            subjects.EVENTS_STREAM,
            ConsumerConfig(
                durable_name=subjects.LLM_DURABLE, filter_subject=subjects.all_events(),
                ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                ack_wait=self.ack_wait_s, max_ack_pending=20_000, max_deliver=-1,
            ),
        )
        self.consumer = PullConsumer(nc, subjects.EVENTS_STREAM, subjects.LLM_DURABLE,
                                     max_inflight=self.max_inflight)
        await self.consumer.start()
        self.spawn(self._receive(), "receive")
        modes = {bot: type(r).__name__ for bot, r in self.responders.items()}
        self.log.info("llm service started", bots=sorted(self.nets), responders=modes)

    async def drain(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        await self._idle.wait()  # sessions answer what they already hold; unacked rest is redelivered

    async def _receive(self) -> None:
        assert self.consumer is not None
        while True:
            for msg in await self.consumer.next_batch(self.max_inflight):
                message = self._user_message(msg)
                if message is None:
                    await msg.ack()
                    self.consumer.release()
                    continue
                key = (message.bot, message.session_id)
                self.queues.setdefault(key, deque()).append((msg, message))
                if key not in self.active:
                    self._activate(key)

    def _user_message(self, msg: Msg) -> UserMessage | None:
        """The user message ``msg`` carries, if it is one of our bots'; ``None`` for anything else."""
        try:
            bot, _ = subjects.parse_events(msg.subject)
        except ValueError:
            return None
        if bot not in self.nets or b'"user_message"' not in msg.data:
            return None  # cheap test first: most events are not user messages
        try:
            event = decode(msg.data)
        except ValidationError:
            self.log.error("undecodable event skipped", subject=msg.subject, seq=msg.metadata.sequence.stream)
            return None
        return event if isinstance(event, UserMessage) else None

    def _activate(self, key: Key) -> None:
        self.active.add(key)
        self._idle.clear()
        self.spawn(self._drain_session(key), f"session:{key[1]}")

    async def _drain_session(self, key: Key) -> None:
        queue = self.queues[key]
        assert self.consumer is not None
        try:
            while queue:
                msg, message = queue.popleft()
                try:
                    await self._settle(key, msg, message)
                finally:
                    self.consumer.release()
        finally:
            self.active.discard(key)
            if queue and not self._stopping.is_set():  # arrived between the last pop and now
                self._activate(key)
            else:
                self.queues.pop(key, None)
                if not self.active:
                    self._idle.set()

    async def _settle(self, key: Key, msg: Msg, message: UserMessage) -> None:
        """Answer ``message`` then ack it; on failure nak it, or after too many tries say so in the log."""
        log = self.log.bind(session_id=key[1], message_id=message.id)
        try:
            await self._answer(key, message)
            await msg.ack()
            return
        except Exception as exc:
            self.stats["failed"] += 1
            self._forget(key)
            deliveries = msg.metadata.num_delivered or 1
            log.error("answering failed", error=repr(exc), deliveries=deliveries, exc_info=exc)
            failure = exc
        try:
            if deliveries >= MAX_DELIVERIES:
                await self._give_up(message, failure)
                await msg.ack()
            else:
                await msg.nak(delay=min(30.0, 0.5 * 2**deliveries))
        except Exception as exc:  # the bus itself is failing: JetStream redelivers after ack_wait
            log.error("could not settle message", error=repr(exc))

    async def _answer(self, key: Key, message: UserMessage) -> None:
        conv = await self._conversation(key)
        if message.id in conv.replied:
            self.stats["already_answered"] += 1
            self.log.info("message already answered; not answering again", session_id=key[1],
                          message_id=message.id)
            return
        # Older messages still unanswered are with another process (or were lost with it): answer them
        # first so replies keep the session's order; if both processes land one, its Nats-Msg-Id drops
        # the second.
        earlier = conv.before(message)
        for m in earlier:
            await self._reply(key, conv, m)
        self.stats["caught_up"] += len(earlier)
        await self._reply(key, conv, message)
        self.stats["answered"] += 1

    async def _reply(self, key: Key, conv: Conversation, message: UserMessage) -> None:
        net = self.nets[key[0]]
        log = self.log.bind(session_id=key[1], message_id=message.id)
        reply = self._checked(net, commands.handle(net, message.text)
                              or await self.responders[net.bot].respond(net, conv.state, message))
        done = conv.markers.get(message.id, 0)  # a crash may have landed some before the reply
        for i, proposed in enumerate(reply.markers[done:], start=done):
            added = MarkerAdded(bot=net.bot, session_id=key[1], cause=message.id,
                                request_id=message.request_id, source="llm",
                                marker=Marker(location=proposed.location, data=proposed.data))
            await self.events.append(added, msg_id=f"marker:{message.id}:{i}")
            self.stats["markers"] += 1
            log.info("marker added", location=proposed.location, marker_id=added.marker.id)
        answer = AgentMessage(bot=net.bot, session_id=key[1], text=reply.text, reply_to=message.id,
                              cause=message.id, request_id=message.request_id)
        await self.events.append(answer, msg_id=f"reply:{message.id}")
        conv.answered(message.id)
        log.info("answered", markers=len(reply.markers))

    def _checked(self, net: Net, reply: Reply) -> Reply:
        """``reply`` with every proposed marker validated; one invalid marker turns it into an explanation."""
        try:
            markers = tuple(
                ProposedMarker(p.location, net.validate_marker(p.location, p.data, exposed_only=True))
                for p in reply.markers
            )
        except InvalidInput as exc:
            return Reply(f"I could not add that marker: {exc.message}.\n\n{describe.how_to_add(net)}")
        return Reply(reply.text, markers)

    async def _give_up(self, message: UserMessage, exc: BaseException) -> None:
        error = ErrorEvent(bot=message.bot, session_id=message.session_id, cause=message.id,
                           request_id=message.request_id, code=GAVE_UP,
                           message=f"I could not answer your message ({type(exc).__name__}). "
                                   "Please send it again in a moment.")
        await self.events.append(error, msg_id=f"reply:{message.id}")

    async def _conversation(self, key: Key) -> Conversation:
        """The session as the log has it now: cached, and topped up with what was appended since."""
        conv = self.conversations.get(key)
        if conv is None:
            conv = self.conversations[key] = Conversation()
            conv.state.bot, conv.state.session_id = key
            while len(self.conversations) > self.cache_size:
                self.conversations.popitem(last=False)
        self.conversations.move_to_end(key)
        conv.absorb(await self.events.read(*key, after=conv.state.last_seq))
        return conv

    def _forget(self, key: Key) -> None:
        self.conversations.pop(key, None)


async def run(settings: Settings, nets: Iterable[Net]) -> None:
    await LLMService(settings, nets).run()
