"""The replay check (``petribus replay``): recorded sessions replay with their own app with 0 differences,
and a changed app is caught at the event where it would decide differently.

The golden sessions in ``tests/golden`` were recorded by ``tests/golden/record.py`` on the real stack;
the small logs below are made by hand to pin one rule each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from petribus import Bot, BotLocation
from petribus.events import (
    Marker,
    MarkerAdded,
    SessionCreated,
    TransitionCompleted,
    TransitionFired,
    UserMessage,
    _Event,
    new_id,
)
from petribus.export import load
from petribus.loader import load_net
from petribus.net import Net
from petribus.replay import Difference, replay
from petribus_cli.main import app as cli_app

from .conftest import APPS

GOLDEN = Path(__file__).parent / "golden"
ORDER_BOT = Path(__file__).resolve().parent.parent / "examples" / "order_bot.py"
CHANGED = f"{APPS / 'replay_shop_changed.py'}"

RECORDED = {  # golden session -> the app that recorded it
    "hitl": f"{APPS / 'hitl_bot.py'}:bot",
    "counter": f"{APPS / 'counter.py'}:bot",
    "guarded": f"{APPS / 'counter.py'}:guarded",
    "shop": f"{APPS / 'replay_shop.py'}:bot",
}


def golden(name: str) -> list[tuple[int, _Event]]:
    return load((GOLDEN / f"{name}.jsonl").read_bytes()).events


def seq_of(log: list[tuple[int, _Event]], pred: Any) -> int:
    return next(seq for seq, event in log if pred(event))


def kinds(differences: list[Difference]) -> list[tuple[int, str]]:
    return [(d.seq, d.kind) for d in differences]


# --- golden sessions ---------------------------------------------------------------------------------


def test_every_golden_session_has_its_app():
    assert {p.stem for p in GOLDEN.glob("*.jsonl")} == set(RECORDED)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_golden_session_replays_with_its_app_with_no_difference(name):
    log = golden(name)
    report = replay(load_net(RECORDED[name]), log)

    assert report.differences == []
    fired = sum(isinstance(e, TransitionFired) for _, e in log)
    assert report.firings == fired > 0  # every recorded firing was compared, not skipped
    assert report.events == len(log) and report.last_seq == log[-1][0]


def test_golden_sessions_hold_what_they_are_meant_to_cover():
    hitl = [e.type for _, e in golden("hitl")]
    assert {"accept_transition", "reject_transition", "confirm_response", "input_file_response",
            "output_file"} <= set(hitl)
    shop = golden("shop")
    failed = [e for _, e in shop if e.type == "transition_failed"]
    assert [f.final for f in failed] == [False, False, True]  # a retry that worked, one that did not
    box = next(e for _, e in shop if isinstance(e, TransitionFired) and e.transition == "box")
    assert len(box.consumed) == 3  # the join of the fan-out
    assert next(e for _, e in shop if isinstance(e, TransitionFired) and e.transition == "ship")


def test_hand_made_order_bot_log_replays_with_no_difference():
    from .test_core import FIXTURES, read_log

    report = replay(load_net(f"{ORDER_BOT}:bot"), read_log(FIXTURES / "order_bot_complete.jsonl"))
    assert report.ok and report.firings == 4


# --- planted divergences ----------------------------------------------------------------------------


def test_a_stricter_guard_is_reported_at_the_firing_it_would_refuse():
    log = golden("shop")
    refund_60 = next(m.marker.id for _, m in log if isinstance(m, MarkerAdded) and m.marker.data == {"amount": 60})
    fired = seq_of(log, lambda e: isinstance(e, TransitionFired) and e.consumed == [refund_60])

    report = replay(load_net(f"{CHANGED}:stricter_guard"), log)

    assert kinds(report.differences) == [(fired, "guard_false")]
    [d] = report.differences
    assert d.transition == "refund" and d.marker_ids == (refund_60,)
    assert "guard (when=) of 'refund' returns false" in d.message


def test_a_renamed_transition_is_reported_as_gone_and_its_new_name_as_an_extra_firing():
    log = golden("shop")
    box = seq_of(log, lambda e: isinstance(e, TransitionFired) and e.transition == "box")

    report = replay(load_net(f"{CHANGED}:renamed"), log)

    assert sorted(kinds(report.differences)) == [(box, "extra_firing"), (box, "unknown_transition")]
    gone = next(d for d in report.differences if d.kind == "unknown_transition")
    extra = next(d for d in report.differences if d.kind == "extra_firing")
    assert "no transition 'box'" in gone.message and "'bundle'" in gone.message
    assert extra.transition == "bundle" and set(extra.marker_ids) == set(gone.marker_ids)


def test_a_field_made_required_is_reported_at_the_marker_that_lacks_it():
    log = golden("shop")
    label = seq_of(log, lambda e: isinstance(e, MarkerAdded) and e.marker.location == "Label")

    report = replay(load_net(f"{CHANGED}:required_field"), log)

    assert kinds(report.differences) == [(label, "invalid_marker")]
    assert "weight_g: Field required" in report.differences[0].message


def test_until_stops_before_a_divergence_and_at_it():
    log = golden("shop")
    net = load_net(f"{CHANGED}:stricter_guard")
    [d] = replay(net, log).differences

    assert replay(net, log, until=d.seq - 1).ok
    assert kinds(replay(net, log, until=d.seq).differences) == [(d.seq, "guard_false")]


# --- one rule each, on hand-made logs ---------------------------------------------------------------


class Item(BaseModel):
    n: int


class Done(BaseModel):
    n: int


class Left(BaseModel):
    v: int


def net(*transitions: dict[str, Any]) -> Net:
    """A bot over Item, Done and Left with the given transitions (``name``, ``inputs``, options)."""
    bot = Bot(name="b", locations=[BotLocation(marker=m) for m in (Item, Done, Left)], description="test")
    for t in transitions:
        options = dict(t)
        name = options.pop("name")
        bot.transition(lambda inputs: None, name=name, **{"outputs": [Done], **options})
    return bot.net()


WORK = {"name": "work", "inputs": {Item: 1}}


class Log:
    """A session's log, made by hand: what the scheduler and executor would have appended."""

    def __init__(self) -> None:
        self.events: list[tuple[int, _Event]] = []
        self.add(SessionCreated(bot="b", session_id="s"))

    def add(self, event: _Event) -> int:
        self.events.append((len(self.events) + 1, event))
        return len(self.events)

    def marker(self, location: str, **data: Any) -> str:
        m = Marker(location=location, data=data)
        self.add(MarkerAdded(bot="b", session_id="s", marker=m))
        return m.id

    def fire(self, transition: str, *consumed: str, confirm: bool = False,
             planned_at: int | None = None) -> tuple[int, str]:
        firing = new_id()
        seq = self.add(TransitionFired(bot="b", session_id="s", firing_id=firing, transition=transition,
                                       consumed=list(consumed), confirm=confirm, planned_at=planned_at))
        return seq, firing

    def complete(self, firing: str, transition: str, *outputs: Marker) -> int:
        return self.add(TransitionCompleted(bot="b", session_id="s", firing_id=firing, transition=transition,
                                            outputs=list(outputs)))


