"""The pure net core: folding a session's log into its state, and choosing what fires."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from petribus.core import (
    GUARD_REFUSALS,
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
    AgentMessage,
    ConfirmRequest,
    ConfirmResponse,
    Marker,
    MarkerAdded,
    MemoryUpdated,
    RejectTransition,
    SessionCreated,
    TransitionCompleted,
    TransitionFailed,
    TransitionFired,
    TransitionStarted,
    UserMessage,
    _Event,
    decode,
)
from petribus.loader import load_net

B, S = "bot", "s1"


class Log:
    """A session log being written, folded live as it grows (as the scheduler does)."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, _Event]] = []
        self.state = SessionState()

    def append(self, event: _Event) -> int:
        seq = len(self.entries) + 1
        self.entries.append((seq, event))
        apply(self.state, seq, event)
        return seq

    def add(self, location: str, marker_id: str | None = None, **data: object) -> str:
        marker = Marker(location=location, data=data, **({"id": marker_id} if marker_id else {}))
        self.append(MarkerAdded(bot=B, session_id=S, marker=marker))
        return marker.id

    def fire(self, transition: str, *consumed: str, firing_id: str | None = None, confirm: bool = False) -> str:
        firing_id = firing_id or f"f{len(self.entries) + 1}"
        self.append(TransitionFired(bot=B, session_id=S, firing_id=firing_id, transition=transition,
                                    consumed=list(consumed), confirm=confirm))
        return firing_id

    def complete(self, firing_id: str, transition: str, *outputs: Marker) -> None:
        self.append(TransitionCompleted(bot=B, session_id=S, firing_id=firing_id, transition=transition,
                                        outputs=list(outputs)))

    def fail(self, firing_id: str, transition: str, final: bool = True, attempt: int = 1,
             error_type: str = "Exception") -> None:
        self.append(TransitionFailed(bot=B, session_id=S, firing_id=firing_id, transition=transition,
                                     error="boom", final=final, attempt=attempt, error_type=error_type))

    def fire_plan(self, plan: list[PlannedFiring], confirm: bool = False) -> list[str]:
        return [self.fire(p.transition, *p.consumed, confirm=confirm) for p in plan]


def ids(state: SessionState, location: str) -> list[str]:
    return [m.id for m in state.marking().get(location, [])]


def shape(*transitions: TransitionShape) -> NetShape:
    return NetShape(tuple(transitions))


def t(name: str, *inputs: tuple[str, int], concurrency: int | None = None,
      confirm: bool = False) -> TransitionShape:
    return TransitionShape(name, tuple(inputs), concurrency, confirm)


# --- folding -------------------------------------------------------------------------------------


def test_fold_of_a_simple_log_gives_the_marking():
    log = Log()
    log.append(SessionCreated(bot=B, session_id=S))
    a = log.add("Order", id=1)
    b = log.add("Order", id=2)
    c = log.add("Customer", name="ada")
    f = log.fire("cancel", a)
    log.complete(f, "cancel", Marker(id="out", location="Status", data={"message": "cancelled"}))

    state = fold(log.entries)
    assert state.created and (state.bot, state.session_id) == (B, S)
    assert state.counts() == {"Order": 1, "Customer": 1, "Status": 1}
    assert ids(state, "Order") == [b] and ids(state, "Customer") == [c] and ids(state, "Status") == ["out"]
    assert state.marking()["Status"][0].data == {"message": "cancelled"}
    assert state.in_flight == {} and state.finished == {f}
    assert state.last_seq == len(log.entries)


