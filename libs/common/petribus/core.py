"""The pure net core: fold a session's log into its state, and choose what fires. No I/O.

``fold`` is deterministic and total: any sequence of valid events gives a state, and an event that
would break an invariant (consuming a marker that is not there, completing a firing twice) is ignored
rather than applied. The scheduler never appends such an event; the fold guarantees that even a
hand-made log cannot make a marker be consumed twice or a count go negative.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from petribus.events import (
    AcceptTransition,
    AgentMessage,
    ConfirmRequest,
    ConfirmResponse,
    ConfirmTransition,
    InputFileRequest,
    InputFileResponse,
    Marker,
    MarkerAdded,
    HaltSet,
    MemoryUpdated,
    OutputFile,
    PromptRequest,
    RejectTransition,
    SessionCreated,
    SessionForked,
    TransitionCompleted,
    TransitionFailed,
    TransitionFired,
    TransitionStarted,
    UserMessage,
    _Event,
)

FiringStatus = Literal["awaiting_confirmation", "claimed", "started"]

# Final failures that are not the transition's own doing: its runs kept ending with no outcome. Their
# markers come back and stay on offer to it (a transition's own errors and rejections take them off).
NOT_ITS_OWN = frozenset({"DeliveriesExhausted"})


@dataclass(frozen=True)
class TransitionShape:
    """What the core needs to know of a transition: its name, inputs, concurrency bound and confirm flag."""

    name: str
    inputs: tuple[tuple[str, int], ...]
    concurrency: int | None = None
    confirm: bool = False


@dataclass(frozen=True)
class NetShape:
    transitions: tuple[TransitionShape, ...]


@dataclass
class PlacedMarker:
    marker: Marker
    order: int  # the seq of the event that first put it in the net: FIFO order


@dataclass
class Firing:
    id: str
    transition: str
    consumed: list[PlacedMarker]
    status: FiringStatus
    fired_seq: int
    attempts: int = 0
    started_attempts: set[int] = field(default_factory=set)  # attempts whose run began (transition_started)
    failed_attempts: set[int] = field(default_factory=set)  # attempts that failed, a retry following each
    asked_at: float | None = None  # when confirm_transition asked the user (its ts)
    confirm_timeout: float | None = None  # seconds the user has from asked_at; None: no limit

    @property
    def confirm_deadline(self) -> float | None:
        if self.asked_at is None or self.confirm_timeout is None:
            return None
        return self.asked_at + self.confirm_timeout


@dataclass
class ChatTurn:
    role: Literal["user", "agent"]
    text: str
    seq: int
    event_id: str
    firing_id: str | None = None


@dataclass
class SessionState:
    """Everything known about one session, derived from its log alone."""

    bot: str = ""
    session_id: str = ""
    last_seq: int = 0
    created: bool = False
    places: dict[str, dict[str, PlacedMarker]] = field(default_factory=dict)
    in_flight: dict[str, Firing] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)  # firings that ended (completed, failed for good, rejected)
    seen_markers: set[str] = field(default_factory=set)
    blocked: dict[str, set[str]] = field(default_factory=dict)  # marker id -> transitions it won't be offered to
    chat: list[ChatTurn] = field(default_factory=list)
    memory: list[Any] = field(default_factory=list)
    pending_requests: dict[str, ConfirmRequest] = field(default_factory=dict)
    pending_files: dict[str, InputFileRequest] = field(default_factory=dict)  # file id -> its request
    closed_requests: set[str] = field(default_factory=set)  # answered, timed out, or their run ended
    files: dict[str, OutputFile | InputFileResponse] = field(default_factory=dict)  # stored, by file id
    effects: set[str] = field(default_factory=set)  # ids of the events firings appended as side effects
    events: int = 0
    forked_from: tuple[str, str, int] | None = None  # (bot, session, seq) of a fork's source
    handed_from: tuple[str, str, int] | None = None  # (bot, session, seq of the message answered) of a hand-off's source
    owner: str | None = None  # the owner named by the actor of the session's first event (None: nobody's)
    env: str | None = None  # the environment it was started in, through a deployment (None: not deployed)
    last_fired: int = 0  # the sequence of the last transition_fired folded: what the next claim is checked against
    halt_before: frozenset[str] = frozenset()  # transitions whose firings wait like confirm=True ones
    # When a list: every marker the fold puts into (+) or takes out of (-) a place is noted in it, in
    # order. A timeline shows each step's change with it; the scheduler leaves it None and pays nothing.
    journal: list[tuple[Literal["+", "-"], Marker]] | None = None
    # Folded from after this sequence (0: the whole log). Such a state takes claims on trust: the markers
    # they consume were added before it began. It answers questions about firings claimed in it (has this
    # one ended? what did it say?), not about the marking; only the executor makes one.
    after: int = 0

    def copy(self) -> SessionState:
        """An independent copy, for keeping as a snapshot while this one folds on (the markers and
        events in it are immutable and shared; every container and firing is copied)."""
        return replace(
            self,
            places={loc: dict(ms) for loc, ms in self.places.items()},
            in_flight={fid: replace(f, consumed=list(f.consumed), started_attempts=set(f.started_attempts),
                                    failed_attempts=set(f.failed_attempts))
                       for fid, f in self.in_flight.items()},
            finished=set(self.finished), seen_markers=set(self.seen_markers),
            blocked={mid: set(ts) for mid, ts in self.blocked.items()}, chat=list(self.chat),
            memory=list(self.memory), pending_requests=dict(self.pending_requests),
            pending_files=dict(self.pending_files), closed_requests=set(self.closed_requests),
            files=dict(self.files), effects=set(self.effects), journal=None,
        )

    def marking(self) -> dict[str, list[Marker]]:
        """Location -> markers in FIFO order (locations with no markers are left out)."""
        return {loc: [p.marker for p in ms.values()] for loc, ms in self.places.items() if ms}

    def counts(self) -> dict[str, int]:
        return {loc: len(ms) for loc, ms in self.places.items() if ms}

    def in_flight_count(self, transition: str) -> int:
        return sum(1 for f in self.in_flight.values() if f.transition == transition)

    def awaiting_confirmation(self) -> list[Firing]:
        """Firings waiting for the user's accept or reject, oldest first."""
        return [f for f in self.in_flight.values() if f.status == "awaiting_confirmation"]


