"""The wire contract: every event of a session's log, as pydantic models discriminated by ``type``.

An event is appended to the subject of its session and kind, ``pb.ev.<bot>.<session>.<type>``, on the
``PB_EVENTS`` stream; the session's log is all of its subjects in stream order.
Its position there (the stream sequence) is its ``seq``; it is not stored in the payload because the
stream assigns it. Every state anyone shows or acts on is a fold of these events (see ``petribus.core``).
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION = 1


def new_id() -> str:
    """128 random bits as 32 hex digits (a uuid4's shape): ``uuid.uuid4().hex`` costs 8x as much, and the
    scheduler makes one for every claim."""
    return os.urandom(16).hex()


class Marker(BaseModel):
    """A marker as the log stores it: its id, its location and its validated data (real JSON types)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(default_factory=new_id, description="Unique id; a firing consumes markers by id.")
    location: str = Field(description="Name of the location (the marker model's class name).")
    data: dict[str, Any] = Field(description="The marker's fields, as validated by its model.")


class Actor(BaseModel):
    """Who caused an event appended because of a request (audit): never a token or a secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    owner: str | None = Field(default=None, description="The owner of the API key used; None: no key (a "
                              "public bot, or local development without keys).")
    key_id: str | None = Field(default=None, description="The id of the API key used (not the token).")
    address: str | None = Field(default=None, description="The client's address as the gateway saw it.")


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = Field(default=SCHEMA_VERSION, description="Schema version of this event.")
    id: str = Field(default_factory=new_id, description="Unique event id; also its Nats-Msg-Id when none is given.")
    ts: float = Field(default_factory=time.time, description="Unix time the event was made, in seconds.")
    bot: str = Field(description="The bot this session belongs to.")
    session_id: str = Field(description="The session (one log subject).")
    cause: str | None = Field(default=None, description="Id of the event or firing this one came from.")
    trace: str | None = Field(default=None, description="W3C traceparent of the work that made it.")
    request_id: str | None = Field(default=None, description="Correlates a request with its answer.")
    actor: Actor | None = Field(default=None, description="Who caused it, when a client's request did; the "
                                "actor of a session's first event owns the session.")

    # What a WebSocket client sees as ``value``; overridden per type.
    def value(self) -> Any:
        return None

    def firing(self) -> tuple[str | None, str | None]:
        """(firing id, transition name) when the event belongs to a firing."""
        return getattr(self, "firing_id", None), getattr(self, "transition", None)


class HandoffParent(BaseModel):
    """Where a handed-over session came from: the source session, the user message whose answer handed
    over, and the ``handed_off`` event there (it lands right after this session is opened)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bot: str = Field(description="The bot that handed the conversation over.")
    session_id: str = Field(description="The session it was handed over from.")
    seq: int = Field(description="The sequence, in that session, of the user message whose answer handed over.")
    handoff_id: str = Field(description="The id of the ``handed_off`` event in that session that names this one.")


class SessionCreated(_Event):
    """A session's first event; its ``actor`` owns the session."""

    type: Literal["session_created"] = "session_created"
    parent: HandoffParent | None = Field(
        default=None, description="Set when another bot handed the conversation over to this session "
        "(docs/handoffs.md): the source session and its handed_off event.")
    env: str | None = Field(default=None, description="The environment whose deployment it was started in "
                            "(docs/deployments.md); None: not started through a deployment.")

    def value(self) -> Any:
        return self.session_id


class UserMessage(_Event):
    type: Literal["user_message"] = "user_message"
    text: str = Field(description="What the user typed.")
    pair_id: str | None = Field(default=None, description="A Beam client's pair_id for this message; its "
                                "reply (the agent_message answering it) carries the same one.")

    def value(self) -> Any:
        return self.text


class AgentMessage(_Event):
    type: Literal["agent_message"] = "agent_message"
    text: str = Field(description="What the bot says to the user.")
    firing_id: str | None = Field(default=None, description="Set when a transition said it (context.say).")
    transition: str | None = None
    reply_to: str | None = Field(default=None, description="Id of the user_message this answers.")
    pair_id: str | None = Field(default=None, description="The pair_id of the user_message answered, if it "
                                "had one (Beam pairs a message and its reply).")

    def value(self) -> Any:
        return self.text


class MarkerAdded(_Event):
    type: Literal["marker_added"] = "marker_added"
    marker: Marker
    source: Literal["user", "llm", "api", "fork", "import"] = Field(default="user", description="Who added it.")

    def value(self) -> Any:
        return {"id": self.marker.id, "location": self.marker.location, "data": self.marker.data}


class TransitionFired(_Event):
    """The scheduler claimed ``consumed`` for one firing. Appended only if no other claim of the session
    landed since the one the scheduler folded last (the expected sequence of the session's claims)."""

    type: Literal["transition_fired"] = "transition_fired"
    firing_id: str
    transition: str
    consumed: list[str] = Field(description="Ids of the markers this firing consumes, input order.")
    confirm: bool = Field(default=False, description="True when the firing waits for the user's accept.")
    planned_at: int | None = Field(default=None, description="The sequence of the fold the claim was decided "
                                   "on (events of other kinds may land between it and the claim); None in "
                                   "logs written before it was recorded: the event just before the claim.")

    def value(self) -> Any:
        return {"transition": self.transition, "consumed": self.consumed}


class TransitionStarted(_Event):
    type: Literal["transition_started"] = "transition_started"
    firing_id: str
    transition: str
    executor: str = Field(description="Id of the executor process that runs it.")
    attempt: int = Field(default=1, description="1 for the first run; higher after redelivery or retry.")

    def value(self) -> Any:
        return {"transition": self.transition, "executor": self.executor, "attempt": self.attempt}


class TransitionCompleted(_Event):
    """A firing's outputs, as one atomic event. The fold accepts the first per firing."""

    type: Literal["transition_completed"] = "transition_completed"
    firing_id: str
    transition: str
    outputs: list[Marker] = Field(default_factory=list)
    duration_ms: float | None = None

    def value(self) -> Any:
        return {"transition": self.transition, "outputs": [m.model_dump() for m in self.outputs]}


class TransitionFailed(_Event):
    """A run failed. ``final`` means no retry follows: the consumed markers go back to their places."""

    type: Literal["transition_failed"] = "transition_failed"
    firing_id: str
    transition: str
    error: str = Field(description="What went wrong, for a person.")
    error_type: str = Field(default="Exception", description="The exception's class name.")
    retryable: bool = False
    final: bool = True
    attempt: int = 1
    retry_in_s: float | None = Field(default=None, description="Seconds until the next attempt starts (set "
                                     "when ``final`` is false: the retry waits with exponential back-off).")
    traceback: str | None = Field(default=None, description="Where it failed: the run's traceback, bounded in "
                                  "length, with secret values masked. None when there is no traceback (e.g. "
                                  "the run was killed).")
    inputs: list[Marker] = Field(default_factory=list, description="The markers the failed run consumed, as "
                                 "they were: the state at the time of the error.")

    def value(self) -> Any:
        value = {"transition": self.transition, "error": self.error, "error_type": self.error_type,
                 "final": self.final, "attempt": self.attempt}
        if self.retry_in_s is not None:
            value["retry_in_s"] = self.retry_in_s
        if self.traceback is not None:
            value["traceback"] = self.traceback
        if self.inputs:
            value["inputs"] = [m.model_dump() for m in self.inputs]
        return value


class ConfirmTransition(_Event):
    """A ``confirm=True`` firing claimed its markers and waits for the user's accept or reject."""

    type: Literal["confirm_transition"] = "confirm_transition"
    firing_id: str = Field(description="The firing (the client's task id) that waits.")
    transition: str
    description: str | None = Field(default=None, description="The transition's description, for the user.")
    markers: list[Marker] = Field(default_factory=list, description="The markers it would consume.")
    timeout: float | None = Field(
        default=None, description="Seconds the user has to answer (from ``ts``); then it is rejected with "
        "reason 'timeout'. None: no limit.")

    def value(self) -> Any:
        return {"transition": self.transition, "description": self.description,
                "markers": [m.model_dump() for m in self.markers], "timeout": self.timeout}


class AcceptTransition(_Event):
    type: Literal["accept_transition"] = "accept_transition"
    firing_id: str
    transition: str | None = Field(default=None, description="The accepted firing's transition.")

    def value(self) -> Any:
        return self.firing_id


class RejectTransition(_Event):
    """The firing will not run: its markers go back where they were and are not offered to it again."""

    type: Literal["reject_transition"] = "reject_transition"
    firing_id: str
    transition: str | None = Field(default=None, description="The rejected firing's transition.")
    reason: str = Field(default="rejected",
                        description="'rejected' (the user), 'timeout', or the user's own words.")

    def value(self) -> Any:
        return {"task_id": self.firing_id, "reason": self.reason}


class ConfirmRequest(_Event):
    """A running transition asks the user yes or no (``context.confirm``); ``request_id`` names it."""

    type: Literal["confirm_request"] = "confirm_request"
    firing_id: str | None = None
    transition: str | None = None
    description: str
    timeout: float | None = Field(default=None, description="Seconds until it counts as a no.")

    def value(self) -> Any:
        return self.description


class ConfirmResponse(_Event):
    """The answer to the confirm_request with the same ``request_id``. The fold takes the first only."""

    type: Literal["confirm_response"] = "confirm_response"
    accepted: bool
    firing_id: str | None = Field(default=None, description="The firing that asked.")
    transition: str | None = None
    reason: str | None = Field(default=None, description="None for the user's answer; 'timeout' when nobody "
                               "answered in time (then ``accepted`` is false).")

    def value(self) -> Any:
        return self.accepted


class MemoryUpdated(_Event):
    type: Literal["memory_updated"] = "memory_updated"
    firing_id: str | None = None
    transition: str | None = None
    # A default, because ``encode`` leaves out None: remembering ``None`` must still decode.
    memory: Any = Field(default=None, description="What was remembered (JSON).")

    def value(self) -> Any:
        return self.memory


class PromptRequest(_Event):
    """A running transition asks the session's model (``context.prompt``); ``request_id`` names the question.

    The LLM service answers it with the session's context: a ``prompt_response`` with the same
    ``request_id``, and for ``wait=False`` also an ``agent_message`` showing the reply to the user.
    """

    type: Literal["prompt_request"] = "prompt_request"
    firing_id: str | None = None
    transition: str | None = None
    text: str = Field(description="What the transition asks the model.")
    wait: bool = Field(default=True, description="True: the transition waits for the reply. False: the "
                       "reply is shown to the user instead.")
    timeout: float | None = Field(default=None, description="Seconds the transition waits; None: no limit.")

    def value(self) -> Any:
        return {"text": self.text, "wait": self.wait}


class PromptResponse(_Event):
    """The model's reply to the prompt_request with the same ``request_id`` (``cause`` is that event's id)."""

    type: Literal["prompt_response"] = "prompt_response"
    firing_id: str | None = Field(default=None, description="The firing that asked.")
    transition: str | None = None
    text: str = Field(default="", description="The model's reply (empty when ``error`` is set).")
    error: str | None = Field(default=None, description="Why there is no reply, for a person; never a secret.")
    code: str | None = Field(default=None, description="The error's code (e.g. llm_auth) when ``error`` is set.")

    def value(self) -> Any:
        return {"text": self.text, "error": self.error} if self.error else self.text


class InputFileRequest(_Event):
    """A running transition asks the user for a file (``context.get_file``): upload it to ``upload_url``."""

    type: Literal["input_file_request"] = "input_file_request"
    firing_id: str | None = None
    transition: str | None = None
    file_id: str = Field(description="Names the file to upload; also the event's request_id.")
    description: str
    upload_url: str | None = Field(default=None, description="Gateway path to PUT (or POST multipart) it to.")
    timeout: float | None = Field(default=None, description="Seconds until the request lapses.")
    max_bytes: int | None = Field(default=None, description="Largest file the gateway accepts, in bytes.")

    def value(self) -> Any:
        return {"file_id": self.file_id, "description": self.description, "upload_url": self.upload_url,
                "timeout": self.timeout, "max_bytes": self.max_bytes}


class InputFileResponse(_Event):
    """The file the user uploaded for ``file_id`` is stored; or, with ``reason``, none will come."""

    type: Literal["input_file_response"] = "input_file_response"
    file_id: str
    name: str = Field(default="", description="The file's name as the user gave it.")
    size: int = Field(default=0, description="Its size in bytes.")
    firing_id: str | None = Field(default=None, description="The firing that asked for it.")
    transition: str | None = None
    content_type: str | None = None
    stored_id: str | None = Field(
        default=None, description="The id its bytes are stored (and downloadable) under in this session; "
        "each upload gets its own, so a losing concurrent upload never touches the one that counts.")
    url: str | None = Field(default=None, description="Where the file can be downloaded again.")
    reason: str | None = Field(default=None, description="None when a file came; 'timeout' when none did.")

    def value(self) -> Any:
        return {"file_id": self.file_id, "name": self.name, "size": self.size, "url": self.url,
                "reason": self.reason}


class OutputFile(_Event):
    """A transition sent the user a file (``context.send_file``); it is downloadable from ``url``."""

    type: Literal["output_file"] = "output_file"
    firing_id: str | None = None
    transition: str | None = None
    file_id: str
    name: str
    description: str | None = None
    size: int
    url: str | None = Field(default=None, description="Gateway path to GET the bytes from.")
    content_type: str | None = None

    def value(self) -> Any:
        return {"file_id": self.file_id, "name": self.name, "description": self.description,
                "size": self.size, "url": self.url, "content_type": self.content_type}


class ForkedTurn(BaseModel):
    """A chat turn a fork carries over from its source session."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["user", "agent"]
    text: str


class ForkedFile(BaseModel):
    """A file a fork carries over: its bytes are copied into the new session under the same ``file_id``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file_id: str
    name: str
    size: int
    content_type: str | None = None
    direction: Literal["input", "output"] = "output"


class SessionForked(_Event):
    """The first event of a forked session: the state of ``source_session`` as of ``source_seq``.

    ``markers`` is the marking then, in FIFO order per location, with the markers of firings that were
    in flight then put back (a fork re-decides them: nothing half-run is carried over). Markers that did
    not fit in this event follow at once as ``marker_added`` events with ``source="fork"``, in the same
    atomic batch. Chat, memory and files come along; the source session is never touched.
    """

    type: Literal["session_forked"] = "session_forked"
    source_bot: str = Field(description="The bot of the session forked from.")
    source_session: str = Field(description="The session forked from.")
    source_seq: int = Field(description="The sequence in the source session whose state this fork starts from.")
    markers: list[Marker] = Field(default_factory=list)
    chat: list[ForkedTurn] = Field(default_factory=list)
    memory: list[Any] = Field(default_factory=list)
    files: list[ForkedFile] = Field(default_factory=list)
    in_flight: list[str] = Field(default_factory=list, description="Firings that were in flight at "
                                 "``source_seq`` and whose markers were put back.")

    def value(self) -> Any:
        return {"source_bot": self.source_bot, "source_session": self.source_session,
                "source_seq": self.source_seq, "markers": len(self.markers), "in_flight": self.in_flight}


class HandedOff(_Event):
    """This session's bot handed the conversation over to ``target_bot``: a new session of it,
    ``target_session``, starts with ``request`` as its first user message (docs/handoffs.md).

    ``cause`` is the user message the model was answering. The target session is opened before this
    event lands (so a client can follow at once), and its ``session_created`` names this session,
    ``cause``'s sequence and this event's id as its ``parent``. Both ids are made from this session,
    ``cause`` and the target bot, so a retried hand-off finds the session it made before.
    """

    type: Literal["handed_off"] = "handed_off"
    target_bot: str = Field(description="The bot the conversation is handed over to.")
    target_session: str = Field(description="The new session of ``target_bot`` (follow it there).")
    request: str = Field(description="What the target bot is asked: its session's first user message.")

    def value(self) -> Any:
        return {"bot": self.target_bot, "session_id": self.target_session, "request": self.request,
                "path": f"/bots/{self.target_bot}/sessions/{self.target_session}",
                "ws": f"/bots/{self.target_bot}/ws?session_id={self.target_session}"}


class HaltSet(_Event):
    """From now on, firings of ``before`` wait like ``confirm=True`` ones (a client's ``halt_before``).

    Replaces the previous set; an empty list clears it. Firings claimed earlier are not affected.
    """

    type: Literal["halt_set"] = "halt_set"
    before: list[str] = Field(default_factory=list, description="Transitions to hold before they run.")

    def value(self) -> Any:
        return self.before


class SessionExpired(_Event):
    """The session was idle for longer than the gateway keeps sessions: it is deleted right after this."""

    type: Literal["session_expired"] = "session_expired"
    idle_s: float = Field(description="Seconds since its previous event.")

    def value(self) -> Any:
        return {"idle_s": self.idle_s}


class ErrorEvent(_Event):
    """Something a user should know went wrong. Never carries a secret."""

    type: Literal["error"] = "error"
    code: str
    message: str
    firing_id: str | None = None
    transition: str | None = None

    def value(self) -> Any:
        return {"code": self.code, "message": self.message}


EVENT_CLASSES: tuple[type[_Event], ...] = (
    SessionCreated, UserMessage, AgentMessage, MarkerAdded, TransitionFired, TransitionStarted,
    TransitionCompleted, TransitionFailed, ConfirmTransition, AcceptTransition, RejectTransition,
    ConfirmRequest, ConfirmResponse, MemoryUpdated, InputFileRequest, InputFileResponse, OutputFile,
    ErrorEvent, PromptRequest, PromptResponse, SessionForked, HaltSet, SessionExpired, HandedOff,
)
Event = Annotated[Union[EVENT_CLASSES], Field(discriminator="type")]  # type: ignore[valid-type]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_TYPES: tuple[str, ...] = tuple(c.model_fields["type"].default for c in EVENT_CLASSES)


def encode(event: _Event) -> bytes:
    return event.model_dump_json(exclude_none=True).encode()


def decode(data: bytes | str) -> Event:
    return EVENT_ADAPTER.validate_json(data)


class AgentMessageDelta(BaseModel):
    """A piece of a reply while the model writes it. Not an event of the log: it is published on the
    core NATS subject ``pb.delta.<bot>.<session>`` and forwarded live to the session's WebSocket
    clients. The whole reply always follows as the ``agent_message`` whose id is ``event_id``, so a
    client that ignores deltas (or reconnects) loses nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["agent_message_delta"] = "agent_message_delta"
    bot: str
    session_id: str
    text: str = Field(description="The new piece of the reply.")
    offset: int = Field(description="Where ``text`` starts in the reply. Lower than the length so far when "
                        "a retried model call writes the reply again from there.")
    event_id: str = Field(description="Id of the agent_message that will carry the whole reply.")
    request_id: str | None = Field(default=None, description="The request_id of what is being answered.")
    reply_to: str | None = Field(default=None, description="Id of the user_message (or prompt_request) answered.")

    def to_client(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "value": self.text,
            "metadata": {"session_id": self.session_id, "request_id": self.request_id, "task_id": None,
                         "transition_name": None, "seq": None, "event_id": self.event_id,
                         "reply_to": self.reply_to, "offset": self.offset},
            "pair_id": "",
        }


def to_client(event: _Event, seq: int | None) -> dict[str, Any]:
    """The WebSocket shape: ``{"type", "value", "metadata": {...}}``."""
    firing_id, transition = event.firing()
    metadata = {
        "session_id": event.session_id,
        "request_id": event.request_id,
        "task_id": firing_id,
        "transition_name": transition,
        "seq": seq,
        "event_id": event.id,
        "ts": event.ts,
    }
    if event.actor is not None:  # who caused it (audit): only clients who may see the session get it
        metadata["actor"] = event.actor.model_dump()
    if isinstance(event, SessionCreated) and event.parent is not None:  # a handed-over session's source
        metadata["parent"] = event.parent.model_dump()
    return {"type": event.type, "value": event.value(), "metadata": metadata,  # type: ignore[attr-defined]
            "pair_id": pair_id(event)}


def pair_id(event: _Event) -> str:
    """Beam's ``pair_id``: what pairs a question with its answer, as Beam sends it: a ``confirm_request``,
    ``prompt_request`` or ``input_file_request`` and its response (the request id, or the file id), a
    ``user_message`` that carried one and the ``agent_message`` replying to it; else empty."""
    if isinstance(event, (ConfirmRequest, ConfirmResponse, PromptRequest, PromptResponse)):
        return event.request_id or ""
    if isinstance(event, (UserMessage, AgentMessage)):
        return event.pair_id or ""
    if isinstance(event, (InputFileRequest, InputFileResponse)):
        return event.file_id
    return ""