def test_fold_keeps_chat_memory_and_pending_requests():
    log = Log()
    log.append(UserMessage(bot=B, session_id=S, text="hi"))
    log.append(AgentMessage(bot=B, session_id=S, text="hello", firing_id="f9"))
    log.append(MemoryUpdated(bot=B, session_id=S, memory={"likes": "tea"}))
    log.append(ConfirmRequest(bot=B, session_id=S, request_id="q1", description="ok?"))
    log.append(ConfirmRequest(bot=B, session_id=S, request_id="q2", description="sure?"))
    log.append(ConfirmResponse(bot=B, session_id=S, request_id="q1", accepted=True))

    state = fold(log.entries)
    assert [(turn.role, turn.text, turn.firing_id) for turn in state.chat] == [
        ("user", "hi", None), ("agent", "hello", "f9")]
    assert state.memory == [{"likes": "tea"}]
    assert set(state.pending_requests) == {"q2"}


def test_marker_added_twice_is_there_once():
    log = Log()
    log.add("Order", marker_id="m1", id=1)
    log.add("Order", marker_id="m1", id=1)
    assert ids(log.state, "Order") == ["m1"]


def test_markers_sit_in_fifo_order():
    log = Log()
    added = [log.add("Order", id=i) for i in range(5)]
    assert ids(log.state, "Order") == added


def test_replaying_a_prefix_changes_nothing():
    log = Log()
    a = log.add("Order", id=1)
    log.add("Order", id=2)
    f = log.fire("cancel", a)
    log.complete(f, "cancel", Marker(id="out", location="Status", data={}))
    before = fold(log.entries)

    again = fold(log.entries[:3], fold(log.entries))  # seq <= last_seq: already folded
    assert again == before
    assert again.events == len(log.entries)


def test_folding_in_chunks_equals_folding_in_one_pass():
    log = Log()
    a, b = log.add("Order", id=1), log.add("Order", id=2)
    f = log.fire("cancel", a)
    log.fail(f, "cancel")
    g = log.fire("cancel", b)
    log.complete(g, "cancel")
    state = SessionState()
    for i in range(0, len(log.entries), 2):
        fold(log.entries[i:i + 2], state)
    assert state == fold(log.entries)


# --- firing choice -------------------------------------------------------------------------------


def test_every_enabled_transition_fires_as_often_as_the_marking_allows():
    log = Log()
    orders = [log.add("Order", id=i) for i in range(3)]
    pairs = [log.add("Pair", id=i) for i in range(5)]
    net = shape(t("cancel", ("Order", 1)), t("match", ("Pair", 2)))

    plan = choose_firings(net, log.state)

    assert plan == [PlannedFiring("cancel", (o,)) for o in orders] + [
        PlannedFiring("match", (pairs[0], pairs[1])), PlannedFiring("match", (pairs[2], pairs[3]))]


def test_earlier_declared_transition_gets_the_oldest_markers_first():
    log = Log()
    orders = [log.add("Order", id=i) for i in range(3)]
    net = shape(t("first", ("Order", 2)), t("second", ("Order", 1)))
    assert choose_firings(net, log.state) == [
        PlannedFiring("first", (orders[0], orders[1])), PlannedFiring("second", (orders[2],))]


def test_planned_markers_are_listed_in_input_order():
    log = Log()
    right = log.add("Right", v=1)
    left = log.add("Left", v=2)
    net = shape(t("join", ("Left", 1), ("Right", 1)))
    assert choose_firings(net, log.state) == [PlannedFiring("join", (left, right))]


def test_two_input_transition_waits_for_both():
    log = Log()
    net = shape(t("join", ("Left", 1), ("Right", 1)))
    left = log.add("Left", v=1)
    log.add("Left", v=2)
    assert choose_firings(net, log.state) == []
    right = log.add("Right", v=3)
    assert choose_firings(net, log.state) == [PlannedFiring("join", (left, right))]


def test_concurrency_bound_counts_firings_in_flight():
    log = Log()
    net = shape(t("work", ("Item", 1), concurrency=2))
    items = [log.add("Item", n=i) for i in range(5)]

    first = choose_firings(net, log.state)
    assert [p.consumed for p in first] == [(items[0],), (items[1],)]
    fired = log.fire_plan(first)
    assert choose_firings(net, log.state) == []  # two in flight: no room

    log.append(TransitionStarted(bot=B, session_id=S, firing_id=fired[0], transition="work", executor="x"))
    assert choose_firings(net, log.state) == []  # started still counts

    log.complete(fired[0], "work")
    assert [p.consumed for p in choose_firings(net, log.state)] == [(items[2],)]


