"""Stream, subject and consumer names: the one place they are spelled."""

from __future__ import annotations

EVENTS_STREAM = "PB_EVENTS"
WORK_STREAM = "PB_WORK"
EVENTS_PREFIX = "pb.ev"
WORK_PREFIX = "pb.work"

SCHEDULER_DURABLE = "scheduler"
LLM_DURABLE = "llm"


def events(bot: str, session_id: str) -> str:
    """The subject holding one session's log."""
    return f"{EVENTS_PREFIX}.{bot}.{session_id}"


def bot_events(bot: str) -> str:
    return f"{EVENTS_PREFIX}.{bot}.*"


def all_events() -> str:
    return f"{EVENTS_PREFIX}.>"


def parse_events(subject: str) -> tuple[str, str]:
    """``pb.ev.<bot>.<session>`` -> (bot, session)."""
    parts = subject.split(".")
    if len(parts) != 4 or f"{parts[0]}.{parts[1]}" != EVENTS_PREFIX:
        raise ValueError(f"not an event subject: {subject!r}")
    return parts[2], parts[3]


def work(pool: str) -> str:
    return f"{WORK_PREFIX}.{pool}"


def executor_durable(pool: str) -> str:
    return f"executor-{pool}"