def test_one_decision_claimed_in_two_runs_with_an_event_between_is_no_difference():
    log = Log()
    items = [log.marker("Item", n=n) for n in range(3)]
    log.fire("work", items[0])
    log.fire("work", items[1])
    log.add(UserMessage(bot="b", session_id="s", text="meanwhile"))  # the second batch was refused: re-planned
    log.fire("work", items[2])

    assert replay(net(WORK), log.events).differences == []


def test_one_decision_claimed_one_by_one_with_events_between_its_claims_is_no_difference():
    """The scheduler claims a few firings one after another; others' events (a marker, a start) may land
    between them. Every claim of the decision records the fold it was made on, and was made on that fold
    with the decision's earlier claims in it: each run is checked against that, not against the log just
    before it (where the new marker would be planned too) nor against the fold alone (where the earlier
    claims' markers are still free)."""
    log = Log()
    items = [log.marker("Item", n=n) for n in range(3)]
    decided = log.events[-1][0]
    log.fire("work", items[0], planned_at=decided)
    late = log.marker("Item", n=3)
    log.fire("work", items[1], planned_at=decided)
    log.add(UserMessage(bot="b", session_id="s", text="meanwhile"))
    log.fire("work", items[2], planned_at=decided)
    log.fire("work", late, planned_at=log.events[-1][0])  # the next decision, on the fold with the late one

    assert replay(net(WORK), log.events).differences == []

    # A claim of that decision on the marker that landed after its fold was not the net's to make there.
    log = Log()
    items = [log.marker("Item", n=n) for n in range(2)]
    decided = log.events[-1][0]
    log.fire("work", items[0], planned_at=decided)
    late = log.marker("Item", n=2)
    wrong, _ = log.fire("work", late, planned_at=decided)
    log.fire("work", items[1], planned_at=log.events[-1][0])
    assert [(d.seq, d.kind, d.marker_ids) for d in replay(net(WORK), log.events).differences][:1] == \
           [(wrong, "not_chosen", (late,))]