def test_confirmation_firings_count_against_concurrency():
    log = Log()
    net = shape(t("ask", ("Item", 1), concurrency=1, confirm=True))
    log.add("Item", n=1)
    log.add("Item", n=2)
    log.fire_plan(choose_firings(net, log.state), confirm=True)
    assert choose_firings(net, log.state) == []


def test_nothing_fires_from_an_empty_marking():
    assert choose_firings(shape(t("work", ("Item", 1))), SessionState()) == []


# --- consumption happens at most once ------------------------------------------------------------


def test_firing_naming_an_already_consumed_marker_is_ignored():
    log = Log()
    a, b = log.add("Order", id=1), log.add("Order", id=2)
    log.fire("cancel", a, firing_id="f1")
    log.fire("other", a, b, firing_id="f2")  # a belongs to f1 already

    assert set(log.state.in_flight) == {"f1"}
    assert ids(log.state, "Order") == [b]  # b was not consumed by the void firing


def test_firing_naming_an_unknown_marker_is_ignored():
    log = Log()
    a = log.add("Order", id=1)
    log.fire("cancel", a, "ghost", firing_id="f1")
    assert log.state.in_flight == {} and ids(log.state, "Order") == [a]


def test_firing_naming_a_marker_twice_is_ignored():
    log = Log()
    a = log.add("Order", id=1)
    log.fire("cancel", a, a, firing_id="f1")
    assert log.state.in_flight == {} and ids(log.state, "Order") == [a]


def test_same_firing_id_fired_twice_claims_once():
    log = Log()
    a, b = log.add("Order", id=1), log.add("Order", id=2)
    log.fire("cancel", a, firing_id="f1")
    log.fire("cancel", b, firing_id="f1")
    assert [p.marker.id for p in log.state.in_flight["f1"].consumed] == [a]
    assert ids(log.state, "Order") == [b]


def test_completion_twice_applies_outputs_once():
    log = Log()
    a = log.add("Order", id=1)
    f = log.fire("cancel", a)
    log.complete(f, "cancel", Marker(id="o1", location="Status", data={"n": 1}))
    log.complete(f, "cancel", Marker(id="o2", location="Status", data={"n": 2}))
    assert ids(log.state, "Status") == ["o1"]


def test_completion_of_an_unknown_firing_is_ignored():
    log = Log()
    log.complete("nobody", "cancel", Marker(location="Status", data={}))
    assert log.state.marking() == {}


def test_failure_after_completion_returns_nothing():
    log = Log()
    a = log.add("Order", id=1)
    f = log.fire("cancel", a)
    log.complete(f, "cancel")
    log.fail(f, "cancel")
    assert log.state.marking() == {}


# --- failure -------------------------------------------------------------------------------------


def test_final_failure_returns_markers_in_fifo_order():
    log = Log()
    a, b, c = (log.add("Order", id=i) for i in range(3))
    f = log.fire("cancel", a, c)
    assert ids(log.state, "Order") == [b]
    log.fail(f, "cancel", final=True)
    assert ids(log.state, "Order") == [a, b, c]
    assert log.state.in_flight == {}


def test_failed_markers_are_not_offered_to_that_transition_again_but_are_to_others():
    log = Log()
    a = log.add("Order", id=1)
    f = log.fire("cancel", a)
    log.fail(f, "cancel", final=True)
    b = log.add("Order", id=2)

    assert choose_firings(shape(t("cancel", ("Order", 1))), log.state) == [PlannedFiring("cancel", (b,))]
    assert choose_firings(shape(t("refund", ("Order", 1))), log.state) == [
        PlannedFiring("refund", (a,)), PlannedFiring("refund", (b,))]


