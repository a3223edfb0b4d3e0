"""Property tests of the pure core over random nets and random, hostile event orders.

Each example draws a random net (1-4 locations; 1-4 transitions with 1-3 distinct input locations,
counts 1-3, a concurrency bound or none, a confirm flag, random outputs) and a guard (none, or one
that refuses some candidate sets by their data), then simulates a session of up to 60 steps. A step
is one of:

- a marker added (a new id, or now and then an id the log has seen before);
- a scheduler round: ``choose_firings`` and a ``transition_fired`` per planned firing, or only the
  first few (a scheduler killed mid-round);
- a firing started, completed with random outputs (sometimes reusing a marker id), failed (final or
  not), accepted or rejected, picked among the firings in flight or any firing ever seen, so
  completions arrive before starts, after failures, or for firings that never were;
- a duplicated delivery: an earlier fired / completed / failed / accept / reject event appended again;
- an adversarial ``transition_fired`` naming random marker ids (consumed, dead, unknown, repeated)
  under a new or reused firing id.

Every event is folded live, as the scheduler does, and each test checks one invariant over the run.
The firing choice is also checked against ``plan_by_brute_force``, the choice spelled out slowly, on
those runs and on random markings with blocked markers, firings in flight and small refusal caps.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import combinations, product
from math import comb, inf, prod
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from petribus import core
from petribus.core import (
    Firing,
    Guard,
    NetShape,
    PlannedFiring,
    SessionState,
    TransitionShape,
    apply,
    choose_firings,
    fold,
)
from petribus.events import (
    AcceptTransition,
    Marker,
    MarkerAdded,
    RejectTransition,
    TransitionCompleted,
    TransitionFailed,
    TransitionFired,
    TransitionStarted,
    _Event,
    decode,
    encode,
)

B, S = "bot", "s1"
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class View:
    """What one state says about markers and firings, in comparable form (FIFO order kept)."""

    places: dict[str, tuple[str, ...]]
    in_flight: dict[str, tuple[str, str, tuple[str, ...]]]  # firing -> (transition, status, consumed ids)
    finished: frozenset[str]

    @classmethod
    def of(cls, state: SessionState) -> "View":
        return cls(
            places={loc: tuple(ms) for loc, ms in state.places.items() if ms},
            in_flight={f.id: (f.transition, f.status, tuple(p.marker.id for p in f.consumed))
                       for f in state.in_flight.values()},
            finished=frozenset(state.finished),
        )

    def held(self) -> list[str]:
        """Every marker id in a place or held by a firing, with repeats if any."""
        return [m for ms in self.places.values() for m in ms] + [
            m for _, _, consumed in self.in_flight.values() for m in consumed]


@dataclass
class Step:
    seq: int
    event: _Event
    before: View
    after: View


@dataclass
class Plan:
    state: SessionState  # a copy of the state it was chosen from
    plan: list[PlannedFiring]
    fired: SessionState  # the state once the whole plan is fired


@dataclass
class Run:
    net: NetShape
    outputs: dict[str, tuple[str, ...]]
    guard: Guard | None
    log: list[tuple[int, _Event]] = field(default_factory=list)
    state: SessionState = field(default_factory=SessionState)
    steps: list[Step] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)
    marker_ids: list[str] = field(default_factory=list)
    firing_ids: list[str] = field(default_factory=list)
    redeliverable: list[_Event] = field(default_factory=list)
    n: int = 0

    def new_id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def append(self, event: _Event) -> None:
        seq = len(self.log) + 1
        before = View.of(self.state)
        self.log.append((seq, event))
        apply(self.state, seq, event)
        self.steps.append(Step(seq, event, before, View.of(self.state)))
        if not isinstance(event, (MarkerAdded, TransitionStarted)):
            self.redeliverable.append(event)

    def fired(self, transition: str, consumed: list[str], firing_id: str, confirm: bool) -> TransitionFired:
        self.firing_ids.append(firing_id)
        return TransitionFired(bot=B, session_id=S, firing_id=firing_id, transition=transition,
                               consumed=consumed, confirm=confirm)


def parity_guard(transition: str, picked: dict[str, list[Marker]]) -> bool:
    return sum(m.data.get("v", 0) for ms in picked.values() for m in ms) % 3 != 1


@st.composite
def nets(draw: Any) -> tuple[NetShape, dict[str, tuple[str, ...]]]:
    locations = [f"P{i}" for i in range(draw(st.integers(1, 4)))]
    transitions, outputs = [], {}
    for i in range(draw(st.integers(1, 4))):
        ins = draw(st.lists(st.sampled_from(locations), min_size=1, max_size=min(3, len(locations)), unique=True))
        inputs = tuple((loc, draw(st.integers(1, 3))) for loc in ins)
        name = f"T{i}"
        transitions.append(TransitionShape(name, inputs, draw(st.none() | st.integers(1, 3)), draw(st.booleans())))
        outputs[name] = tuple(draw(st.lists(st.sampled_from(locations), max_size=len(locations), unique=True)))
    return NetShape(tuple(transitions)), outputs


ACTIONS = ["add", "add", "add", "schedule", "schedule", "start", "complete", "complete", "fail",
           "accept", "reject", "redeliver", "adversarial_fire"]


def simulate(data: Any) -> Run:
    net, outputs = data.draw(nets(), label="net")
    guard = data.draw(st.sampled_from([None, parity_guard]), label="guard")
    run = Run(net, outputs, guard)
    shapes = {t.name: t for t in net.transitions}
    locations = sorted({loc for t in net.transitions for loc, _ in t.inputs}
                       | {o for os in outputs.values() for o in os})

    def some(items: list[Any], label: str) -> Any:
        return data.draw(st.sampled_from(items), label=label)

    def marker_id() -> str:
        if run.marker_ids and data.draw(st.integers(0, 9), label="reuse marker id") == 0:
            return some(run.marker_ids, "reused marker id")
        mid = run.new_id("m")
        run.marker_ids.append(mid)
        return mid

    def firing_id(fresh_bias: int = 4) -> str:
        if run.firing_ids and data.draw(st.integers(0, fresh_bias), label="reuse firing id") == 0:
            return some(run.firing_ids, "reused firing id")
        return run.new_id("f")

    def target() -> str | None:
        """A firing to act on: mostly one in flight, else any firing ever named."""
        in_flight = list(run.state.in_flight)
        if in_flight and data.draw(st.integers(0, 3), label="in flight?") > 0:
            return some(in_flight, "firing in flight")
        return some(run.firing_ids, "any firing") if run.firing_ids else None

    for _ in range(data.draw(st.integers(1, 60), label="steps")):
        action = some(ACTIONS, "action")
        if action == "add":
            marker = Marker(id=marker_id(), location=some(locations, "location"),
                            data={"v": data.draw(st.integers(0, 9), label="v")})
            run.append(MarkerAdded(bot=B, session_id=S, marker=marker))
        elif action == "schedule":
            plan = choose_firings(net, run.state, guard)
            events = [run.fired(p.transition, list(p.consumed), run.new_id("f"), shapes[p.transition].confirm)
                      for p in plan]
            after = fold(list(run.log) + [(len(run.log) + 1 + i, e) for i, e in enumerate(events)])
            run.plans.append(Plan(fold(list(run.log)), plan, after))
            for event in events[: data.draw(st.integers(0, len(events)), label="appended")]:
                run.append(event)
        elif action == "adversarial_fire":
            consumed = data.draw(st.lists(st.sampled_from(run.marker_ids or ["ghost"]), min_size=1, max_size=4),
                                 label="consumed")
            run.append(run.fired(some(sorted(shapes), "transition"), consumed, firing_id(1),
                                 data.draw(st.booleans(), label="confirm")))
        elif action == "redeliver" and run.redeliverable:
            run.append(some(run.redeliverable, "redelivered"))
        elif (fid := target()) is not None:
            f = run.state.in_flight.get(fid)
            name = f.transition if f else some(sorted(shapes), "transition")
            if action == "start":
                run.append(TransitionStarted(bot=B, session_id=S, firing_id=fid, transition=name, executor="x",
                                             attempt=data.draw(st.integers(1, 3), label="attempt")))
            elif action == "complete":
                made = [Marker(id=marker_id(), location=loc, data={"v": data.draw(st.integers(0, 9), label="v")})
                        for loc in outputs.get(name, ()) for _ in range(data.draw(st.integers(0, 2), label="n"))]
                run.append(TransitionCompleted(bot=B, session_id=S, firing_id=fid, transition=name, outputs=made))
            elif action == "fail":
                run.append(TransitionFailed(bot=B, session_id=S, firing_id=fid, transition=name, error="boom",
                                            final=data.draw(st.booleans(), label="final")))
            elif action == "accept":
                run.append(AcceptTransition(bot=B, session_id=S, firing_id=fid))
            elif action == "reject":
                run.append(RejectTransition(bot=B, session_id=S, firing_id=fid))
    return run


def enabled_by_brute_force(net: NetShape, state: SessionState, guard: Guard | None) -> list[str]:
    """Transitions with room and some input set the guard accepts, found by trying every set."""
    enabled = []
    for t in net.transitions:
        if t.concurrency is not None and state.in_flight_count(t.name) >= t.concurrency:
            continue
        pools = [[p.marker for p in state.places.get(loc, {}).values()
                  if t.name not in state.blocked.get(p.marker.id, ())] for loc, _ in t.inputs]
        if prod(comb(len(pool), count) for pool, (_, count) in zip(pools, t.inputs)) > 5_000:
            continue  # too many to try; the other examples cover it
        sets = product(*(combinations(pool, count) for pool, (_, count) in zip(pools, t.inputs)))
        if any(guard is None or guard(t.name, {loc: list(ms) for (loc, _), ms in zip(t.inputs, s)}) for s in sets):
            enabled.append(t.name)
    return enabled


def plan_by_brute_force(net: NetShape, state: SessionState, guard: Guard | None) -> list[PlannedFiring]:
    """The firing choice spelled out, slowly.

    For each transition in declaration order, again and again: among the sets of eligible markers not
    yet planned, the first in lexicographic order (the first input's oldest markers varying slowest)
    that the guard has not refused yet is offered to it; stop when there is none, when the transition
    has no room left, or when it has refused ``GUARD_REFUSALS`` sets. Starting over each time and
    remembering refusals offers the same sets in the same order as one pass that skips sets reusing a
    planned marker, as long as the guard answers the same set the same way.
    """
    taken: set[str] = set()
    plan: list[PlannedFiring] = []
    for t in net.transitions:
        room = inf if t.concurrency is None else t.concurrency - state.in_flight_count(t.name)
        counts = [count for _, count in t.inputs]
        refused: set[tuple[str, ...]] = set()
        while room > 0 and len(refused) < core.GUARD_REFUSALS:
            pools = [[p.marker for p in state.places.get(loc, {}).values()
                      if p.marker.id not in taken and t.name not in state.blocked.get(p.marker.id, ())]
                     for loc, _ in t.inputs]
            if any(len(pool) < count for pool, count in zip(pools, counts)):
                break
            offered = next((s for s in lexicographic(pools, counts) if ids_of(s) not in refused), None)
            if offered is None:
                break
            if guard is not None and not guard(t.name, {loc: list(ms) for (loc, _), ms in zip(t.inputs, offered)}):
                refused.add(ids_of(offered))
                continue
            taken.update(ids_of(offered))
            plan.append(PlannedFiring(t.name, ids_of(offered)))
            room -= 1
    return plan


def lexicographic(pools: list[list[Marker]], counts: list[int]) -> Iterator[tuple[tuple[Marker, ...], ...]]:
    """``itertools.product`` of each pool's combinations, lazily (product lists every input first)."""
    if not pools:
        yield ()
        return
    for first in combinations(pools[0], counts[0]):
        for rest in lexicographic(pools[1:], counts[1:]):
            yield (first, *rest)


def ids_of(sets: tuple[tuple[Marker, ...], ...]) -> tuple[str, ...]:
    return tuple(m.id for ms in sets for m in ms)


def recorded(guard: Guard | None, calls: list[tuple[str, dict[str, list[str]]]]) -> Guard | None:
    """``guard``, noting every set it is asked about."""
    if guard is None:
        return None

    def asked(transition: str, picked: dict[str, list[Marker]]) -> bool:
        calls.append((transition, {loc: [m.id for m in ms] for loc, ms in picked.items()}))
        return guard(transition, picked)

    return asked


def accepted_completion(step: Step) -> str | None:
    """The firing whose completion this step applied, if it applied one."""
    e = step.event
    if isinstance(e, TransitionCompleted) and e.firing_id in step.before.in_flight \
            and e.firing_id not in step.after.in_flight:
        return e.firing_id
    return None


def snapshot(state: SessionState) -> tuple:
    """Everything in a state, order included (dataclass equality would ignore dict order)."""
    return (
        state.bot, state.session_id, state.last_seq, state.created, state.events,
        [(loc, [(p.marker, p.order) for p in ms.values()]) for loc, ms in state.places.items()],
        [(f.id, f.transition, [(p.marker, p.order) for p in f.consumed], f.status, f.fired_seq, f.attempts)
         for f in state.in_flight.values()],
        sorted(state.finished), sorted(state.seen_markers),
        sorted((m, sorted(ts)) for m, ts in state.blocked.items()),
        state.chat, state.memory, list(state.pending_requests.items()),
    )


# --- consumption ---------------------------------------------------------------------------------


@PROPERTY
@given(st.data())
def test_marker_consumed_by_at_most_one_firing(data):
    run = simulate(data)
    dead: set[str] = set()  # consumed by a firing that completed: gone for good
    for step in run.steps:
        holders: dict[str, str] = {}
        for fid, (_, _, consumed) in step.after.in_flight.items():
            for m in consumed:
                assert m not in holders, f"{m} held by {holders[m]} and {fid} at seq {step.seq}"
                holders[m] = fid
        if (fid := accepted_completion(step)) is not None:
            dead.update(step.before.in_flight[fid][2])
        assert not dead & set(step.after.held()), f"a consumed marker came back at seq {step.seq}"


@PROPERTY
@given(st.data())
def test_marker_is_never_in_two_places_at_once_and_no_count_goes_negative(data):
    run = simulate(data)
    for step in run.steps:
        held = step.after.held()
        assert len(held) == len(set(held)), f"a marker is in two places at seq {step.seq}"
    counts = run.state.counts()
    assert all(n > 0 for n in counts.values())
    assert sum(counts.values()) == sum(len(ms) for ms in run.state.places.values())
    for loc, ms in run.state.places.items():
        assert all(p.marker.location == loc and p.marker.id == mid for mid, p in ms.items())


@PROPERTY
@given(st.data())
def test_markers_are_conserved_except_through_completions(data):
    run = simulate(data)
    for step in run.steps:
        before, after = set(step.before.held()), set(step.after.held())
        e = step.event
        if isinstance(e, MarkerAdded):
            assert after - before <= {e.marker.id} and before <= after
        elif (fid := accepted_completion(step)) is not None:
            assert before - after == set(step.before.in_flight[fid][2])
            assert after - before <= {m.id for m in e.outputs}  # type: ignore[attr-defined]
        else:
            assert after == before, f"{e.type} at seq {step.seq} changed the markers"


@PROPERTY
@given(st.data())
def test_firing_effects_land_at_most_once(data):
    run = simulate(data)
    completed: set[str] = set()
    ended: set[str] = set()  # left the in-flight set: completed, failed for good or rejected
    for step in run.steps:
        if (fid := accepted_completion(step)) is not None:
            assert fid not in completed, f"{fid} completed twice"
            completed.add(fid)
        assert not ended & set(step.after.in_flight), f"an ended firing came back at seq {step.seq}"
        ended |= set(step.before.in_flight) - set(step.after.in_flight)
        assert step.before.finished <= step.after.finished


@PROPERTY
@given(st.data())
def test_places_stay_in_fifo_order(data):
    run = simulate(data)
    for loc, ms in run.state.places.items():
        seqs = [p.order for p in ms.values()]
        assert seqs == sorted(seqs), f"{loc} is out of FIFO order"


# --- firing choice -------------------------------------------------------------------------------


@PROPERTY
@given(st.data())
def test_choose_firings_never_plans_a_marker_twice_nor_exceeds_concurrency(data):
    run = simulate(data)
    for p in run.plans:
        state, shapes = p.state, {t.name: t for t in run.net.transitions}
        planned = [m for f in p.plan for m in f.consumed]
        assert len(planned) == len(set(planned)), "a marker is planned twice"
        for t in run.net.transitions:
            n = sum(1 for f in p.plan if f.transition == t.name)
            if t.concurrency is not None:
                assert n <= max(0, t.concurrency - state.in_flight_count(t.name))
        for f in p.plan:
            want = [loc for loc, count in shapes[f.transition].inputs for _ in range(count)]
            got = []
            for mid in f.consumed:
                (loc,) = [loc for loc, ms in state.places.items() if mid in ms]
                assert f.transition not in state.blocked.get(mid, ()), "a marker offered to a transition it left"
                got.append(loc)
            assert got == want, "consumed markers don't match the inputs, in input order"
            if run.guard is not None:
                picked: dict[str, list[Marker]] = {}
                for mid, loc in zip(f.consumed, got):
                    picked.setdefault(loc, []).append(state.places[loc][mid].marker)
                assert run.guard(f.transition, picked)


@PROPERTY
@given(st.data())
def test_choose_firings_fires_everything_the_marking_allows(data):
    run = simulate(data)
    for p in run.plans:
        assert choose_firings(run.net, p.fired, run.guard) == [], "a second choice found more to fire"
        enabled = enabled_by_brute_force(run.net, p.fired, run.guard)
        assert enabled == [], f"{enabled} could still fire after the plan was fired"


@PROPERTY
@given(st.data())
def test_choose_firings_chooses_what_the_brute_force_reference_chooses(data):
    run = simulate(data)
    for p in run.plans:
        got_calls: list = []
        want_calls: list = []
        got = choose_firings(run.net, p.state, recorded(run.guard, got_calls))
        assert got == p.plan
        assert got == plan_by_brute_force(run.net, p.state, recorded(run.guard, want_calls))
        assert got_calls == want_calls, "the guard was asked about other sets, or in another order"


def refuse_odd(transition: str, picked: dict[str, list[Marker]]) -> bool:
    return all(m.data["v"] % 2 == 0 for ms in picked.values() for m in ms)


def accept_all(transition: str, picked: dict[str, list[Marker]]) -> bool:
    return True


@st.composite
def arbitrary_guards(draw: Any) -> Guard | None:
    """No guard, one that accepts everything, ones that judge marker data, or one that judges each set
    by its ids and transition as if at random (but the same way every time it is asked)."""
    salt = draw(st.integers(0, 1_000))
    modulus = draw(st.integers(2, 5))

    def scattered(transition: str, picked: dict[str, list[Marker]]) -> bool:
        key = ",".join([transition, *(m.id for ms in picked.values() for m in ms)])
        return zlib.crc32(f"{salt}:{key}".encode()) % modulus != 0

    return draw(st.sampled_from([None, accept_all, parity_guard, refuse_odd, scattered]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_choose_firings_matches_the_brute_force_reference_on_any_marking(data):
    net, _ = data.draw(nets(), label="net")
    names = [t.name for t in net.transitions]
    locations = sorted({loc for t in net.transitions for loc, _ in t.inputs})
    state = SessionState()
    for seq in range(1, data.draw(st.integers(0, 16), label="markers") + 1):
        marker = Marker(id=f"m{seq}", location=data.draw(st.sampled_from(locations), label="location"),
                        data={"v": data.draw(st.integers(0, 9), label="v")})
        apply(state, seq, MarkerAdded(bot=B, session_id=S, marker=marker))
    for mid in data.draw(st.lists(st.sampled_from(sorted(state.seen_markers) or ["none"]), max_size=6),
                         label="blocked markers"):
        state.blocked.setdefault(mid, set()).update(
            data.draw(st.sets(st.sampled_from(names), min_size=1), label="blocked for"))
    for i, name in enumerate(data.draw(st.lists(st.sampled_from(names), max_size=4), label="in flight")):
        state.in_flight[f"f{i}"] = Firing(f"f{i}", name, [], "claimed", 0)
    guard = data.draw(arbitrary_guards(), label="guard")
    cap = data.draw(st.sampled_from([1, 2, 3, 5, 8, core.GUARD_REFUSALS]), label="refusal cap")

    got_calls: list = []
    want_calls: list = []
    with mock.patch.object(core, "GUARD_REFUSALS", cap):
        got = choose_firings(net, state, recorded(guard, got_calls))
        want = plan_by_brute_force(net, state, recorded(guard, want_calls))
    assert got == want
    assert got_calls == want_calls, "the guard was asked about other sets, or in another order"


@PROPERTY
@given(st.data())
def test_choose_firings_takes_oldest_markers_first_without_a_guard(data):
    run = simulate(data)
    if run.guard is not None:
        return
    for p in run.plans:
        taken: set[str] = set()
        for t in run.net.transitions:  # declaration order
            mine = [f.consumed for f in p.plan if f.transition == t.name]
            for loc, _ in t.inputs:
                eligible = [mid for mid in p.state.places.get(loc, {})
                            if mid not in taken and t.name not in p.state.blocked.get(mid, ())]
                used = [m for consumed in mine for m in consumed if m in p.state.places.get(loc, {})]
                assert used == eligible[: len(used)], f"{t.name} skipped an older marker of {loc}"
            taken.update(m for consumed in mine for m in consumed)


# --- replay --------------------------------------------------------------------------------------


@PROPERTY
@given(st.data())
def test_folding_is_deterministic(data):
    run = simulate(data)
    live = snapshot(run.state)
    assert snapshot(fold(run.log)) == live
    assert snapshot(fold(run.log)) == snapshot(fold(run.log))

    cuts = sorted(data.draw(st.lists(st.integers(0, len(run.log)), max_size=5), label="cuts"))
    chunked = SessionState()
    for a, b in zip([0, *cuts], [*cuts, len(run.log)]):
        fold(run.log[a:b], chunked)
    assert snapshot(chunked) == live

    k = data.draw(st.integers(0, len(run.log)), label="prefix")
    j = data.draw(st.integers(0, k), label="replayed from")
    twice = fold(run.log[:k])
    fold(run.log[j:k], twice)  # a prefix delivered again
    fold(run.log[j:], twice)
    assert snapshot(twice) == live


@PROPERTY
@given(st.data())
def test_replay_equals_live_at_every_sequence(data):
    run = simulate(data)
    for step in run.steps:
        assert View.of(fold(run.log[: step.seq])) == step.after


@PROPERTY
@given(st.data())
def test_replaying_the_encoded_log_equals_live(data):
    run = simulate(data)
    wire = [(seq, decode(encode(e))) for seq, e in run.log]
    assert snapshot(fold(wire)) == snapshot(run.state)
