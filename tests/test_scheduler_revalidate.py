"""What events alone would not wake: a scheduler's sweep finds stalled sessions, and it never decides on
a read that lacks the event it is deciding on."""

from __future__ import annotations

from typing import Any

from petribus.bus import EventLog
from petribus.settings import Settings

from .conftest import app
from .harness import Stack
from .test_executor import SessionLog

COUNTER = app("counter")


async def test_a_session_that_events_no_longer_reach_is_found_by_the_sweep(settings: Settings, nc: Any) -> None:
    settings = settings.model_copy(update={"scheduler_sweep_s": 0.5, "work_lease_s": 3600.0})
    async with Stack(settings, [COUNTER], parts=("scheduler", "executor")) as stack, \
            SessionLog(nc, "counter") as log:
        scheduler = stack.services["scheduler"]
        await log.add("Item", n=1)
        await log.until("transition_completed")
        # The scheduler's subscription dies (as after a fail-over that nothing noticed): no event reaches it.
        await scheduler.consumer.stop()
        await log.add("Item", n=2)
        [_, done] = await log.until("transition_completed", count=2, timeout=30)

    assert done.outputs[0].data == {"n": 2}
    assert scheduler.stats["stalled"] >= 1  # the sweep, not an event, fired it


async def test_a_read_behind_the_event_being_decided_on_is_read_again(
    settings: Settings, nc: Any, monkeypatch: Any
) -> None:
    real_read = EventLog.read
    served_stale = []

    async def lagging_read(self: EventLog, bot: str, session_id: str, after: int = 0, **kw: Any) -> Any:
        events = await real_read(self, bot, session_id, after=after, **kw)
        if bot == "counter" and not served_stale and events:
            served_stale.append(events[-1][0])
            return events[:-1]  # what a replica a little behind its leader answers
        return events

    monkeypatch.setattr(EventLog, "read", lagging_read)
    async with Stack(settings, [COUNTER], parts=("scheduler",)) as stack, SessionLog(nc, "counter") as log:
        item = await log.add("Item", n=3)
        [fired] = await log.until("transition_fired", timeout=30)

    assert served_stale, "the scheduler never read the session: the fault did not happen"
    assert stack.services["scheduler"].stats["stale_reads"] >= 1
    assert fired.consumed == [item.id]