def test_a_firing_whose_runs_kept_dying_gives_its_markers_back_still_on_offer_to_it():
    log = Log()
    a = log.add("Order", id=1)
    f = log.fire("cancel", a)
    log.append(TransitionStarted(bot=B, session_id=S, firing_id=f, transition="cancel", executor="x", attempt=1))
    log.append(TransitionStarted(bot=B, session_id=S, firing_id=f, transition="cancel", executor="y", attempt=2))
    assert log.state.in_flight[f].started_attempts == {1, 2}
    log.fail(f, "cancel", final=True, attempt=2, error_type="DeliveriesExhausted")

    # Not the transition's own failure (executors died, the bus was down): offered to it again.
    assert ids(log.state, "Order") == [a] and not log.state.blocked
    assert choose_firings(shape(t("cancel", ("Order", 1))), log.state) == [PlannedFiring("cancel", (a,))]


def test_non_final_failure_keeps_the_firing_in_flight():
    log = Log()
    a = log.add("Order", id=1)
    f = log.fire("cancel", a)
    log.fail(f, "cancel", final=False, attempt=2)
    assert log.state.in_flight[f].attempts == 2
    assert log.state.marking() == {}
    log.complete(f, "cancel", Marker(id="out", location="Status", data={}))  # the retry succeeded
    assert ids(log.state, "Status") == ["out"]


def test_a_failed_firing_id_cannot_claim_markers_again():
    log = Log()
    a = log.add("Order", id=1)
    log.fire("cancel", a, firing_id="f1")
    log.fail("f1", "cancel", final=True)
    log.fire("cancel", a, firing_id="f1")  # a replayed claim of the ended firing
    log.complete("f1", "cancel", Marker(id="late", location="Status", data={}))

    assert ids(log.state, "Order") == [a]
    assert log.state.in_flight == {} and "Status" not in log.state.marking()


def test_started_records_attempts():
    log = Log()
    f = log.fire("cancel", log.add("Order", id=1))
    log.append(TransitionStarted(bot=B, session_id=S, firing_id=f, transition="cancel", executor="x", attempt=3))
    assert (log.state.in_flight[f].status, log.state.in_flight[f].attempts) == ("started", 3)


# --- confirmation --------------------------------------------------------------------------------


def test_confirm_firing_waits_for_accept():
    log = Log()
    a = log.add("Order", id=1)
    f = log.fire("cancel", a, confirm=True)
    assert log.state.in_flight[f].status == "awaiting_confirmation"

    log.complete(f, "cancel", Marker(id="early", location="Status", data={}))  # can't precede acceptance
    log.append(TransitionStarted(bot=B, session_id=S, firing_id=f, transition="cancel", executor="x"))
    assert log.state.in_flight[f].status == "awaiting_confirmation"
    assert "Status" not in log.state.marking()

    log.append(AcceptTransition(bot=B, session_id=S, firing_id=f))
    assert log.state.in_flight[f].status == "claimed"
    log.complete(f, "cancel", Marker(id="out", location="Status", data={}))
    assert ids(log.state, "Status") == ["out"]


def test_ignored_completion_leaves_in_flight_order_alone():
    log = Log()
    f1 = log.fire("ask", log.add("Order", id=1), confirm=True)
    f2 = log.fire("ask", log.add("Order", id=2), confirm=True)
    log.complete(f1, "ask")
    assert list(log.state.in_flight) == [f1, f2]


def test_rejected_confirmation_returns_markers():
    log = Log()
    a, b = log.add("Order", id=1), log.add("Order", id=2)
    f = log.fire("cancel", a, confirm=True)
    log.append(RejectTransition(bot=B, session_id=S, firing_id=f))
    assert ids(log.state, "Order") == [a, b]
    assert log.state.in_flight == {}
    # and the rejected transition is not offered them again
    assert choose_firings(shape(t("cancel", ("Order", 1))), log.state) == [PlannedFiring("cancel", (b,))]


