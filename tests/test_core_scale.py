"""The pure core at production scale: joins and fan-outs of ten thousand markers, guards over thousands.

The choice and the fold must neither recurse per marker (a join of 1,000 markers once crashed the
scheduler with RecursionError) nor go quadratic in the markers of one place. Each test runs the core
with little stack to spare, so recursion per marker fails loudly; none of them times anything (the
numbers belong in a benchmark).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from petribus.core import (
    GUARD_REFUSALS,
    PlannedFiring,
    SessionState,
    choose_firings,
    fold,
)
from petribus.events import Marker, TransitionStarted

from .test_core import B, Log, S, ids, shape, t
from .test_core_properties import plan_by_brute_force, recorded


@contextmanager
def shallow_stack(frames: int = 100) -> Iterator[None]:
    """Let the code under test use ``frames`` more stack frames than the caller holds, no more."""
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + frames)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def filled(location: str, n: int) -> tuple[Log, list[str]]:
    """A log holding ``n`` markers at ``location``, oldest first, each with data ``{"n": i}``."""
    log = Log()
    return log, [log.add(location, f"{location}{i:06d}", n=i) for i in range(n)]


def consumed(plan: list[PlannedFiring]) -> list[tuple[str, ...]]:
    return [p.consumed for p in plan]


# --- joins -----------------------------------------------------------------------------------------


def test_a_join_of_ten_thousand_fires_once_with_every_marker_in_fifo_order():
    log, done = filled("Done", 10_000)
    net = shape(t("join", ("Done", 10_000)))
    with shallow_stack():
        plan = choose_firings(net, log.state)
        guarded = choose_firings(net, log.state, guard=lambda name, picked: True)
    assert plan == [PlannedFiring("join", tuple(done))]
    assert guarded == plan


def test_a_join_of_ten_thousand_waits_for_its_last_marker():
    log, _ = filled("Done", 9_999)
    net = shape(t("join", ("Done", 10_000)))
    with shallow_stack():
        assert choose_firings(net, log.state) == []
        assert choose_firings(net, log.state, guard=lambda name, picked: True) == []


def test_a_join_of_ten_thousand_over_twenty_five_thousand_fires_twice_oldest_first():
    log, done = filled("Done", 25_000)
    net = shape(t("join", ("Done", 10_000)))
    with shallow_stack():
        plan = choose_firings(net, log.state)
        assert choose_firings(net, log.state, guard=lambda name, picked: True) == plan
        log.fire_plan(plan)
    assert consumed(plan) == [tuple(done[:10_000]), tuple(done[10_000:20_000])]
    assert ids(log.state, "Done") == done[20_000:]


def test_a_guard_refusing_the_youngest_marker_of_a_big_join_gets_the_next_set():
    log, done = filled("Done", 10_001)
    net = shape(t("join", ("Done", 10_000)))
    asked: list = []

    def not_the_last_but_one(name: str, picked: dict[str, list[Marker]]) -> bool:
        return picked["Done"][-1].id != done[9_999]

    with shallow_stack():
        plan = choose_firings(net, log.state, guard=recorded(not_the_last_but_one, asked))
    # The next set in lexicographic order keeps the 9,999 oldest and swaps the youngest for the one after.
    assert consumed(plan) == [(*done[:9_999], done[10_000])]
    assert len(asked) == 2


# --- fan-out ---------------------------------------------------------------------------------------


def test_a_fan_out_of_ten_thousand_fires_each_marker_once_in_fifo_order():
    log, items = filled("Item", 10_000)
    net = shape(t("work", ("Item", 1)))
    with shallow_stack():
        plan = choose_firings(net, log.state)
        assert choose_firings(net, log.state, guard=lambda name, picked: True) == plan
    assert consumed(plan) == [(i,) for i in items]


def test_a_fan_out_of_ten_thousand_is_bounded_by_concurrency_counting_firings_in_flight():
    log, items = filled("Item", 10_000)
    net = shape(t("work", ("Item", 1), concurrency=7))
    for item in items[:3]:
        log.fire("work", item)
    log.append(TransitionStarted(bot=B, session_id=S, firing_id=next(iter(log.state.in_flight)),
                                 transition="work", executor="x"))
    with shallow_stack():
        plan = choose_firings(net, log.state)
    assert consumed(plan) == [(i,) for i in items[3:7]]


# --- joins over several inputs ---------------------------------------------------------------------


def test_a_join_over_two_inputs_at_scale_skips_blocked_and_taken_markers():
    log = Log()
    a_ids, b_ids = [], []
    for i in range(5_000):  # the two places fill in turns, so their markers' ages interleave
        if i < 4_000:
            a_ids.append(log.add("A", f"a{i:05d}", n=i))
        b_ids.append(log.add("B", f"b{i:05d}", n=i))
    state = log.state
    for i, a in enumerate(a_ids):
        if i % 5 == 0:
            state.blocked.setdefault(a, set()).add("join")  # it failed in join before
        if i % 3 == 0:
            state.blocked.setdefault(a, set()).add("other")  # no business of join's
    for i, b in enumerate(b_ids):
        if i % 7 == 0:
            state.blocked.setdefault(b, set()).add("join")
    # ``first`` is declared earlier: it takes the 100 oldest B markers before join is considered.
    net = shape(t("first", ("B", 1), concurrency=100), t("join", ("A", 2), ("B", 3)))

    with shallow_stack():
        plan = choose_firings(net, state)
        assert choose_firings(net, state, guard=lambda name, picked: True) == plan

    a_ok = [a for i, a in enumerate(a_ids) if i % 5]
    b_ok = [b for i, b in enumerate(b_ids) if i >= 100 and i % 7]
    n = min(len(a_ok) // 2, len(b_ok) // 3)
    assert n == 1_400  # B runs out first
    assert consumed(plan) == [(b,) for b in b_ids[:100]] + [
        (*a_ok[2 * j: 2 * j + 2], *b_ok[3 * j: 3 * j + 3]) for j in range(n)]


# --- guards ----------------------------------------------------------------------------------------


def even(name: str, picked: dict[str, list[Marker]]) -> bool:
    """Refuses every set holding a marker whose ``n`` is odd."""
    return all(m.data["n"] % 2 == 0 for ms in picked.values() for m in ms)


def choose_and_compare(net, state: SessionState, guard) -> list[PlannedFiring]:
    """``choose_firings`` with ``guard``, checked against the brute-force reference, guard calls included."""
    asked: list = []
    expected: list = []
    with shallow_stack():
        plan = choose_firings(net, state, guard=recorded(guard, asked))
    assert plan == plan_by_brute_force(net, state, recorded(guard, expected))
    assert asked == expected
    return plan


def test_a_guard_over_thousands_of_single_markers_stops_at_its_refusal_cap():
    log, items = filled("Item", 2_500)
    plan = choose_and_compare(shape(t("work", ("Item", 1))), log.state, even)
    # Odd and even alternate: the 1,000th refusal (item 1,999) ends the search for this choice.
    assert consumed(plan) == [(i,) for i in items[:2 * GUARD_REFUSALS:2]]


def test_a_guard_over_thousands_of_single_markers_refusing_a_few_lets_every_other_one_fire():
    log = Log()
    items = [log.add("Item", f"i{i:05d}", n=i if i % 10 == 9 else 2 * i) for i in range(2_000)]
    plan = choose_and_compare(shape(t("work", ("Item", 1))), log.state, even)
    assert consumed(plan) == [(item,) for i, item in enumerate(items) if i % 10 != 9]


def test_a_guard_over_a_join_of_three_spends_its_refusals_on_sets_holding_one_odd_marker():
    log, _ = filled("Item", 3_000)
    asked: list = []
    with shallow_stack():
        plan = choose_firings(shape(t("triple", ("Item", 3))), log.state, guard=recorded(even, asked))
    # (0, 1, 2), (0, 1, 3), ...: in lexicographic order every early set holds the odd marker 1.
    assert plan == [] and len(asked) == GUARD_REFUSALS
    assert all("Item000001" in picked["Item"] for _, picked in asked)
    choose_and_compare(shape(t("triple", ("Item", 3))), log.state, even)


def test_a_guard_over_a_join_of_three_fires_the_even_markers_in_threes_before_the_odd_ones():
    log = Log()
    evens = [log.add("Item", f"e{i:05d}", n=2 * i) for i in range(3_001)]
    for i in range(40):
        log.add("Item", f"o{i:05d}", n=2 * i + 1)
    plan = choose_and_compare(shape(t("triple", ("Item", 3))), log.state, even)
    # The last even marker never finds two even partners; the sets it is offered hold odd ones.
    assert consumed(plan) == [tuple(evens[j:j + 3]) for j in range(0, 3_000, 3)]


def test_a_guard_matching_data_across_a_join_of_three_at_scale_matches_the_reference():
    log = Log()
    rng = random.Random(7)
    for i in range(2_000):
        log.add("Item", f"i{i:05d}", n=rng.randrange(1_000))

    def even_sum(name: str, picked: dict[str, list[Marker]]) -> bool:
        return sum(m.data["n"] for m in picked["Item"]) % 2 == 0

    plan = choose_and_compare(shape(t("triple", ("Item", 3))), log.state, even_sum)
    assert len(plan) > 600  # most markers find partners within the refusal cap


# --- the fold --------------------------------------------------------------------------------------


def test_folding_ten_thousand_markers_into_one_join_and_its_completion():
    log, done = filled("Done", 10_000)
    with shallow_stack():
        f = log.fire("join", *done)
        assert log.state.marking() == {}
        assert [p.marker.id for p in log.state.in_flight[f].consumed] == done
        log.complete(f, "join", Marker(id="all-done", location="Report", data={"count": 10_000}))
        replayed = fold(log.entries)
    for state in (log.state, replayed):
        assert state.marking() == {"Report": [Marker(id="all-done", location="Report", data={"count": 10_000})]}
        assert state.in_flight == {} and state.finished == {f}
    assert replayed == log.state


def test_ten_thousand_firings_failing_for_good_give_every_marker_back_in_fifo_order():
    log, items = filled("Item", 10_000)
    net = shape(t("work", ("Item", 1)))
    with shallow_stack():
        fired = log.fire_plan(choose_firings(net, log.state))
        assert log.state.marking() == {} and len(log.state.in_flight) == 10_000
        # Many executors fail them about in the order they were fired, each batch in any order.
        for start in range(0, len(fired), 8):
            for f in reversed(fired[start:start + 8]):
                log.fail(f, "work", final=True)
        replayed = fold(log.entries)
        assert choose_firings(net, log.state) == []  # work is not offered them again
        others = choose_firings(shape(t("other", ("Item", 1))), log.state)
    for state in (log.state, replayed):
        assert ids(state, "Item") == items
        assert state.in_flight == {} and len(state.finished) == 10_000
        assert all(state.blocked[i] == {"work"} for i in items)
    assert consumed(others) == [(i,) for i in items]


def test_markers_given_back_in_any_order_sit_in_fifo_order_among_the_waiting_ones():
    log, items = filled("Item", 2_000)
    net = shape(t("work", ("Item", 1), concurrency=500))
    fired = log.fire_plan(choose_firings(net, log.state))  # 500 out, 1,500 still waiting
    rng = random.Random(3)
    rng.shuffle(fired)
    with shallow_stack():
        for f in fired:
            log.fail(f, "work", final=True)
        replayed = fold(log.entries)
    assert ids(log.state, "Item") == items
    assert ids(replayed, "Item") == items