def apply(state: SessionState, seq: int, event: _Event) -> SessionState:
    """Fold one event (at stream sequence ``seq``) into ``state``, in place, and return it."""
    if seq <= state.last_seq:
        return state  # already folded: replaying a prefix twice changes nothing
    state.last_seq = seq
    state.events += 1
    if not state.session_id:
        state.bot, state.session_id = state.bot or event.bot, event.session_id
    match event:  # the kinds of a firing first: most of a log, and a case is tried in turn
        case MarkerAdded():
            _put(state, event.marker, seq)
        case TransitionFired():
            state.last_fired = seq
            _fire(state, event, seq)
        case TransitionStarted():
            f = state.in_flight.get(event.firing_id)
            if f is not None and f.status in ("claimed", "started"):
                f.status = "started"
                f.attempts = max(f.attempts, event.attempt)
                f.started_attempts.add(event.attempt)
                # What an earlier run asked stays open: a re-run asks it again under the same request id
                # (the ids are made from the firing and the question's place in the run) and reads its answer.
        case TransitionCompleted():
            f = state.in_flight.get(event.firing_id)
            # A completion can't precede acceptance: one that does is ignored.
            if f is not None and f.status != "awaiting_confirmation":
                del state.in_flight[f.id]
                state.finished.add(f.id)
                for m in event.outputs:
                    _put(state, m, seq)
                if state.pending_requests or state.pending_files:
                    _close_requests_of(state, f.id)
        case SessionCreated():
            if not state.created:
                state.created = True
                state.owner = event.actor.owner if event.actor is not None else None
                state.env = event.env
                if event.parent is not None:
                    state.handed_from = (event.parent.bot, event.parent.session_id, event.parent.seq)
        case SessionForked():
            if not state.created:  # only as a session's first event: it describes where the session began
                state.created = True
                state.owner = event.actor.owner if event.actor is not None else None
                state.forked_from = (event.source_bot, event.source_session, event.source_seq)
                for m in event.markers:
                    _put(state, m, seq)
                for i, turn in enumerate(event.chat):
                    state.chat.append(ChatTurn(turn.role, turn.text, seq, f"{event.id}:{i}"))
                state.memory.extend(event.memory)
                for f in event.files:
                    common = {"bot": event.bot, "session_id": event.session_id, "file_id": f.file_id,
                              "name": f.name, "size": f.size, "content_type": f.content_type, "ts": event.ts,
                              "id": f"{event.id}:{f.file_id}"}
                    state.files[f.file_id] = (InputFileResponse(**common, stored_id=f.file_id)
                                              if f.direction == "input" else OutputFile(**common))
        case HaltSet():
            state.halt_before = frozenset(event.before)
        case UserMessage():
            state.chat.append(ChatTurn("user", event.text, seq, event.id))
        case AgentMessage():
            if _new_effect(state, event):
                state.chat.append(ChatTurn("agent", event.text, seq, event.id, event.firing_id))
        case TransitionFailed():
            f = state.in_flight.get(event.firing_id)
            if f is not None and event.final:
                # Runs that kept dying with no outcome (executors killed, the bus down) are not the
                # transition's own failure: its markers may be offered to it again.
                _give_back(state, state.in_flight.pop(f.id), block=event.error_type not in NOT_ITS_OWN)
            elif f is not None:
                f.attempts = max(f.attempts, event.attempt)
                f.failed_attempts.add(event.attempt)
            if f is not None and event.final:
                _close_requests_of(state, f.id)
        case ConfirmTransition():
            f = state.in_flight.get(event.firing_id)
            if f is not None and f.status == "awaiting_confirmation" and f.asked_at is None:
                f.asked_at, f.confirm_timeout = event.ts, event.timeout
        case AcceptTransition():
            f = state.in_flight.get(event.firing_id)
            if f is not None and f.status == "awaiting_confirmation":
                f.status = "claimed"
        case RejectTransition():
            f = state.in_flight.get(event.firing_id)
            if f is not None and f.status == "awaiting_confirmation":
                _give_back(state, state.in_flight.pop(f.id))
        case ConfirmRequest():
            rid = event.request_id
            if rid and rid not in state.closed_requests and rid not in state.pending_requests \
                    and _may_ask(state, event.firing_id):
                state.pending_requests[rid] = event
        case ConfirmResponse():
            # Only the first answer counts; a second one (or one to nothing) changes nothing.
            if event.request_id and state.pending_requests.pop(event.request_id, None) is not None:
                state.closed_requests.add(event.request_id)
        case InputFileRequest():
            fid = event.file_id
            if fid not in state.closed_requests and fid not in state.pending_files \
                    and _may_ask(state, event.firing_id):
                state.pending_files[fid] = event
        case InputFileResponse():
            if state.pending_files.pop(event.file_id, None) is not None:
                state.closed_requests.add(event.file_id)
                if event.reason is None:
                    state.files[event.stored_id or event.file_id] = event
        case OutputFile():
            state.files.setdefault(event.file_id, event)
        case PromptRequest():
            if event.firing_id is not None:
                state.effects.add(event.id)
        case MemoryUpdated():
            if _new_effect(state, event):
                state.memory.append(event.memory)
        case _:
            pass
    return state