def test_accept_after_reject_changes_nothing():
    log = Log()
    a = log.add("Order", id=1)
    f = log.fire("cancel", a, confirm=True)
    log.append(RejectTransition(bot=B, session_id=S, firing_id=f))
    log.append(AcceptTransition(bot=B, session_id=S, firing_id=f))
    log.complete(f, "cancel", Marker(location="Status", data={}))
    assert log.state.marking() == {"Order": [log.state.places["Order"][a].marker]}


def test_reject_of_an_accepted_firing_changes_nothing():
    log = Log()
    f = log.fire("cancel", log.add("Order", id=1), confirm=True)
    log.append(AcceptTransition(bot=B, session_id=S, firing_id=f))
    log.append(RejectTransition(bot=B, session_id=S, firing_id=f))
    assert log.state.in_flight[f].status == "claimed" and log.state.marking() == {}


# --- guards --------------------------------------------------------------------------------------


def big_orders(transition: str, picked: dict[str, list[Marker]]) -> bool:
    return all(m.data["amount"] > 100 for m in picked["Order"])


def test_guard_decides_which_markers_fire():
    log = Log()
    small = log.add("Order", amount=5)
    big = log.add("Order", amount=500)
    plan = choose_firings(shape(t("refund", ("Order", 1))), log.state, guard=big_orders)
    assert plan == [PlannedFiring("refund", (big,))]
    assert small in ids(log.state, "Order")


def test_guard_refusing_the_oldest_marker_does_not_hold_back_younger_ones():
    log = Log()
    for _ in range(3):
        log.add("Order", amount=1)
    bigs = [log.add("Order", amount=1000 + i) for i in range(3)]
    plan = choose_firings(shape(t("refund", ("Order", 1))), log.state, guard=big_orders)
    assert [p.consumed for p in plan] == [(b,) for b in bigs]


def test_guard_finds_matching_pairs_across_inputs():
    log = Log()
    lefts = [log.add("Left", v=v) for v in (1, 2, 3)]
    rights = [log.add("Right", v=v) for v in (3, 1, 2)]

    def same(transition: str, picked: dict[str, list[Marker]]) -> bool:
        return picked["Left"][0].data["v"] == picked["Right"][0].data["v"]

    plan = choose_firings(shape(t("join", ("Left", 1), ("Right", 1))), log.state, guard=same)
    assert plan == [PlannedFiring("join", (lefts[0], rights[1])), PlannedFiring("join", (lefts[1], rights[2])),
                    PlannedFiring("join", (lefts[2], rights[0]))]


def test_guard_is_told_the_transition_and_its_candidates():
    log = Log()
    a = log.add("Order", amount=1)
    seen: list[tuple[str, dict[str, list[str]]]] = []

    def record(transition: str, picked: dict[str, list[Marker]]) -> bool:
        seen.append((transition, {loc: [m.id for m in ms] for loc, ms in picked.items()}))
        return False

    assert choose_firings(shape(t("refund", ("Order", 1))), log.state, guard=record) == []
    assert seen == [("refund", {"Order": [a]})]


def test_guard_refusals_are_bounded_per_transition():
    log = Log()
    for i in range(GUARD_REFUSALS + 5):
        log.add("Order", amount=i)
    calls = 0

    def refuse(transition: str, picked: dict[str, list[Marker]]) -> bool:
        nonlocal calls
        calls += 1
        return False

    assert choose_firings(shape(t("refund", ("Order", 1))), log.state, guard=refuse) == []
    assert calls == GUARD_REFUSALS


def test_guard_refusal_leaves_markers_to_later_transitions():
    log = Log()
    a = log.add("Order", amount=1)
    net = shape(t("refund", ("Order", 1)), t("cancel", ("Order", 1)))

    def only_cancel(transition: str, picked: dict[str, list[Marker]]) -> bool:
        return transition == "cancel"

    assert choose_firings(net, log.state, guard=only_cancel) == [PlannedFiring("cancel", (a,))]


