"""The executor's cached folds answer "has this firing ended?" for any claim, old or new, at any gap."""

from __future__ import annotations

from typing import Any

from petribus.bus import EventLog
from petribus.core import SessionState, fold
from petribus.events import Marker, MarkerAdded, TransitionCompleted, TransitionFired
from petribus_executor.folds import RESTART_GAP, SessionFolds

B, S = "folds", "s1"


async def _claim(log: EventLog, firing: str) -> int:
    marker = Marker(location="Item", data={})
    await log.append(MarkerAdded(bot=B, session_id=S, marker=marker))
    return await log.append(TransitionFired(bot=B, session_id=S, firing_id=firing, transition="t",
                                            consumed=[marker.id]))


def test_a_fold_from_the_middle_of_a_log_takes_claims_on_trust() -> None:
    fired = TransitionFired(bot=B, session_id=S, firing_id="f", transition="t", consumed=["m-not-seen"])
    assert "f" not in fold([(5, fired)]).in_flight  # from the start: a claim of nothing is void
    partial = fold([(5, fired)], SessionState(after=4, last_seq=4))
    assert partial.in_flight["f"].status == "claimed"
    done = TransitionCompleted(bot=B, session_id=S, firing_id="f", transition="t")
    assert "f" in fold([(6, done)], partial).finished


async def test_old_and_new_claims_are_answered_whatever_the_cache_holds(nc: Any) -> None:
    log = EventLog(nc)
    first = await _claim(log, "old")
    for i in range(RESTART_GAP + 10):  # the cache will be far behind the next claim
        await log.append(MarkerAdded(bot=B, session_id=S, marker=Marker(location="Other", data={"i": i})))
    late = await _claim(log, "new")
    folds = SessionFolds(log)

    state = await folds.current(B, S, since=late)
    assert "new" in state.in_flight and state.after == late - 1  # read from just before the claim
    state = await folds.current(B, S, since=first)  # an older claim than the cache's start
    assert "old" in state.in_flight and "new" in state.in_flight and state.after < first

    await log.append(TransitionCompleted(bot=B, session_id=S, firing_id="old", transition="t"))
    for i in range(RESTART_GAP + 10):
        await log.append(MarkerAdded(bot=B, session_id=S, marker=Marker(location="Other", data={"j": i})))
    newest = await _claim(log, "newest")
    restarts = folds.restarts
    state = await folds.current(B, S, since=newest)
    assert folds.restarts == restarts + 1 and "newest" in state.in_flight
    state = await folds.current(B, S, since=first)
    assert "old" in state.finished  # and the old one's end is seen from a state reaching back to it