def fold(events: Iterable[tuple[int, _Event]], state: SessionState | None = None) -> SessionState:
    """Fold ``(seq, event)`` pairs in order. Deterministic: the same log always gives the same state."""
    state = state if state is not None else SessionState()
    for seq, event in events:
        apply(state, seq, event)
    return state


def _new_effect(state: SessionState, event: AgentMessage | MemoryUpdated) -> bool:
    """Whether a firing's side effect is new. A re-run of a firing appends its effects again with the same
    event ids (made from the firing and the effect's place in the run); JetStream drops such a duplicate
    within its window, and this drops it at any age."""
    if event.firing_id is None:
        return True
    if event.id in state.effects:
        return False
    state.effects.add(event.id)
    return True


def _may_ask(state: SessionState, firing_id: str | None) -> bool:
    """A request from a firing counts only while that firing runs (one not from a firing always does)."""
    return firing_id is None or (firing_id in state.in_flight
                                 and state.in_flight[firing_id].status != "awaiting_confirmation")


def _close_requests_of(state: SessionState, firing_id: str) -> None:
    """The run that asked is over: its questions and file requests are no longer pending."""
    if state.pending_requests:
        for rid in [r for r, q in state.pending_requests.items() if q.firing_id == firing_id]:
            del state.pending_requests[rid]
            state.closed_requests.add(rid)
    if state.pending_files:
        for fid in [f for f, q in state.pending_files.items() if q.firing_id == firing_id]:
            del state.pending_files[fid]
            state.closed_requests.add(fid)