# --- golden logs ---------------------------------------------------------------------------------
#
# tests/fixtures/*.jsonl hold session logs, one event a line, as
#     {"seq": <stream sequence, from 1>, "event": <the event exactly as the bus carries it>}
# ``order_bot_complete.jsonl`` is a whole session of examples/order_bot.py (two orders, a retried
# run, a redelivered completion, a refund still running at the end) and must replay to the marking
# below. Every ``rejected_*.jsonl`` must fail strict decoding, naming its line and the problem.

FIXTURES = Path(__file__).parent / "fixtures"
ORDER_BOT = Path(__file__).resolve().parent.parent / "examples" / "order_bot.py"


def read_log(path: Path) -> list[tuple[int, _Event]]:
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            entry = json.loads(line)
            if set(entry) != {"seq", "event"}:
                raise ValueError(f"expected keys seq and event, got {sorted(entry)}")
            entries.append((entry["seq"], decode(json.dumps(entry["event"]))))
        except (ValueError, ValidationError) as exc:
            raise ValueError(f"{path.name}:{lineno}: {exc}") from exc
    return entries


def test_golden_order_bot_log_replays_to_its_marking():
    log = read_log(FIXTURES / "order_bot_complete.jsonl")
    assert [seq for seq, _ in log] == list(range(1, len(log) + 1))

    state = fold(log)

    assert {loc: [(m.id, m.data) for m in ms] for loc, ms in state.marking().items()} == {
        "RefundStatus": [("m-refund-alice", {"message": "refund_offered"})],
    }
    in_flight = {f.id: (f.transition, f.status, [p.marker.id for p in f.consumed]) for f in state.in_flight.values()}
    assert in_flight == {"fire-4": ("offer_refund", "started", ["m-order-bob"])}
    assert state.in_flight["fire-4"].fired_seq == 19
    assert state.finished == {"fire-1", "fire-2", "fire-3"}
    assert [turn.role for turn in state.chat] == ["user", "agent", "agent", "agent", "agent", "user", "agent"]
    assert state.memory == [{"refunded": ["alice"]}]
    assert (state.bot, state.session_id, state.last_seq, state.created) == ("order_bot", "sess-golden", 25, True)


def test_golden_order_bot_log_fires_what_the_scheduler_would_choose():
    net = load_net(f"{ORDER_BOT}:bot")
    log = read_log(FIXTURES / "order_bot_complete.jsonl")
    for i, (seq, event) in enumerate(log):
        if isinstance(event, MarkerAdded):
            net.validate_marker(event.marker.location, event.marker.data)
        if isinstance(event, TransitionCompleted):
            for m in event.outputs:
                assert m.location in net.transition(event.transition).outputs
                net.validate_marker(m.location, m.data)
        if isinstance(event, TransitionFired):
            chosen = choose_firings(net.shape(), fold(log[:i]))
            assert PlannedFiring(event.transition, tuple(event.consumed)) in chosen, f"seq {seq}"
    assert choose_firings(net.shape(), fold(log)) == []  # nothing left to fire


def test_golden_log_replays_the_same_in_one_pass_and_line_by_line():
    log = read_log(FIXTURES / "order_bot_complete.jsonl")
    state = SessionState()
    for entry in log:
        fold([entry], state)
        fold(log[: entry[0]], state)  # the prefix again: a redelivery changes nothing
    assert state == fold(log) and state.marking() == fold(log).marking()


REJECTED = {
    "rejected_unknown_type.jsonl": (4, "marker_teleported"),
    "rejected_extra_field.jsonl": (6, "priority"),
    "rejected_extra_marker_field.jsonl": (12, "colour"),
}


def test_every_rejected_log_has_an_expectation():
    assert {p.name for p in FIXTURES.glob("rejected_*.jsonl")} == set(REJECTED)


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejected_log_fails_strict_decoding_naming_line_and_problem(name):
    lineno, culprit = REJECTED[name]
    with pytest.raises(ValueError) as info:
        read_log(FIXTURES / name)
    message = str(info.value)
    assert message.startswith(f"{name}:{lineno}: ")
    assert culprit in message
    assert isinstance(info.value.__cause__, ValidationError)