def test_a_firing_the_log_never_made_is_reported_where_the_scheduler_decided():
    log = Log()
    items = [log.marker("Item", n=n) for n in range(3)]
    first, _ = log.fire("work", items[0])
    log.fire("work", items[1])
    log.add(UserMessage(bot="b", session_id="s", text="and nothing more"))

    [d] = replay(net(WORK), log.events).differences

    assert (d.seq, d.kind, d.transition, d.marker_ids) == (first, "extra_firing", "work", (items[2],))


def test_a_new_transition_for_markers_the_log_left_is_an_extra_firing_at_the_end():
    log = Log()
    log.marker("Item", n=1)
    _, f = log.fire("work", log.events[-1][1].marker.id)  # type: ignore[attr-defined]
    log.complete(f, "work", Marker(location="Done", data={"n": 1}))
    left = log.marker("Left", v=1)
    end = log.add(UserMessage(bot="b", session_id="s", text="bye"))

    assert replay(net(WORK), log.events).ok
    [d] = replay(net(WORK, {"name": "tally", "inputs": {Left: 1}}), log.events).differences
    assert (d.seq, d.kind, d.transition, d.marker_ids) == (end, "extra_firing", "tally", (left,))
    assert "at the end of the log" in d.message
    assert replay(net(WORK, {"name": "tally", "inputs": {Left: 1}}), log.events, until=end - 1).ok


def test_inputs_no_longer_matching_are_reported():
    log = Log()
    a, b = log.marker("Item", n=1), log.marker("Item", n=2)
    seq, _ = log.fire("work", a)
    log.fire("work", b)

    differences = replay(net({"name": "work", "inputs": {Item: 2}}), log.events).differences

    assert kinds(differences) == [(seq, "inputs_changed"), (seq, "extra_firing"), (seq + 1, "inputs_changed")]
    assert "takes 2 Item, not 1 Item" in differences[0].message
    assert set(differences[1].marker_ids) == {a, b}  # the new net would have joined them


def test_a_transition_that_now_asks_first_is_reported():
    log = Log()
    seq, _ = log.fire("work", log.marker("Item", n=1))

    [d] = replay(net({**WORK, "confirm": True}), log.events).differences

    assert (d.seq, d.kind) == (seq, "confirm_changed") and "wait for the user" in d.message


def test_a_lower_concurrency_is_reported_at_the_firing_over_it():
    log = Log()
    a, b = log.marker("Item", n=1), log.marker("Item", n=2)
    log.fire("work", a)
    second, _ = log.fire("work", b)

    [d] = replay(net({**WORK, "concurrency": 1}), log.events).differences

    assert (d.seq, d.kind, d.marker_ids) == (second, "concurrency", (b,))


