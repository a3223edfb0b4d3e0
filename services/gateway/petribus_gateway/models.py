"""The REST API's request and response bodies (what ``/docs`` shows)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from petribus.events import Actor, HandoffParent, Marker


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of this API: a stable code and a message saying what to do."""

    code: str = Field(description="Stable error code, e.g. unknown_bot, unknown_session, invalid_input.")
    message: str = Field(description="What was wrong, with which value, and what to do.")


class EventMetadata(BaseModel):
    session_id: str
    request_id: str | None = Field(default=None, description="request_id of the client message it answers.")
    task_id: str | None = Field(default=None, description="The firing it belongs to, if any.")
    transition_name: str | None = None
    seq: int | None = Field(default=None, description="Position in the session's log (stream sequence).")
    event_id: str
    ts: float = Field(description="Unix time the event was made, in seconds.")
    actor: Actor | None = Field(default=None, description="Who caused it (owner, key id, client address), "
                                "for events a client's request appended.")
    parent: HandoffParent | None = Field(default=None, description="On the session_created of a session "
                                         "another bot handed over: the source session and its handed_off.")


class ClientEvent(BaseModel):
    """An event as clients see it (the WebSocket's shape)."""

    type: str = Field(description="Event type, e.g. session_created, marker_added, transition_completed.")
    value: Any = Field(default=None, description="The event's content; its shape depends on the type.")
    metadata: EventMetadata
    pair_id: str = Field(default="", description="Pairs a question with its answer, as Beam's pair_id: the "
                         "request id of a confirm_request and its confirm_response, the file id of an "
                         "input_file_request and its response; empty for other events.")


class LocationInfo(BaseModel):
    name: str = Field(description="Location name (the marker model's class name).")
    description: str | None = None
    json_schema: dict[str, Any] = Field(description="JSON schema a marker's data must match.")


class TransitionInfo(BaseModel):
    name: str
    description: str | None = None
    inputs: dict[str, int] = Field(description="Location -> number of markers one firing consumes.")
    outputs: list[str] = Field(description="Locations its output markers may go to.")
    confirm: bool = Field(description="True when each firing waits for the user's accept.")


class BotInfo(BaseModel):
    name: str = Field(description="The name to reach it by: a bot's, or a deployment's (docs/deployments.md).")
    version: str | None = Field(default=None, description="A deployment: the version this describes, the one "
                                "a new session gets (its bot is <name>--<version>); a plain bot: not set.")
    deactivated: bool = Field(default=False, description="A deployment deactivated in this environment: it "
                              "takes no new sessions (existing ones run on).")
    description: str
    model: str | None = Field(default=None, description="The LLM model the bot talks through.")
    welcome_message: str | None = None
    locations: list[LocationInfo] = Field(description="Exposed locations: where clients may add markers.")
    transitions: list[TransitionInfo] = Field(description="Exposed transitions.")
    handoffs: list[str] = Field(default_factory=list, description="Bots this one may hand a conversation "
                                "over to (docs/handoffs.md).")


class SessionSummary(BaseModel):
    session_id: str
    events: int = Field(description="Number of events in the session's log.")
    bot: str | None = Field(default=None, description="Listed by deployment name: the version's bot the session "
                            "runs on (<name>--<version>); else not set.")


class SessionList(BaseModel):
    bot: str
    sessions: list[SessionSummary]


class FiringInfo(BaseModel):
    firing_id: str
    transition: str
    status: Literal["awaiting_confirmation", "claimed", "started"]
    consumed: list[Marker] = Field(description="The markers this firing took, input order.")
    fired_seq: int
    attempts: int


class ChatTurnInfo(BaseModel):
    role: Literal["user", "agent"]
    text: str
    seq: int
    event_id: str
    firing_id: str | None = None


class PendingRequest(BaseModel):
    """Something a running transition waits for from the user: a yes or no, or a file."""

    type: Literal["confirm_request", "input_file_request"]
    request_id: str = Field(description="Answer with confirm_response, or the file id to upload to.")
    description: str
    task_id: str | None = Field(default=None, description="The firing that asked.")
    transition: str | None = None
    upload_url: str | None = Field(default=None, description="Where to PUT or POST the file (files only).")
    timeout: float | None = None


