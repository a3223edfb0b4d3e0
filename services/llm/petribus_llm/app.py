"""The LLM service: answers every user message and transition prompt of every session, exactly once,
in order per session.

One durable consumer (``llm``) over PB_EVENTS, shared by every LLM process, filtered by the server on
what it answers (``user_message`` and ``prompt_request``: ``LLM_KINDS``). Sessions are
served in parallel; within a session, messages are answered one after the other (a
``petribus.session_queues.SessionQueues``, one message at a time). Messages held here are heartbeated
(``in_progress``) so a slow model does not get them redelivered.

Exactly once, with several processes and redeliveries: before answering, the session's log is read
(incrementally, from what this process already folded: ``conversation.py``) and a message that
already has its answer in the log is not answered again. A reply goes out with the ``Nats-Msg-Id``
``reply:<user message id>`` (an ``agent_message``, or an ``error`` when the model could not answer)
and each proposed marker with ``marker:<id>:<n>``; a prompt's answer with ``prompt:<prompt id>``. So
two processes racing on one redelivered message still land one reply. The message is acked only after
its answer is in the log. Order holds across processes too: a message is answered only after every
older unanswered message of its session (answering those first if need be).

A deleted session stays deleted (``petribus.deletion``): the service watches the tombstones and appends
through ``GuardedEventLog``, so a message of a session deleted before its answer is acked unanswered,
with no model call and nothing appended.

A hand-off (``Bot(handoffs=...)``, docs/handoffs.md): when the model calls ``transfer_to_<bot>``, the
target session is opened first, as one atomic batch at sequence 0 (``session_created`` naming this
session, the message answered and the ``handed_off`` to come as its parent, then the request as its
first ``user_message``), and then ``handed_off`` lands here; so a client told of it can follow at once.
The target's id and the ``handed_off``'s id and Msg-Id are made from this session, the message and the
target bot: a retry finds the session open and opens no second one. A try that died between the two
appends is finished by the next (the target session found open, ``handed_off`` appended) before the
model is asked again. The target bot's answer then comes like any other.

What to say comes from ``commands`` (``/add``, ``/help``, the same in every mode) or else from the
bot's ``Responder`` (offline, or a model: ``openai_responder``). Every proposed marker is validated
against the net here, whoever proposed it; an invalid one never enters the log. While the model
writes a reply the user will see, its pieces are published on ``pb.delta.<bot>.<session>`` (core
NATS, not stored) for the gateway to show live; the whole reply then lands in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from collections.abc import Iterable

from nats.aio.msg import Msg
from petribus import subjects, tracing
from petribus.bus import WrongLastSequence, ensure_event_consumer
from petribus.consumer import PullConsumer
from petribus.deploy import DEFAULT_ENV, split_internal
from petribus.deployed import Deployed
from petribus.deployed import follow as follow_deployments
from petribus.deletion import GuardedEventLog, SessionDeleted, Tombstones
from petribus.errors import BusError, InvalidInput
from petribus.events import (
    Actor,
    AgentMessage,
    AgentMessageDelta,
    ErrorEvent,
    HandedOff,
    HandoffParent,
    Marker,
    MarkerAdded,
    PromptRequest,
    PromptResponse,
    SessionCreated,
    UserMessage,
    _Event,
    decode,
)
from petribus.net import Net, check_handoffs
from petribus.service import Service
from petribus.session_queues import SessionQueues
from petribus.settings import Settings
from pydantic import ValidationError

from petribus_llm import commands, describe
from petribus_llm.conversation import Askable, Conversation
from petribus_llm.errors import LLMError
from petribus_llm.responder import (
    Ask,
    OnDelta,
    ProposedHandoff,
    ProposedMarker,
    Reply,
    Responder,
    responder_for,
)

Key = tuple[str, str]
LLM_KINDS = ("user_message", "prompt_request")  # the events this service acts on (its consumer's filter)
MAX_DELIVERIES = 5  # a message that failed this often gets an error event instead of another try
GAVE_UP = "llm_failed"
_REPLY_IDS = uuid.UUID("7d0f3f0c-4a52-4f3e-9a7e-5f1c2b8e9d10")


def reply_id(asked: str) -> str:
    """The event id of the agent_message answering event ``asked``: known before it is written (deltas
    name it) and the same in every process."""
    return uuid.uuid5(_REPLY_IDS, asked).hex


def handoff_ids(bot: str, session_id: str, asked: str, target: str) -> tuple[str, str]:
    """(the handed_off event's id, the target session's id) of the hand-off to bot ``target`` made while
    answering message ``asked``: the same in every process and every retry, so it is made once."""
    made = f"handoff:{bot}:{session_id}:{asked}:{target}"
    return uuid.uuid5(_REPLY_IDS, made).hex, uuid.uuid5(_REPLY_IDS, made + ":session").hex


class LLMService(Service):
    name = "llm"

    def __init__(self, settings: Settings, nets: Iterable[Net], *, responder: Responder | None = None,
                 instance: str | None = None, cache_size: int = 1000, ack_wait_s: float | None = None,
                 max_inflight: int = 64) -> None:
        super().__init__(settings)
        self.nets = {n.bot: n for n in nets}
        check_handoffs(self.nets.values())  # a hand-off to a bot not served here: refused at start
        self.responders = {bot: responder or responder_for(settings, n) for bot, n in self.nets.items()}
        self._responder = responder  # the one every bot uses, when given (tests)
        self.deployments = False  # whether bots are deployed versions, loaded while running (add_net)
        self._deployed: Deployed | None = None
        self.instance = instance or f"llm-{uuid.uuid4().hex[:8]}"
        self.cache_size = cache_size
        self.ack_wait_s = ack_wait_s if ack_wait_s is not None else settings.ack_wait_s
        self.max_inflight = max_inflight
        self.log = self.log.bind(instance=self.instance)
        self.consumer: PullConsumer | None = None
        self.conversations: OrderedDict[Key, Conversation] = OrderedDict()
        self.queues: SessionQueues[tuple[Msg, Askable]] = SessionQueues(
            self._serve, one_at_a_time=True, done=self._done, spawn=self.spawn, log=self.log)
        self.held: dict[int, Msg] = {}  # delivered, not yet acked (by id(msg)): heartbeated
        self.stats = {"answered": 0, "already_answered": 0, "caught_up": 0, "markers": 0, "failed": 0,
                      "prompts": 0, "llm_errors": 0, "handoffs": 0, "deleted": 0}
        self.tombstones: Tombstones | None = None

    def add_net(self, net: Net) -> None:
        """Answer ``net``'s sessions too, from now on (a deployed version loaded while running)."""
        self.nets[net.bot] = net
        self.responders[net.bot] = self._responder or responder_for(self.settings, net)

    async def start(self) -> None:
        nc = await self.connect()
        js = nc.jetstream()
        # A deleted session stays deleted: no answer is appended for it (nor a model asked).
        self.tombstones = Tombstones(nc)
        await self.tombstones.start()
        self.events = GuardedEventLog(nc, js, tombstones=self.tombstones)
        if self.deployments:  # every deployed version, before the first message is taken
            self._deployed = await follow_deployments(nc, role="llm", instance=self.instance,
                                                      data_dir=self.settings.data_dir, add_net=self.add_net,
                                                      replicas=self.settings.replicas)
        async def ensure() -> None:  # at start, and again if a fail-over lost the durable
            # Only what it answers: user messages and prompts, filtered by the server (no delivery, decode
            # and ack for every other event of every session).
            await ensure_event_consumer(js, subjects.LLM_DURABLE, ack_wait_s=self.ack_wait_s, kinds=LLM_KINDS)

        await ensure()
        self.consumer = PullConsumer(nc, subjects.EVENTS_STREAM, subjects.LLM_DURABLE,
                                     max_inflight=self.max_inflight, ensure=ensure)
        await self.consumer.start()
        self.spawn(self._receive(), "receive")
        self.spawn(self._heartbeat(), "heartbeat")
        modes = {bot: repr(r) for bot, r in self.responders.items()}
        self.log.info("llm service started", bots=sorted(self.nets), responders=modes)

    async def drain(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        await self.queues.idle()  # sessions answer what they already hold; unacked rest is redelivered
        if self._deployed is not None:
            await self._deployed.close()
        if self.tombstones is not None:
            await self.tombstones.close()

    async def stop(self, timeout: float = 10.0) -> None:
        try:
            await super().stop(timeout)
        finally:
            for responder in self.responders.values():
                await responder.aclose()

    async def _receive(self) -> None:
        assert self.consumer is not None
        while True:
            for msg in await self.consumer.next_batch(self.max_inflight):
                if self._deployed is not None and (bot := self._unloaded(msg.subject)):
                    await msg.nak(delay=self._deployed.retry_after(bot))  # another LLM service's, or ours soon
                    self.consumer.release()
                    continue
                asked = self._askable(msg)
                if asked is None:
                    await msg.ack()
                    self.consumer.release()
                    continue
                self.held[id(msg)] = msg
                self.queues.put((asked.bot, asked.session_id), (msg, asked))

    async def _heartbeat(self) -> None:
        # Tells JetStream that messages waiting here (behind a slow model call) are still being handled.
        while True:
            await asyncio.sleep(max(0.1, self.ack_wait_s / 3))
            for msg in list(self.held.values()):
                try:
                    await msg.in_progress()
                except Exception as exc:  # disconnected: the next beat may get through; redelivery is safe
                    self.log.warning("heartbeat failed", error=repr(exc))
                    break

    def _unloaded(self, subject: str) -> str | None:
        """The bot, when ``subject`` is a session of a deployed version this process has not loaded."""
        try:
            bot, _ = subjects.parse_events(subject)
        except ValueError:
            return None
        return bot if bot not in self.nets and split_internal(bot) is not None else None

    def _askable(self, msg: Msg) -> Askable | None:
        """The user message or prompt ``msg`` carries, if it is one of our bots'; ``None`` for anything else."""
        try:
            bot, _ = subjects.parse_events(msg.subject)
        except ValueError:
            return None
        if bot not in self.nets or (b'"user_message"' not in msg.data and b'"prompt_request"' not in msg.data):
            return None  # cheap test first: most events are neither
        try:
            event = decode(msg.data)
        except ValidationError:
            self.log.error("undecodable event skipped", subject=msg.subject, seq=msg.metadata.sequence.stream)
            return None
        return event if isinstance(event, (UserMessage, PromptRequest)) else None

    async def _serve(self, key: Key, items: list[tuple[Msg, Askable]]) -> None:
        for msg, asked in items:
            await self._settle(key, msg, asked)

    def _done(self, items: list[tuple[Msg, Askable]]) -> None:
        for msg, _ in items:
            self.held.pop(id(msg), None)
        if self.consumer is not None:
            self.consumer.release(len(items))

    async def _settle(self, key: Key, msg: Msg, asked: Askable) -> None:
        """Answer ``asked`` then ack it; on failure nak it, or after too many tries say so in the log."""
        log = self.log.bind(session_id=key[1], message_id=asked.id)
        try:
            await self._answer(key, asked)
            await msg.ack()
            return
        except SessionDeleted as exc:  # nothing to answer: the session is gone for good
            self._forget(key)
            self.stats["deleted"] += 1
            log.info("session deleted; not answered", reason=exc.message)
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
                await self._give_up(asked, failure)
                await msg.ack()
            else:
                await msg.nak(delay=min(30.0, 0.5 * 2**deliveries))
        except Exception as exc:  # the bus itself is failing: JetStream redelivers after ack_wait
            log.error("could not settle message", error=repr(exc))

    async def _answer(self, key: Key, asked: Askable) -> None:
        if self.tombstones is not None and self.tombstones.deleted(*key):
            raise SessionDeleted(f"session {key[1]!r} of bot {key[0]!r} was deleted before its "
                                 f"{asked.type} was answered")
        conv = await self._conversation(key)
        if asked.id in conv.replied:
            self.stats["already_answered"] += 1
            self.log.info("already answered; not answering again", session_id=key[1], message_id=asked.id)
            return
        # Older messages still unanswered are with another process (or were lost with it). Replies keep
        # the session's order: wait (bounded) for that process's answer, then answer what is still
        # unanswered ourselves; if both processes land one, its Nats-Msg-Id drops the second.
        for m in conv.before(asked):
            if not self._holds(key, m):
                await self._await_answer(key, conv, m)
            if await self._reply(key, conv, m):
                self.stats["caught_up"] += 1
        if await self._reply(key, conv, asked):
            self.stats["answered"] += 1
        else:
            self.stats["already_answered"] += 1

    def _holds(self, key: Key, asked: Askable) -> bool:
        """Whether ``asked`` waits in this process's own queue (so nobody else is answering it)."""
        return any(a.id == asked.id for _, a in self.queues.waiting(key))

    async def _await_answer(self, key: Key, conv: Conversation, asked: Askable) -> None:
        """Give the process that holds ``asked`` the time JetStream gives it (twice ack_wait) to answer."""
        found = await self.events.wait_for(
            *key, after=conv.state.last_seq, timeout=2 * self.ack_wait_s,
            match=lambda e: _answers(e, asked.id))
        if found is None:
            self.log.warning("an older message got no answer in time; answering it here", session_id=key[1],
                             message_id=asked.id)

    async def _reply(self, key: Key, conv: Conversation, asked: Askable) -> bool:
        """Answer ``asked`` unless the log (read again now) already has its answer; whether it was answered."""
        conv.absorb(await self.events.read(*key, after=conv.state.last_seq))
        if asked.id in conv.replied:
            return False
        # A child of the span that appended what is answered (its trace field: it may come from a read).
        with tracing.span(f"llm answer {asked.type}", parent=tracing.parent_of(None, asked.trace),
                          kind="consumer", attributes={"petribus.bot": key[0], "petribus.session_id": key[1],
                                                       "petribus.event_id": asked.id}):
            if isinstance(asked, PromptRequest):
                await self._answer_prompt(key, conv, asked)
            else:
                await self._answer_message(key, conv, asked)
        return True

    async def _answer_message(self, key: Key, conv: Conversation, message: UserMessage) -> None:
        net = self.nets[key[0]]
        log = self.log.bind(session_id=key[1], message_id=message.id)
        answer_id = reply_id(message.id)
        if net.handoffs:
            await self._finish_handoffs(key, conv, message)
        reply = commands.handle(net, message.text)
        if reply is None:
            ask = Ask(message.id, message.text, conv.seq_of(message.id))
            try:
                reply = await self.responders[net.bot].respond(
                    net, conv, ask, self._streamer(key, answer_id, message))
            except LLMError as exc:
                await self._refuse(message, exc, msg_id=f"reply:{message.id}")
                conv.answered(message.id)
                return
        reply = self._checked(net, reply, conv)
        done = conv.markers.get(message.id, 0)  # a crash may have landed some before the reply
        for i, proposed in enumerate(reply.markers[done:], start=done):
            added = MarkerAdded(bot=net.bot, session_id=key[1], cause=message.id,
                                request_id=message.request_id, source="llm",
                                marker=Marker(location=proposed.location, data=proposed.data))
            await self.events.append(added, msg_id=f"marker:{message.id}:{i}")
            self.stats["markers"] += 1
            log.info("marker added", location=proposed.location, marker_id=added.marker.id)
        for handoff in reply.handoffs:
            await self._hand_off(key, conv, message, handoff)
        answer = AgentMessage(id=answer_id, bot=net.bot, session_id=key[1], text=reply.text,
                              reply_to=message.id, cause=message.id, request_id=message.request_id,
                              pair_id=message.pair_id)
        await self.events.append(answer, msg_id=f"reply:{message.id}")
        conv.answered(message.id)
        log.info("answered", markers=len(reply.markers))

    async def _hand_off(self, key: Key, conv: Conversation, message: UserMessage, proposed: ProposedHandoff) -> None:
        """Hand the conversation over to ``proposed.bot``: open its session, then say so here."""
        if proposed.bot in conv.handoffs.get(message.id, {}):
            return  # made while an earlier try answered this message
        event_id, target = handoff_ids(key[0], key[1], message.id, proposed.bot)
        handed = HandedOff(id=event_id, bot=key[0], session_id=key[1], cause=message.id,
                           request_id=message.request_id, actor=message.actor,
                           target_bot=self._target(conv, proposed.bot) or proposed.bot,
                           target_session=target, request=proposed.request)
        await self._open_target(conv, message, handed)
        await self._say_handed(key, conv, handed)

    async def _finish_handoffs(self, key: Key, conv: Conversation, message: UserMessage) -> None:
        """An earlier try that opened a target session and died before saying so here: say it now (with
        the request that session was opened with), so the user is told whatever the model does now."""
        for h in self.nets[key[0]].handoffs:
            if h.bot in conv.handoffs.get(message.id, {}):
                continue
            event_id, target = handoff_ids(key[0], key[1], message.id, h.bot)
            target_bot = self._target(conv, h.bot)
            if target_bot is None or await self.events.last_seq(target_bot, target) == 0:
                continue
            request = None
            async with contextlib.aclosing(self.events.scan(target_bot, target)) as batches:
                async for batch in batches:  # its opening is in the first batch
                    request = next((e.text for _, e in batch if isinstance(e, UserMessage) and e.cause == event_id),
                                   None)
                    break
            if request is None:
                continue  # not a session this hand-off opened
            await self._say_handed(key, conv, HandedOff(
                id=event_id, bot=key[0], session_id=key[1], cause=message.id, request_id=message.request_id,
                actor=message.actor, target_bot=target_bot, target_session=target, request=request))

    async def _say_handed(self, key: Key, conv: Conversation, handed: HandedOff) -> None:
        seq = await self.events.append(handed, msg_id=f"handoff:{handed.cause}:{handed.target_bot}")
        conv.absorb(await self.events.read(*key, after=conv.state.last_seq, at_least=seq))
        self.log.info("handed over", session_id=key[1], target_bot=handed.target_bot,
                      target_session=handed.target_session)

    async def _open_target(self, conv: Conversation, message: UserMessage, handed: HandedOff) -> None:
        """Open the session ``handed`` names, unless it is open already: ``session_created`` naming this
        session, the message answered and ``handed`` as its parent, then the request as the user's first
        message. Its owner is this session's (so whoever may see this one may follow there); who asked
        (key id, address) comes along."""
        who = handed.actor
        owner = conv.state.owner
        actor = (Actor(owner=owner, key_id=who.key_id if who else None, address=who.address if who else None)
                 if who is not None or owner is not None else None)
        bot, target = handed.target_bot, handed.target_session
        parent = HandoffParent(bot=handed.bot, session_id=handed.session_id, seq=conv.seq_of(message.id),
                               handoff_id=handed.id)
        opening: list[_Event] = [
            SessionCreated(bot=bot, session_id=target, parent=parent, actor=actor, cause=handed.id,
                           env=conv.state.env),  # a deployment's session hands over within its environment
            UserMessage(bot=bot, session_id=target, text=handed.request, actor=actor, cause=handed.id),
        ]
        log = self.log.bind(session_id=handed.session_id, target_bot=bot, target_session=target)
        if await self.events.last_seq(bot, target) > 0:
            log.info("handed-over session exists already; not opening it again")
            return
        try:
            await self.events.append_batch(opening, expected_last_seq=0,
                                           msg_ids=[f"handoff:{target}:0", f"handoff:{target}:1"])
        except (WrongLastSequence, BusError):
            # Another process opened it meanwhile: the sequence moved, or the server saw its Msg-Ids.
            if await self.events.last_seq(bot, target) == 0:
                raise
            log.info("handed-over session was opened by another process")
            return
        self.stats["handoffs"] += 1

    async def _answer_prompt(self, key: Key, conv: Conversation, request: PromptRequest) -> None:
        """A transition's question: the model's answer goes back to it, and to the user when it won't wait."""
        net = self.nets[key[0]]
        log = self.log.bind(session_id=key[1], prompt_id=request.id, transition=request.transition)
        self.stats["prompts"] += 1
        text = conv.shown.get(request.id)  # shown to the user already (a crash came before the response)
        if text is None and request.wait and request.firing_id in conv.state.finished:
            await self._respond(request, error="the transition that asked has ended; nobody waits for the "
                                "answer", code="prompt_abandoned")
            conv.answered(request.id)
            return
        if text is None:
            public = request.transition is not None and net.has_transition(request.transition) \
                and net.transition(request.transition).expose
            ask = Ask(request.id, request.text, conv.seq_of(request.id), kind="prompt",
                      transition=request.transition if public else None, shown=not request.wait)
            answer_id = reply_id(request.id)
            try:
                reply = await self.responders[net.bot].respond(
                    net, conv, ask, None if request.wait else self._streamer(key, answer_id, request))
            except LLMError as exc:
                if not request.wait:
                    await self._refuse(request, exc, msg_id=f"prompt-error:{request.id}")
                await self._respond(request, error=exc.message, code=exc.code)
                conv.answered(request.id)
                return
            text = reply.text
            if not request.wait:
                await self.events.append(
                    AgentMessage(id=answer_id, bot=net.bot, session_id=key[1], text=text, cause=request.id,
                                 request_id=request.request_id),
                    msg_id=f"prompt-say:{request.id}")
        await self._respond(request, text=text)
        conv.answered(request.id)
        log.info("prompt answered", wait=request.wait)

    async def _respond(self, request: PromptRequest, *, text: str = "", error: str | None = None,
                       code: str | None = None) -> None:
        await self.events.append(
            PromptResponse(bot=request.bot, session_id=request.session_id, request_id=request.request_id,
                           cause=request.id, firing_id=request.firing_id, transition=request.transition,
                           text=text, error=error, code=code, trace=request.trace),
            msg_id=f"prompt:{request.id}")

    async def _refuse(self, asked: Askable, exc: LLMError, *, msg_id: str) -> None:
        """The model could not answer: one error event the user sees, saying what to check."""
        self.stats["llm_errors"] += 1
        self.log.warning("model could not answer", session_id=asked.session_id, message_id=asked.id,
                         code=exc.code, error=exc.message)
        await self.events.append(
            ErrorEvent(bot=asked.bot, session_id=asked.session_id, cause=asked.id, request_id=asked.request_id,
                       code=exc.code, message=f"The language model could not answer: {exc.message}."),
            msg_id=msg_id)

    def _streamer(self, key: Key, answer_id: str, asked: Askable) -> OnDelta:
        subject = subjects.deltas(*key)
        assert self.nc is not None
        nc = self.nc

        async def on_delta(text: str, offset: int) -> None:
            delta = AgentMessageDelta(bot=key[0], session_id=key[1], text=text, offset=offset,
                                      event_id=answer_id, request_id=asked.request_id, reply_to=asked.id)
            await nc.publish(subject, delta.model_dump_json(exclude_none=True).encode())

        return on_delta

    def _target(self, conv: Conversation, name: str) -> str | None:
        """The bot a hand-off to ``name`` opens its session in: ``name`` itself when served here; under
        ``--deployments``, the version of deployment ``name`` active in this session's environment (loaded
        here). None: nowhere."""
        if name in self.nets:
            return name
        if self._deployed is None:
            return None
        version = self._deployed.catalog.active(name, conv.state.env or DEFAULT_ENV)
        return version.bot if version is not None and version.bot in self.nets else None

    def _checked(self, net: Net, reply: Reply, conv: Conversation) -> Reply:
        """``reply`` with every proposed marker validated; one invalid marker turns it into an explanation."""
        try:
            markers = tuple(
                ProposedMarker(p.location, net.validate_marker(p.location, p.data, exposed_only=True))
                for p in reply.markers
            )
        except InvalidInput as exc:
            return Reply(f"I could not add that marker: {exc.message}.\n\n{describe.how_to_add(net)}")
        # Only to the bots this one names and this service serves (check_handoffs made sure of both at start).
        handoffs = tuple(h for h in reply.handoffs
                         if net.handoff(h.bot) is not None and self._target(conv, h.bot) is not None)
        return Reply(reply.text, markers, handoffs)

    async def _give_up(self, asked: Askable, exc: BaseException) -> None:
        message = (f"I could not answer your message ({type(exc).__name__}). Please send it again in a moment."
                   if isinstance(asked, UserMessage) else
                   f"the LLM service could not answer this prompt ({type(exc).__name__})")
        error = ErrorEvent(bot=asked.bot, session_id=asked.session_id, cause=asked.id,
                           request_id=asked.request_id, code=GAVE_UP, message=message)
        if isinstance(asked, UserMessage):
            await self.events.append(error, msg_id=f"reply:{asked.id}")
        else:
            await self._respond(asked, error=message, code=GAVE_UP)

    async def _conversation(self, key: Key) -> Conversation:
        """The session as the log has it now: cached, and topped up with what was appended since."""
        conv = self.conversations.get(key)
        if conv is None:
            conv = self.conversations[key] = Conversation(self.nets[key[0]])
            conv.state.bot, conv.state.session_id = key
            while len(self.conversations) > self.cache_size:
                self.conversations.popitem(last=False)
        self.conversations.move_to_end(key)
        conv.absorb(await self.events.read(*key, after=conv.state.last_seq))
        return conv

    def _forget(self, key: Key) -> None:
        self.conversations.pop(key, None)


def _answers(event: _Event, asked: str) -> bool:
    """Whether ``event`` is the answer to the user message or prompt with id ``asked``."""
    match event:
        case AgentMessage():
            return event.reply_to == asked
        case PromptResponse():
            return event.cause == asked
        case ErrorEvent():
            return event.cause == asked and event.code.startswith("llm_")
    return False


async def run(settings: Settings, nets: Iterable[Net]) -> None:
    await LLMService(settings, nets).run()