def _put(state: SessionState, marker: Marker, seq: int) -> None:
    if marker.id in state.seen_markers:
        return  # a duplicate publish of the same marker adds nothing
    state.seen_markers.add(marker.id)
    state.places.setdefault(marker.location, {})[marker.id] = PlacedMarker(marker, seq)
    if state.journal is not None:
        state.journal.append(("+", marker))


def locate(state: SessionState, marker_id: str) -> tuple[str, PlacedMarker] | None:
    """Where a marker of the marking is: its location and its entry there, or None."""
    for loc, ms in state.places.items():
        placed = ms.get(marker_id)
        if placed is not None:
            return loc, placed
    return None


def _fire(state: SessionState, event: TransitionFired, seq: int) -> None:
    if event.firing_id in state.in_flight or event.firing_id in state.finished:
        return
    if len(event.consumed) > 1 and len(set(event.consumed)) != len(event.consumed):
        return
    found: list[tuple[str, PlacedMarker]] = []
    for mid in event.consumed:
        where = locate(state, mid)
        if where is not None:
            found.append(where)
        elif state.after:
            continue  # added before this fold began: the claim is taken on trust
        else:
            return  # a marker that is not (or no longer) there: the firing is void, nothing is consumed
    for loc, placed in found:
        del state.places[loc][placed.marker.id]
        if state.journal is not None:
            state.journal.append(("-", placed.marker))
    status: FiringStatus = "awaiting_confirmation" if event.confirm else "claimed"
    state.in_flight[event.firing_id] = Firing(
        event.firing_id, event.transition, [p for _, p in found], status, seq
    )


def _give_back(state: SessionState, firing: Firing, *, block: bool = True) -> None:
    """Return a firing's markers to their places, in FIFO order, and (``block``) don't offer them to it
    again."""
    # The firing has ended: a replayed transition_fired with its id must not claim the markers again.
    state.finished.add(firing.id)
    for placed in firing.consumed:
        _reinsert(state.places.setdefault(placed.marker.location, {}), placed)
        if state.journal is not None:
            state.journal.append(("+", placed.marker))
        if block:
            state.blocked.setdefault(placed.marker.id, set()).add(firing.transition)


def _reinsert(place: dict[str, PlacedMarker], placed: PlacedMarker) -> None:
    """Put a marker back in FIFO order: after every marker not younger than it (as a stable sort would).

    Only the younger markers behind it move (a dict can only append). Re-sorting the whole place for
    each marker given back made ten thousand failed firings of one marker each cost minutes; markers
    mostly come back about in the order they left, so few markers are younger than the one returning.
    One coming back ahead of a long queue still moves the queue.
    """
    younger: list[str] = []
    for mid in reversed(place):
        if place[mid].order <= placed.order:
            break
        younger.append(mid)
    place[placed.marker.id] = placed
    for mid in reversed(younger):
        place[mid] = place.pop(mid)