def test_a_transition_declared_first_takes_the_markers_instead():
    log = Log()
    seq, _ = log.fire("work", item := log.marker("Item", n=1))

    differences = replay(net({"name": "first", "inputs": {Item: 1}}, WORK), log.events).differences

    assert sorted(kinds(differences)) == [(seq, "extra_firing"), (seq, "not_chosen")]
    chosen = next(d for d in differences if d.kind == "not_chosen")
    assert "would fire 'first' on" in chosen.message and chosen.marker_ids == (item,)


def test_markers_at_unknown_locations_and_undeclared_outputs_are_reported():
    log = Log()
    stray = log.add(MarkerAdded(bot="b", session_id="s", marker=Marker(location="Gone", data={})))
    _, f = log.fire("work", log.marker("Item", n=1))
    out = log.complete(f, "work", Marker(location="Left", data={"v": 1}))

    differences = replay(net(WORK), log.events).differences

    assert kinds(differences) == [(stray, "unknown_location"), (out, "undeclared_output")]
    assert "'Gone', which the net does not have" in differences[0].message
    assert "does not declare" in differences[1].message


# --- the command ------------------------------------------------------------------------------------


def cli(*args: str):
    return CliRunner().invoke(cli_app, ["replay", *args])


def test_command_passes_an_unchanged_app_with_0_differences():
    done = cli(RECORDED["shop"], str(GOLDEN / "shop.jsonl"))
    assert done.exit_code == 0, done.output
    assert done.output.startswith("0 differences in session ")


def test_command_lists_each_difference_and_exits_1():
    log = golden("shop")
    label = seq_of(log, lambda e: isinstance(e, MarkerAdded) and e.marker.location == "Label")

    found = cli(f"{CHANGED}:required_field", str(GOLDEN / "shop.jsonl"))
    as_json = cli(f"{CHANGED}:required_field", str(GOLDEN / "shop.jsonl"), "--format", "json")

    assert found.exit_code == 1
    assert found.output.splitlines()[0].startswith(f"seq {label}  invalid_marker  marker ")
    assert "1 difference in session" in found.output
    assert as_json.exit_code == 1
    report = json.loads(as_json.output)
    assert not report["ok"] and [(d["seq"], d["kind"]) for d in report["differences"]] == [(label, "invalid_marker")]


def test_command_refuses_a_tampered_file_naming_the_line(tmp_path):
    lines = (GOLDEN / "shop.jsonl").read_bytes().split(b"\n")
    lines[4] = lines[4].replace(b'"order":1', b'"order":2', 1)
    assert b'"order":2' in lines[4]  # the tampering happened
    bad = tmp_path / "shop.jsonl"
    bad.write_bytes(b"\n".join(lines))

    refused = cli(RECORDED["shop"], str(bad))

    assert refused.exit_code == 2
    assert "line 5: the line was changed after export" in refused.output


def test_command_refuses_a_bad_app():
    refused = cli(f"{APPS / 'no_such_app.py'}:bot", str(GOLDEN / "shop.jsonl"))
    assert refused.exit_code == 2 and "no_such_app.py" in refused.output


# --- a busy session, recorded live ------------------------------------------------------------------