class FileInfo(BaseModel):
    file_id: str = Field(description="The id the bytes are stored (and downloadable) under.")
    name: str
    size: int
    url: str = Field(description="GET it here.")
    direction: Literal["output", "input"] = Field(description="Sent by a transition, or uploaded by a user.")


class SessionDetail(BaseModel):
    """A session's log and the state folded from it."""

    bot: str
    session_id: str
    last_seq: int = Field(description="Sequence of the last event; since=last_seq streams what follows.")
    events: list[ClientEvent]
    marking: dict[str, list[Marker]] = Field(description="Location -> markers it holds now, oldest first.")
    in_flight: list[FiringInfo] = Field(description="Firings that consumed their inputs and have not ended.")
    chat: list[ChatTurnInfo]
    memory: list[Any] = Field(description="What transitions remembered (context.remember), in order.")
    pending_requests: list[PendingRequest] = Field(
        default_factory=list, description="Questions and file requests of running transitions, unanswered. "
        "(Confirmations of whole firings are the in_flight entries with status awaiting_confirmation.)")
    files: list[FileInfo] = Field(default_factory=list, description="The session's files.")


class Answer(BaseModel):
    """Accept or reject a confirmation, or answer a transition's question."""

    accepted: bool = Field(description="true: yes, run it; false: no.")
    reason: str | None = Field(default=None, max_length=500,
                               description="Why not (rejecting a confirmation only).")
    request_id: str | None = Field(default=None, description="Echoed in the metadata of the event appended.")


class Uploaded(BaseModel):
    file_id: str = Field(description="The file request this upload answers.")
    stored_id: str = Field(description="The id its bytes are stored under; download it at url.")
    name: str
    size: int
    url: str
    seq: int = Field(description="Sequence of the input_file_response event it appended.")
    replayed: bool = Field(default=False, description="True when this answers a retry (same Idempotency-Key) "
                           "of an upload that had already landed: nothing new was stored.")


class SessionCreatedInfo(BaseModel):
    session_id: str
    seq: int = Field(description="Sequence of its session_created event.")


class NewMarker(BaseModel):
    location: str = Field(description="An exposed location of the bot.")
    data: dict[str, Any] = Field(description="The marker's fields; validated by the location's model.")
    request_id: str | None = None


class NewMessage(BaseModel):
    text: str = Field(description="What the user says.")
    request_id: str | None = None


class Appended(BaseModel):
    seq: int = Field(description="Where the event landed in the session's log.")
    event: ClientEvent
    replayed: bool = Field(default=False, description="True when this answers a retry (same Idempotency-Key) "
                           "of a request that had already landed: nothing new was appended.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    nats: Literal["connected", "reconnecting", "disconnected", "closed"]
    pools: str | None = Field(default=None, description="Executor pools in one line (GET /pools has them in "
                              "full), e.g. '2 pools, 1 executors; waiting with no executor: gpu (3)'; absent "
                              "when the bus cannot say.")


class HistoryStep(BaseModel):
    """One event of the session and what it changed in the marking."""

    seq: int
    event: ClientEvent
    added: list[Marker] = Field(default_factory=list, description="Markers it put into places (added, "
                                "output, or given back by a failed or rejected firing).")
    consumed: list[Marker] = Field(default_factory=list, description="Markers it took out of places (a claim).")


class HistoryPage(BaseModel):
    bot: str
    session_id: str
    last_seq: int = Field(description="The session's newest sequence now.")
    steps: list[HistoryStep]
    next: int | None = Field(default=None, description="Pass as ``after`` for the next page; null at the end.")


class ForkRequest(BaseModel):
    at: int = Field(ge=1, description="The sequence of the source session whose state the fork starts from.")
    bot: str | None = Field(default=None, description="Fork onto this bot (default: the source's bot). Every "
                            "marker must fit its net.")


class ForkedInfo(BaseModel):
    session_id: str = Field(description="The new session.")
    bot: str
    seq: int = Field(description="Sequence of its session_forked event.")
    source_session: str
    source_seq: int
    replayed: bool = Field(default=False, description="True when this answers a retry (same Idempotency-Key).")


class HaltRequest(BaseModel):
    before: list[str] = Field(description="Transitions whose next firings wait for an accept, like confirm=True "
                              "ones (a client's halt_before); [] clears it.")
