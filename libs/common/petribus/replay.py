"""Replay a recorded session with a net, without running anything: where would this net decide differently?

Like Temporal's replayer, for CI: fold the recorded log event by event and, wherever the log records a
decision, ask the given net (usually a changed version of the app that recorded it) what it would decide.
Pure: events and a ``Net`` in, a ``Report`` out; nothing is run, read or written.

What makes the check exact: the scheduler appends its claims (``transition_fired``) in atomic batches at
the expected last subject sequence, so a batch that starts at sequence ``s`` was planned by
``choose_firings`` on exactly the fold of the log up to ``s - 1``. A run of consecutive
``transition_fired`` events is one **decision point**: the new net's plan on the state just before it is
compared with the run.

- A recorded firing the new plan lacks is a difference, named by its first cause: the transition is gone
  (``unknown_transition``), its inputs changed (``inputs_changed``), the markers are blocked for it
  (``blocked``), its ``concurrency`` is full (``concurrency``), its guard now refuses them
  (``guard_false``), or the new net gives the markers to another firing (``not_chosen``).
- A recorded firing whose ``confirm`` flag the new net would set differently is ``confirm_changed``.
- A firing the new plan has and the run lacks is ``extra_firing``, unless the next decision point makes
  it: a scheduler whose plan spans several batches continues after a refused batch on a later state, so
  one decision may land as two runs with other events between them. The state at the end of the log is
  a decision point as well (a session exported at rest has nothing left to fire); with ``until`` it is
  checked only when ``until`` reaches the log's last event. A firing is reported once, where it first
  shows.
- Every marker that enters the net (``marker_added``, a fork's markers, a completion's outputs) must be
  at a location of the new net and validate against its model (``unknown_location``,
  ``invalid_marker``); an output must be at a location its transition still declares
  (``undeclared_output``).

A decision with nothing to fire leaves no trace in the log, so a new net that would fire where the old
one fired nothing is seen at the next decision point or at the end. The fold itself is the core's and
does not depend on the net, so the replay follows the recorded log, not the new net's choices: after
the first difference, later ones may be its consequences.
"""

from __future__ import annotations

import bisect
import copy
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal


from petribus.core import PlannedFiring, SessionState, apply, choose_firings
from petribus.errors import InvalidInput
from petribus.events import Marker, MarkerAdded, SessionForked, TransitionCompleted, TransitionFired, _Event
from petribus.net import Net

DifferenceKind = Literal[
    "unknown_transition", "inputs_changed", "blocked", "concurrency", "guard_false", "not_chosen",
    "confirm_changed", "extra_firing", "unknown_location", "invalid_marker", "undeclared_output",
]

FiringKey = tuple[str, tuple[str, ...]]  # (transition, consumed marker ids grouped by location name)


@dataclass(frozen=True)
class Difference:
    """One place where the net would not do what the log recorded."""

    seq: int  # the event it concerns (for a decision point: its first transition_fired)
    kind: DifferenceKind
    message: str  # a sentence for a person: what the log has, what the net would do instead
    transition: str | None = None
    firing_id: str | None = None  # the recorded firing, when there is one
    marker_ids: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "message": self.message, "transition": self.transition,
                "firing_id": self.firing_id, "marker_ids": list(self.marker_ids)}


@dataclass
class Report:
    """What a replay found. ``differences`` is in log order; empty means the net decides as the log did."""

    bot: str = ""
    session_id: str = ""
    last_seq: int = 0  # the last event folded
    events: int = 0  # events folded
    decisions: int = 0  # decision points compared (the end of the log included)
    firings: int = 0  # recorded firings compared
    markers: int = 0  # markers checked against the net's locations
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    def to_json(self) -> dict[str, Any]:
        return {"bot": self.bot, "session_id": self.session_id, "last_seq": self.last_seq, "events": self.events,
                "decisions": self.decisions, "firings": self.firings, "markers": self.markers, "ok": self.ok,
                "differences": [d.to_json() for d in self.differences]}


def _planned_earlier(log: list[tuple[int, _Event]]) -> Counter[int]:
    """The sequences a run of claims was decided on that are not the event just before it, with how many
    runs were: the replay keeps a copy of its fold there until the last of them."""
    wanted: Counter[int] = Counter()
    for i, (_, event) in enumerate(log):
        if isinstance(event, TransitionFired) and event.planned_at is not None:
            before = log[i - 1][0] if i else 0
            previous = log[i - 1][1] if i else None
            starts_run = not isinstance(previous, TransitionFired) or previous.planned_at != event.planned_at
            if event.planned_at != before and starts_run:  # as ``_run_at`` splits runs
                wanted[event.planned_at] += 1
    return wanted