async def test_a_session_recorded_with_two_schedulers_racing_replays_with_no_difference(settings, nc):
    from petribus_scheduler.app import Scheduler

    from .harness import Client, Stack, session_state

    spec = RECORDED["shop"]
    async with Stack(settings, [spec], parts=("scheduler", "executor", "gateway")) as stack:
        rival = Scheduler(settings, stack.nets)
        await rival.start()
        try:
            client = await Client.connect(stack.ws_url("shop"))
            sid = (await client.recv())["value"]
            for i in range(8):  # 40 items fanned out at once, boxed by three, shipped with the labels
                await client.send({"type": "marker_added", "value": {"location": "Order", "data": {"id": i, "items": 5}}})
                await client.send({"type": "marker_added", "value": {"location": "Label", "data": {"order": i}}})
            done: dict[str, int] = {}

            def settled(e: dict[str, Any]) -> bool:
                if e["type"] == "transition_completed":
                    name = e["metadata"]["transition_name"]
                    done[name] = done.get(name, 0) + 1
                return done == {"split": 8, "pack": 40, "box": 13, "ship": 8}

            await client.until(settled, timeout=60)
            await client.close()
            state, log = await session_state(nc, "shop", sid)
        finally:
            await rival.stop(timeout=5)
        conflicts = stack.services["scheduler"].stats["conflicts"] + rival.stats["conflicts"]

    assert conflicts > 0  # the two schedulers did race for this session
    assert len(state.places["Shipped"]) == 8 and len(state.places["Packed"]) == 1 and not state.in_flight
    report = replay(load_net(spec), log)
    assert report.differences == [] and report.firings == 8 + 40 + 13 + 8


def test_until_inside_a_run_is_no_difference_for_the_rest_of_that_decision():
    log = Log()
    items = [log.marker("Item", n=n) for n in range(2)]
    first, _ = log.fire("work", items[0])
    log.fire("work", items[1])

    assert replay(net(WORK), log.events, until=first).ok
    assert not replay(net(WORK), log.events[:first]).ok  # a log that really ends there lacks a firing


def test_a_halt_set_makes_a_confirm_firing_expected():
    from petribus.events import HaltSet

    log = Log()
    log.add(HaltSet(bot="b", session_id="s", before=["work"]))
    log.fire("work", log.marker("Item", n=1), confirm=True)
    assert replay(net(WORK), log.events).ok

    unheld = Log()
    seq, _ = unheld.fire("work", unheld.marker("Item", n=1), confirm=True)
    [d] = replay(net(WORK), unheld.events).differences
    assert (d.seq, d.kind) == (seq, "confirm_changed") and "run it without asking" in d.message


def test_a_claim_is_judged_on_the_fold_it_was_decided_on_not_on_the_event_before_it():
    """A claim lands after events of other kinds appended while it was decided (only another claim refuses
    it): it records the sequence it was decided on, and the replay decides there. A halt_set that landed in
    between did not hold this claim, and is no difference."""
    from petribus.events import HaltSet

    log = Log()
    item = log.marker("Item", n=1)
    decided = log.events[-1][0]
    log.add(HaltSet(bot="b", session_id="s", before=["work"]))
    log.marker("Item", n=2)  # appended meanwhile too: the plan there has more, which is no difference either
    seq, _ = log.fire("work", item, planned_at=decided)
    log.fire("work", log.events[-2][1].marker.id, confirm=True, planned_at=seq)
    assert replay(net(WORK), log.events).differences == []

    # The same claim without the record is judged on the event before it, where the halt held it.
    unrecorded = [(s, e.model_copy(update={"planned_at": None}) if isinstance(e, TransitionFired) else e)
                  for s, e in log.events]
    assert [d.kind for d in replay(net(WORK), unrecorded).differences] == ["confirm_changed"]


def test_a_guard_that_raises_on_recorded_inputs_is_reported_with_its_error():
    log = Log()
    seq, _ = log.fire("work", log.marker("Item", n=0))

    [d] = replay(net({**WORK, "when": lambda inputs: 1 / inputs[Item][0].n}), log.events).differences

    assert (d.seq, d.kind) == (seq, "guard_false") and "raises ZeroDivisionError" in d.message


def test_a_forks_markers_are_checked_against_the_net():
    from petribus.events import SessionForked

    fork = [(1, SessionForked(bot="b", session_id="s", source_bot="b", source_session="a", source_seq=9,
                              markers=[Marker(location="Item", data={"n": 1}),
                                       Marker(location="Item", data={"n": "one"})]))]

    [d] = replay(net(), fork).differences  # no transitions: nothing would fire

    assert (d.seq, d.kind) == (1, "invalid_marker") and "carried over by the fork" in d.message
