"""Answers to what a session waits for: a confirmation, a ``context.confirm`` question, a file request.

Whoever answers (a client through the gateway, the scheduler when a confirmation times out, the
executor when a question or a file request does) goes through :func:`answer_once`: the answer is
checked against the session's fold and appended at the sequence it was checked at
(``Nats-Expected-Last-Subject-Sequence``) with the ``Nats-Msg-Id`` ``answer:<what it answers>``. Of two
racing answers exactly one lands; the other is told that it lost (``AlreadyAnswered``). The fold
ignores a later answer anyway, so even a log written by hand cannot answer twice.
"""

from __future__ import annotations

from collections.abc import Callable

from petribus.bus import EventLog, WrongLastSequence
from petribus.core import SessionState, apply, fold
from petribus.errors import AlreadyAnswered, BusError, InvalidInput, UnknownRequest
from petribus.events import (
    AcceptTransition,
    ConfirmResponse,
    InputFileResponse,
    RejectTransition,
    _Event,
)

MAX_TRIES = 20  # re-folds after a concurrent append, before giving up on a very busy session

Decide = Callable[[SessionState], _Event]


def msg_id(target: str) -> str:
    """The Msg-Id of the answer to ``target`` (a task, request or file id): one answer per target."""
    return f"answer:{target}"


async def answer_once(events: EventLog, bot: str, session_id: str, decide: Decide, *, target: str,
                      state: SessionState | None = None) -> tuple[int, _Event]:
    """Append the answer ``decide`` makes from the session's current fold; (seq, the answer appended).

    ``decide`` raises (``UnknownRequest``, ``AlreadyAnswered``) when there is nothing to answer. ``state``
    is a cached fold of the session to bring up to date (and keep so); a fresh one otherwise.
    """
    state = state if state is not None else SessionState()
    for _ in range(MAX_TRIES):
        fold(await events.read(bot, session_id, after=state.last_seq), state)
        answer = decide(state)
        try:
            seq = await events.append_once(answer, msg_id=msg_id(target), expected_last_seq=state.last_seq)
        except WrongLastSequence:
            continue  # the session moved on meanwhile: look again
        if seq is None:
            raise AlreadyAnswered(f"{_what(answer)} was answered a moment ago by someone else; "
                                  "nothing was changed")
        apply(state, seq, answer)  # it landed right after what we folded
        return seq, answer
    raise BusError(f"session {session_id!r} kept changing while an answer to {target!r} was checked; "
                   "send it again", retryable=True)


def to_confirmation(answer: AcceptTransition | RejectTransition) -> Decide:
    """Accept or reject a ``confirm_transition``: only while its firing awaits confirmation."""

    def decide(state: SessionState) -> _Event:
        task = answer.firing_id
        f = state.in_flight.get(task)
        if f is not None and answer.transition is not None and answer.transition != f.transition:
            raise InvalidInput(f"task {task!r} is a firing of {f.transition!r}, not of {answer.transition!r} "
                               "(metadata.transition_name); nothing was changed", code="invalid_value")
        if f is not None and f.status == "awaiting_confirmation":
            return answer.model_copy(update={"transition": f.transition, "cause": answer.cause or task})
        if f is not None:
            raise AlreadyAnswered(f"task {task!r} ({f.transition}) was already accepted and is running; "
                                  "it can no longer be accepted or rejected")
        if task in state.finished:
            raise AlreadyAnswered(f"task {task!r} has already ended (rejected, timed out, failed or "
                                  "completed); nothing was changed")
        raise UnknownRequest(f"unknown task {task!r} in this session; answer the metadata.task_id of a "
                             "confirm_transition event", code="unknown_task")

    return decide


def to_question(answer: ConfirmResponse) -> Decide:
    """Answer a ``confirm_request`` (``context.confirm``): only while it is pending."""

    def decide(state: SessionState) -> _Event:
        rid = answer.request_id or ""
        asked = state.pending_requests.get(rid)
        if asked is not None:
            return answer.model_copy(update={"firing_id": asked.firing_id, "transition": asked.transition,
                                             "cause": asked.id})
        if rid in state.closed_requests:
            raise AlreadyAnswered(f"confirm request {rid!r} is no longer pending: it was answered, timed "
                                  "out, or the transition that asked has ended")
        if rid in state.pending_files:
            raise UnknownRequest(f"{rid!r} is a file request, not a question; upload the file to its "
                                 "upload_url instead", code="unknown_request")
        raise UnknownRequest(f"unknown confirm request {rid!r} in this session; answer the "
                             "metadata.request_id of a confirm_request event", code="unknown_request")

    return decide


def to_file_request(answer: InputFileResponse) -> Decide:
    """Answer an ``input_file_request`` (``context.get_file``): only while it is pending."""

    def decide(state: SessionState) -> _Event:
        fid = answer.file_id
        asked = state.pending_files.get(fid)
        if asked is not None:
            return answer.model_copy(update={"firing_id": asked.firing_id, "transition": asked.transition,
                                             "cause": asked.id, "request_id": fid})
        if fid in state.closed_requests:
            raise AlreadyAnswered(f"file request {fid!r} is no longer pending: a file was uploaded, it "
                                  "timed out, or the transition that asked has ended")
        raise UnknownRequest(f"unknown file request {fid!r} in this session; upload to the upload_url of "
                             "an input_file_request event", code="unknown_file")

    return decide


def _what(answer: _Event) -> str:
    if isinstance(answer, (AcceptTransition, RejectTransition)):
        return f"task {answer.firing_id!r}"
    if isinstance(answer, InputFileResponse):
        return f"file request {answer.file_id!r}"
    return f"request {answer.request_id!r}"