@dataclass(frozen=True)
class PlannedFiring:
    transition: str
    consumed: tuple[str, ...]


Guard = Callable[[str, dict[str, list[Marker]]], bool]

# How many candidate sets a guard may refuse per transition per choice, so that a guard which refuses
# almost everything cannot make planning quadratic. Within it the choice is complete.
GUARD_REFUSALS = 1000


def choose_firings(net: NetShape, state: SessionState, guard: Guard | None = None) -> list[PlannedFiring]:
    """Every firing the marking allows now, in declaration order, oldest markers first.

    A transition fires as many times as its inputs allow, bounded by its ``concurrency`` (counting
    firings already in flight). A marker is never planned for two firings, nor offered to a transition
    it was rejected by or failed in. Candidate sets are offered to ``guard`` oldest first (the first
    input's markers vary slowest); a refused set is skipped, so a marker the guard refuses never holds
    back younger ones. Without a guard every set offered is taken, so the search reduces to taking the
    oldest untaken markers of each input, set after set. Either way the work is linear in the markers
    read (and, with a guard, in the sets it refuses), and nothing recurses per marker.
    """
    taken: set[str] = set()
    plan: list[PlannedFiring] = []
    for t in net.transitions:
        room = None if t.concurrency is None else t.concurrency - state.in_flight_count(t.name)
        if room is not None and room <= 0:
            continue
        if any(len(state.places.get(loc, ())) < count for loc, count in t.inputs):
            continue  # the common case on a busy net: nothing to search
        sets = _oldest_sets(t, state, taken) if guard is None else _candidate_sets(t, state, taken)
        refusals = 0
        for picked in sets:
            if guard is not None and not guard(t.name, {loc: list(ms) for loc, ms in picked.items()}):
                refusals += 1
                if refusals >= GUARD_REFUSALS:
                    break
                continue
            ids = tuple(m.id for loc, _ in t.inputs for m in picked[loc])
            taken.update(ids)
            plan.append(PlannedFiring(t.name, ids))
            if room is not None:
                room -= 1
                if room == 0:
                    break
    return plan


def _eligible(state: SessionState, loc: str, transition: str) -> Iterator[Marker]:
    """The markers of ``loc`` that may be offered to ``transition``, FIFO, lazily."""
    return (p.marker for p in state.places.get(loc, {}).values()
            if transition not in state.blocked.get(p.marker.id, ()))


def _oldest_sets(
    t: TransitionShape, state: SessionState, taken: set[str]
) -> Iterator[dict[str, tuple[Marker, ...]]]:
    """What ``_candidate_sets`` yields to a caller that takes every set: the oldest untaken markers.

    One cursor per input place, each marker read once (planned by an earlier transition: skipped), and
    the first place with too few left ends it.
    """
    sources = [(loc, count, _eligible(state, loc, t.name)) for loc, count in t.inputs]
    while True:
        picked: dict[str, tuple[Marker, ...]] = {}
        for loc, count, source in sources:
            ms: list[Marker] = []
            while len(ms) < count and (m := next(source, None)) is not None:
                if m.id not in taken:
                    ms.append(m)
            if len(ms) < count:
                return
            picked[loc] = tuple(ms)
        yield picked
        if not any(picked.values()):
            return  # a transition that consumes nothing (the net refuses those) is offered that once


