"""Sessions stored before events had a subject per kind: found, and moved to the current layout.

Until this version a session's log was one subject, ``pb.ev.<bot>.<session>``; now each kind of event
has its own, ``pb.ev.<bot>.<session>.<kind>`` (``petribus.subjects``). A store written by an older
version still holds the old subjects, which no reader of today sees. ``legacy_sessions`` finds them;
``migrate`` appends each old session's events, in their order, to the new subjects (atomic batches,
each at the expected last sequence, so two migrations at once, or a migration run again after a crash,
never append an event twice: it resumes after what the new subjects already hold) and then purges the
old subject. The events keep their ids, times and contents; their sequences are new.

``petribus serve`` migrates its embedded store before its services start; a deployment of separate
services runs ``petribus migrate`` once with the services stopped (a service refuses to start on a
store with old subjects, saying so).
"""

from __future__ import annotations

from collections.abc import Callable

from petribus import subjects
from petribus.bus import MAX_BATCH, EventLog

LEGACY = f"{subjects.EVENTS_PREFIX}.*.*"  # exactly four tokens: the old one-subject-per-session layout


async def legacy_sessions(log: EventLog) -> dict[str, int]:
    """Old-layout subject -> how many events it holds."""
    info = await log.js.stream_info(subjects.EVENTS_STREAM, subjects_filter=LEGACY)
    return dict(info.state.subjects or {})


async def migrate(log: EventLog, *, progress: Callable[[str, int], None] | None = None) -> int:
    """Move every old-layout session to the new subjects; how many events were moved."""
    moved = 0
    for subject, count in sorted((await legacy_sessions(log)).items()):
        _, _, bot, session_id = subject.split(".")
        done = await log.count(bot, session_id)  # an earlier run may have moved some already
        events = []
        start = 1
        while True:
            batch, pending = await log._direct_batch(subject, start, 10.0)
            events.extend(e for _, e in batch)
            if not pending or not batch:
                break
            start = batch[-1][0] + 1
        todo = events[done:]
        last = await log.last_seq(bot, session_id)
        for i in range(0, len(todo), MAX_BATCH):
            chunk = todo[i:i + MAX_BATCH]
            seqs = await log.append_batch(chunk, expected_last_seq=last,
                                          msg_ids=[f"migrate:{e.id}" for e in chunk])
            last = seqs[-1]
        await log.js.purge_stream(subjects.EVENTS_STREAM, subject=subject)
        moved += len(todo)
        if progress is not None:
            progress(subject, count)
    return moved