def replay(net: Net, log: Iterable[tuple[int, _Event]], *, until: int | None = None) -> Report:
    """Fold ``log`` (``(seq, event)`` in order) up to ``until`` (inclusive; None: all of it) and report where
    ``net`` would decide differently from what it records."""
    return _Replay(net).run(list(log), until)


class _Replay:
    def __init__(self, net: Net) -> None:
        self.net = net
        self.shape = net.shape()
        self.guarded = any(t.when is not None for t in net.transitions)
        self.state = SessionState()
        self.report = Report()
        self.where: dict[str, str] = {}  # marker id -> its location (a marker never moves between places)
        self.reported: set[FiringKey] = set()  # extra firings already reported, so each shows once
        self.deferred: list[tuple[int, PlannedFiring]] = []  # extras the next decision point may still make
        self.wanted: Counter[int] = Counter()  # sequences later claims were decided on (planned_at)
        self.folds: dict[int, SessionState] = {}  # copies of the fold at those sequences
        self.claims: list[tuple[int, TransitionFired]] = []  # every claim folded, in order

    def run(self, log: list[tuple[int, _Event]], until: int | None) -> Report:
        self.wanted = _planned_earlier(log)
        if 0 in self.wanted:
            self.folds[0] = copy.deepcopy(self.state)
        i = 0
        while i < len(log) and (until is None or log[i][0] <= until):
            whole = _run_at(log, i)
            if whole:
                run = [(seq, fired) for seq, fired in whole if until is None or seq <= until]
                # A run cut by ``until`` is still one decision: all of it says what the decision made.
                self._decide(run, made={self._key(f.transition, f.consumed) for _, f in whole})
                for seq, fired in run:
                    self._fold(seq, fired)
                i += len(run)
                continue
            seq, event = log[i]
            self._check_markers(seq, event)
            self._fold(seq, event)
            i += 1
        # The last decision point's extras, unless the next run (after ``until``, if it cut the log) makes them.
        later = next((j for j in range(i, len(log)) if isinstance(log[j][1], TransitionFired)), None)
        made = {self._key(f.transition, f.consumed) for _, f in _run_at(log, later)} if later is not None else set()
        self._report_extras([(seq, p) for seq, p in self.deferred if self._key(p.transition, p.consumed) not in made])
        self.deferred = []
        if until is None or not log or until >= log[-1][0]:
            self._at_end()
        self.report.differences.sort(key=lambda d: d.seq)
        return self.report

    def _fold(self, seq: int, event: _Event) -> None:
        before = self.state.last_seq
        apply(self.state, seq, event)
        if self.state.last_seq != before:
            self.report.events += 1
            self.report.last_seq = seq
            self.report.bot = self.report.bot or event.bot
            self.report.session_id = self.report.session_id or event.session_id
        if isinstance(event, TransitionFired):
            self.claims.append((seq, event))
        if seq in self.wanted:
            self.folds[seq] = copy.deepcopy(self.state)

    # ------------------------------------------------------------------ decisions

    def _plan(self) -> list[PlannedFiring]:
        guard = (lambda name, picked: self._judge(name, picked)[0]) if self.guarded else None
        return choose_firings(self.shape, self.state, guard=guard)

    def _decide(self, run: list[tuple[int, TransitionFired]], made: set[FiringKey]) -> None:
        """Compare the recorded run (one decision, which made ``made``) with the net's plan on the state
        just before it."""
        self.report.decisions += 1
        state = self.state
        first_seq = run[0][0]
        # The fold the decision was made on: the claim records it (other kinds of event may have landed
        # between it and the claim); without it, the event just before the claim.
        planned_at = run[0][1].planned_at
        basis = (state if planned_at is None or planned_at == state.last_seq
                 else self._basis(planned_at, first_seq))
        self.state = basis
        try:
            self._decide_on(run, made, state, first_seq)
        finally:
            self.state = state

    def _basis(self, planned_at: int, first_seq: int) -> SessionState:
        """The fold a run of claims at ``first_seq`` was decided on: the log's at ``planned_at``, and the
        claims made since (only the scheduler claims, and a claim lands only on a fold that has every claim
        before it: one decision's claims landed one by one, with others' events between them, or a
        decision's claims folded before events that landed just ahead of them)."""
        basis = self.folds.get(planned_at)
        if basis is None:  # the fold just before the run
            return self.state
        self.wanted[planned_at] -= 1
        since = self.claims[bisect.bisect_right(self.claims, planned_at, key=lambda c: c[0]):
                            bisect.bisect_left(self.claims, first_seq, key=lambda c: c[0])]
        if self.wanted[planned_at] <= 0:
            del self.folds[planned_at]
        elif since:
            basis = copy.deepcopy(basis)  # later runs decided on the same fold want it as it was
        for seq, event in since:
            apply(basis, seq, event)
        return basis

    def _decide_on(self, run: list[tuple[int, TransitionFired]], made: set[FiringKey], state: SessionState,
                   first_seq: int) -> None:
        """``_decide`` with ``self.state`` the fold the decision was made on and ``state`` the fold now."""
        plan = self._plan()
        planned = {self._key(p.transition, p.consumed): p for p in plan}
        # Extras of the last decision point that this one makes were one decision split across two runs;
        # those it still plans and does not make wait for the next one (a decision claimed one by one,
        # with others' events or a rival's claims between its claims), where they were first wanted.
        first_wanted: dict[FiringKey, int] = {}
        superseded = []
        for s, p in self.deferred:
            key = self._key(p.transition, p.consumed)
            if key in made:
                continue
            if key in planned:
                first_wanted[key] = s
            else:
                superseded.append((s, p))
        self._report_extras(superseded)
        claimed: set[str] = set()
        fired = Counter[str]()
        for seq, event in run:
            ids = event.consumed
            if (event.firing_id in state.in_flight or event.firing_id in state.finished
                    or len(set(ids)) != len(ids) or claimed.intersection(ids)
                    or not all(self._placed(mid, state) for mid in ids)):
                continue  # the fold ignores it whatever the net: a repeat, or markers no longer there
            claimed.update(ids)
            self.report.firings += 1
            if not all(self._placed(mid) for mid in ids):
                late = [mid for mid in ids if not self._placed(mid)]
                self._add(seq, "not_chosen", event.transition, event.firing_id, tuple(ids),
                          f"{event.transition!r} fired on {self._markers(tuple(ids))}, but {', '.join(late)} "
                          f"landed after the fold it was decided on (seq {event.planned_at})")
            elif self._key(event.transition, tuple(ids)) in planned:
                self._check_confirm(seq, event)
            else:
                self._not_chosen(seq, event, plan, fired)
            fired[event.transition] += 1
        self.deferred = [(first_wanted.get(key, first_seq), p) for key, p in planned.items()
                         if key not in made]

    def _at_end(self) -> None:
        self.report.decisions += 1
        self._report_extras([(self.state.last_seq, p) for p in self._plan()], at_end=True)

    def _report_extras(self, extras: list[tuple[int, PlannedFiring]], *, at_end: bool = False) -> None:
        for seq, p in extras:
            key = self._key(p.transition, p.consumed)
            if key in self.reported:
                continue
            self.reported.add(key)
            where = "at the end of the log" if at_end else "here"
            self._add(seq, "extra_firing", p.transition, None, p.consumed,
                      f"the net would fire {p.transition!r} on {self._markers(p.consumed)} {where}; "
                      "the log has no such firing")

    def _check_confirm(self, seq: int, event: TransitionFired) -> None:
        t = self.net.transition(event.transition)
        halted = event.transition in self.state.halt_before
        wanted = t.confirm or halted
        if wanted != event.confirm:
            why = ("confirm=True" if t.confirm else "a halt_set holds it") if wanted else "confirm=False"
            self._add(seq, "confirm_changed", event.transition, event.firing_id, tuple(event.consumed),
                      f"{event.transition!r} fired with confirm={event.confirm}, but the net would "
                      f"{'wait for the user' if wanted else 'run it without asking'} ({why})")

    def _not_chosen(self, seq: int, event: TransitionFired, plan: list[PlannedFiring],
                    fired_before: Counter[str]) -> None:
        """Say why the net would not make this recorded firing: the first cause found."""
        name, ids = event.transition, tuple(event.consumed)

        def add(kind: DifferenceKind, why: str) -> None:
            self._add(seq, kind, name, event.firing_id, ids,
                      f"{name!r} fired on {self._markers(ids)}, but {why}")

        if not self.net.has_transition(name):
            known = ", ".join(repr(t.name) for t in self.net.transitions)
            return add("unknown_transition", f"the net has no transition {name!r} (it has {known})")
        t = self.net.transition(name)
        got = Counter(self.where[mid] for mid in ids)
        want = Counter(dict(t.inputs))
        if got != want:
            return add("inputs_changed", f"the net's {name!r} takes {_counts(want)}, not {_counts(got)}")
        blocked = [mid for mid in ids if name in self.state.blocked.get(mid, ())]
        if blocked:
            return add("blocked", f"{', '.join(blocked)} failed in or was rejected by {name!r} before, "
                       "so it is not offered to it again")
        busy = self.state.in_flight_count(name) + fired_before[name]
        if t.concurrency is not None and busy >= t.concurrency:
            return add("concurrency", f"the net allows {t.concurrency} firing(s) of {name!r} at once and "
                       f"{busy} were in flight")
        picked: dict[str, list[Marker]] = {}
        for mid in ids:
            picked.setdefault(self.where[mid], []).append(self.state.places[self.where[mid]][mid].marker)
        allowed, why = self._judge(name, picked)
        if not allowed:
            return add("guard_false", f"the net's guard (when=) of {name!r} {why}")
        rivals = [p for p in plan if set(p.consumed) & set(ids)]
        if rivals:
            others = "; ".join(f"{p.transition!r} on {self._markers(p.consumed)}" for p in rivals)
            return add("not_chosen", f"the net would fire {others} instead")
        return add("not_chosen", "the net would not fire it here")

    def _judge(self, name: str, picked: dict[str, list[Marker]]) -> tuple[bool, str]:
        """Whether the transition's guard takes these markers, as the scheduler asks it (``Net.judge``)."""
        return self.net.judge(name, picked)

    # ------------------------------------------------------------------ markers

    def _check_markers(self, seq: int, event: _Event) -> None:
        """Check each marker the fold will put into the net against the net's locations and models."""
        state = self.state
        match event:
            case MarkerAdded() if event.marker.id not in state.seen_markers and seq > state.last_seq:
                self._check_marker(seq, event.marker, f"added by {event.source}")
            case SessionForked() if not state.created and seq > state.last_seq:
                for m in event.markers:
                    self._check_marker(seq, m, "carried over by the fork")
            case TransitionCompleted() if seq > state.last_seq:
                f = state.in_flight.get(event.firing_id)
                if f is None or f.status == "awaiting_confirmation":
                    return  # ignored by the fold
                declared = (self.net.transition(event.transition).outputs
                            if self.net.has_transition(event.transition) else None)
                for m in event.outputs:
                    if m.id in state.seen_markers:
                        continue
                    if self._check_marker(seq, m, f"output of {event.transition!r}") and declared is not None \
                            and m.location not in declared:
                        self._add(seq, "undeclared_output", event.transition, event.firing_id, (m.id,),
                                  f"{event.transition!r} output marker {m.id} at {m.location}, which the net's "
                                  f"{event.transition!r} does not declare (outputs: {list(declared)})")

    def _check_marker(self, seq: int, marker: Marker, how: str) -> bool:
        """Whether ``marker`` fits the net; a difference if not."""
        self.where[marker.id] = marker.location
        self.report.markers += 1
        if marker.location not in self.net.locations:
            known = ", ".join(sorted(self.net.locations))
            self._add(seq, "unknown_location", None, None, (marker.id,),
                      f"marker {marker.id} ({how}) is at location {marker.location!r}, which the net does "
                      f"not have (it has {known})")
            return False
        try:
            self.net.validate_marker(marker.location, marker.data)
        except InvalidInput as exc:
            self._add(seq, "invalid_marker", None, None, (marker.id,),
                      f"marker {marker.id} ({how}) does not validate against the net's "
                      f"{self.net.locations[marker.location].model.__name__}: {exc.message}")
            return False
        return True

    # ------------------------------------------------------------------ helpers

    def _placed(self, marker_id: str, state: SessionState | None = None) -> bool:
        loc = self.where.get(marker_id)
        return loc is not None and marker_id in (self.state if state is None else state).places.get(loc, {})

    def _key(self, transition: str, consumed: Sequence[str]) -> FiringKey:
        """A firing by what it takes, independent of the order the net lists its inputs in."""
        by_loc: dict[str, list[str]] = {}
        for mid in consumed:
            by_loc.setdefault(self.where.get(mid, ""), []).append(mid)
        return transition, tuple(mid for loc in sorted(by_loc) for mid in by_loc[loc])

    def _markers(self, ids: Sequence[str]) -> str:
        return ", ".join(f"{mid} ({self.where.get(mid, '?')})" for mid in ids)

    def _add(self, seq: int, kind: DifferenceKind, transition: str | None, firing_id: str | None,
             marker_ids: Sequence[str], message: str) -> None:
        self.report.differences.append(Difference(seq, kind, message, transition, firing_id, tuple(marker_ids)))


def _run_at(log: list[tuple[int, _Event]], i: int) -> list[tuple[int, TransitionFired]]:
    """The run of consecutive ``transition_fired`` events that starts at ``log[i]`` (empty if none does)."""
    run: list[tuple[int, TransitionFired]] = []
    while i < len(log) and isinstance(event := log[i][1], TransitionFired) and (
            not run or event.planned_at == run[0][1].planned_at):  # decided on another fold: another run
        run.append((log[i][0], event))
        i += 1
    return run


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {loc}" for loc, n in sorted(counts.items())) or "nothing"
