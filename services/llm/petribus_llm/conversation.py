"""One session as the LLM service sees it: a fold of the session's log, nothing else.

``Conversation.absorb`` folds events in log order into

- ``state``: the core's fold (marking, firings in flight, memory, chat);
- ``turns``: the transcript the model reads: what the user said, and what was said back to them;
- ``notes``: what happened in the net meanwhile (markers added, transitions finished or failed, a
  transition's words and questions), one line each, for the system prompt;
- which user messages and transition prompts still wait for an answer, in log order;
- the hand-offs made while answering each user message (so a retried answer makes none twice).

Because it is only a fold, a restarted (or a second) LLM service that reads the same log carries on
the same conversation. Locations and transitions with ``expose=False`` never appear in a note.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from petribus.core import SessionState, apply
from petribus.events import (
    AgentMessage,
    ErrorEvent,
    HandedOff,
    Marker,
    MarkerAdded,
    PromptRequest,
    PromptResponse,
    SessionCreated,
    SessionForked,
    TransitionCompleted,
    TransitionFailed,
    UserMessage,
    _Event,
)
from petribus.net import Net

MAX_TURNS = 400  # kept per session; the context budget (prompt.py) sends far fewer
MAX_NOTES = 200
NOTE_CHARS = 300

Askable = UserMessage | PromptRequest


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant"]
    text: str
    seq: int
    # Where the turn belongs in the conversation: a reply sits right after the message it answers,
    # even when later messages landed in the log before it (they were queued behind that one).
    at: float


@dataclass(frozen=True)
class Note:
    seq: int
    text: str


@dataclass
class Conversation:
    net: Net
    state: SessionState = field(default_factory=SessionState)
    turns: deque[Turn] = field(default_factory=lambda: deque(maxlen=MAX_TURNS))
    notes: deque[Note] = field(default_factory=lambda: deque(maxlen=MAX_NOTES))
    seqs: dict[str, int] = field(default_factory=dict)  # unanswered event id -> its seq
    replied: set[str] = field(default_factory=set)
    unanswered: OrderedDict[str, Askable] = field(default_factory=OrderedDict)  # log order
    markers: dict[str, int] = field(default_factory=dict)  # user message id -> markers added for it
    shown: dict[str, str] = field(default_factory=dict)  # prompt id -> reply already shown to the user
    # user message id -> target bot -> (seq, event) of the hand-offs made while answering it
    handoffs: dict[str, dict[str, tuple[int, HandedOff]]] = field(default_factory=dict)

    def absorb(self, events: Iterable[tuple[int, _Event]]) -> None:
        for seq, event in events:
            if seq <= self.state.last_seq:
                continue
            apply(self.state, seq, event)
            self._absorb(seq, event)

    def _absorb(self, seq: int, event: _Event) -> None:
        match event:
            case UserMessage():
                self.turns.append(Turn("user", event.text, seq, seq))
                self._ask(seq, event)
            case PromptRequest():
                self._note(seq, f"{self._who(event.transition)} asked you"
                                + ("" if event.wait else " (your answer was shown to the user)")
                                + f": {event.text}")
                self._ask(seq, event)
            case AgentMessage() if event.firing_id is None:
                asked = self.seqs.get(event.reply_to or event.cause or "")
                self.turns.append(Turn("assistant", event.text, seq, seq if asked is None else asked + 0.5))
                if event.reply_to:
                    self.answered(event.reply_to)
                elif event.cause in self.unanswered:
                    self.shown[event.cause] = event.text
            case AgentMessage():
                self._note(seq, f"{self._who(event.transition)} told the user: {event.text}")
            case PromptResponse():
                if event.cause:
                    self.answered(event.cause)
                    self.shown.pop(event.cause, None)
                if event.error:
                    self._note(seq, f"a question from {self._who(event.transition)} got no answer: {event.error}")
                else:
                    self._note(seq, f"you answered {self._who(event.transition)}: {event.text}")
            case ErrorEvent() if event.cause and event.code.startswith("llm_"):
                if isinstance(self.unanswered.get(event.cause), UserMessage):
                    self.answered(event.cause)
            case MarkerAdded():
                if event.source == "llm" and event.cause:
                    self.markers[event.cause] = self.markers.get(event.cause, 0) + 1
                if self._exposed(event.marker.location):
                    who = "you" if event.source == "llm" else "the user"
                    self._note(seq, f"{who} added {_marker(event.marker)}")
            case TransitionCompleted() if self._public(event.transition):
                shown = [_marker(m) for m in event.outputs if self._exposed(m.location)]
                self._note(seq, f"{event.transition} finished" + (f" → {', '.join(shown)}" if shown else ""))
            case SessionForked() if self.state.forked_from == (event.source_bot, event.source_session,
                                                               event.source_seq):
                # The source's conversation, in order, all before anything said in the fork itself.
                for i, turn in enumerate(event.chat):
                    role: Literal["user", "assistant"] = "user" if turn.role == "user" else "assistant"
                    self.turns.append(Turn(role, turn.text, seq, seq + i / (len(event.chat) + 1)))
                self._note(seq, f"this session continues session {event.source_session} as of its step "
                                f"{event.source_seq}")
            case HandedOff():
                if event.cause:
                    self.handoffs.setdefault(event.cause, {}).setdefault(event.target_bot, (seq, event))
                self._note(seq, f"you handed the conversation over to the bot {event.target_bot} (its session "
                                f"{event.target_session}), asking: {event.request}")
            case SessionCreated() if event.parent is not None and self.state.handed_from == (
                    event.parent.bot, event.parent.session_id, event.parent.seq):
                self._note(seq, f"the bot {event.parent.bot} handed this conversation over to you; the user's "
                                "request follows")
            case TransitionFailed() if event.final and self._public(event.transition):
                self._note(seq, f"{event.transition} failed ({event.error_type}: {event.error}); its inputs went back")
            case _:
                pass

    def _ask(self, seq: int, event: Askable) -> None:
        if event.id not in self.replied:
            self.unanswered[event.id] = event
            self.seqs[event.id] = seq

    def answered(self, event_id: str) -> None:
        self.replied.add(event_id)
        self.unanswered.pop(event_id, None)
        self.seqs.pop(event_id, None)

    def history(self, before: int) -> list[Turn]:
        """The turns of the conversation before the ask at log sequence ``before``, in conversation order."""
        return sorted((t for t in self.turns if t.at < before), key=lambda t: t.at)

    def before(self, event: Askable) -> list[Askable]:
        """Unanswered messages and prompts older than ``event`` in the log."""
        out = []
        for m in self.unanswered.values():
            if m.id == event.id:
                break
            out.append(m)
        return out

    def seq_of(self, event_id: str) -> int:
        return self.seqs.get(event_id, self.state.last_seq + 1)

    def _note(self, seq: int, text: str) -> None:
        self.notes.append(Note(seq, _cut(text, NOTE_CHARS)))

    def _exposed(self, location: str) -> bool:
        loc = self.net.locations.get(location)
        return loc is not None and loc.expose

    def _public(self, transition: str | None) -> bool:
        return transition is not None and self.net.has_transition(transition) \
            and self.net.transition(transition).expose

    def _who(self, transition: str | None) -> str:
        return transition if self._public(transition) else "an internal step"


def _marker(m: Marker) -> str:
    return f"{m.location} {_json(m.data)}"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