class _Eligible:
    """The eligible markers of one place for one transition, FIFO, read only as far as needed.

    ``untaken`` jumps over runs of taken markers and remembers each run it crossed, so no search of this
    choice crosses it again (``taken`` only grows while a choice is made): the taken markers at the head
    of a place are skipped once per transition, not once per firing, and so are those further on.
    """

    def __init__(self, state: SessionState, loc: str, transition: str) -> None:
        self._source = _eligible(state, loc, transition)
        self.seen: list[Marker] = []
        self._past: list[int] = []  # for a taken marker i: every marker from i up to _past[i] is taken

    def _read(self, i: int) -> bool:
        """Whether there is an ``i``-th eligible marker (reading up to it)."""
        while len(self.seen) <= i:
            m = next(self._source, None)
            if m is None:
                return False
            self.seen.append(m)
            self._past.append(len(self.seen))
        return True

    def untaken(self, i: int, taken: set[str]) -> int | None:
        """The index of the oldest untaken marker from ``i`` on, or None if there is none."""
        crossed: list[int] = []
        while self._read(i) and self.seen[i].id in taken:
            crossed.append(i)
            i = self._past[i]
        for j in crossed:
            self._past[j] = i
        return i if i < len(self.seen) else None


class _Pick:
    """One input's part of a candidate set: ``count`` increasing indices into the place's eligible markers.

    The parts of a place come in lexicographic order, oldest first, like an odometer whose first digit
    turns slowest. ``first`` and ``advance`` fill the digits after the one that moved with the oldest
    untaken markers after it; if there are too few, no later value of that digit can do better, so the
    digit before it moves instead. That pruning is what keeps taking every marker linear.
    """

    def __init__(self, eligible: _Eligible, count: int) -> None:
        self._eligible = eligible
        self._count = count
        self._at: list[int] = []

    def markers(self) -> tuple[Marker, ...]:
        return tuple(self._eligible.seen[i] for i in self._at)

    def uses_taken(self, taken: set[str]) -> bool:
        return any(self._eligible.seen[i].id in taken for i in self._at)

    def first(self, taken: set[str]) -> bool:
        """Start over at the oldest untaken markers; False if the place has too few."""
        self._at = []
        return self._fill(0, taken)

    def advance(self, taken: set[str]) -> bool:
        """Move to the next part holding no taken marker; False once there is none.

        The first digit holding a taken marker moves (every part keeping it would reuse it); if none
        does, the last digit moves.
        """
        seen = self._eligible.seen
        d = next((k for k, at in enumerate(self._at) if seen[at].id in taken), len(self._at) - 1)
        while d >= 0:
            i = self._eligible.untaken(self._at[d] + 1, taken)
            del self._at[d:]
            if i is not None:
                self._at.append(i)
                if self._fill(i + 1, taken):
                    return True
                del self._at[d:]
            d -= 1
        return False

    def _fill(self, i: int, taken: set[str]) -> bool:
        while len(self._at) < self._count:
            found = self._eligible.untaken(i, taken)
            if found is None:
                return False
            self._at.append(found)
            i = found + 1
        return True


def _candidate_sets(
    t: TransitionShape, state: SessionState, taken: set[str]
) -> Iterator[dict[str, tuple[Marker, ...]]]:
    """Untaken input sets of ``t`` in lexicographic (oldest first) order, lazily, for a guard to judge.

    The caller may add to ``taken`` between items; sets that would reuse a taken marker are skipped.
    Each input's part is one wheel of an odometer whose first wheel turns slowest: after a set, the
    first input whose part holds a taken marker moves on (the last input if none does), an input that
    runs out of parts turns the one before it, and every input after the one that moved starts over at
    its oldest untaken markers. An input with too few untaken markers ends the search: taking more
    can't help it.
    """
    picks = [_Pick(_Eligible(state, loc, t.name), count) for loc, count in t.inputs]
    fresh = 0  # the inputs from this one on start over
    while all(pick.first(taken) for pick in picks[fresh:]):
        yield {loc: pick.markers() for (loc, _), pick in zip(t.inputs, picks)}
        moved = next((p for p, pick in enumerate(picks) if pick.uses_taken(taken)), len(picks) - 1)
        while moved >= 0 and not picks[moved].advance(taken):
            moved -= 1
        if moved < 0:
            return
        fresh = moved + 1
