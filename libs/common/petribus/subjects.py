"""Stream, subject and consumer names: the one place they are spelled."""

from __future__ import annotations

EVENTS_STREAM = "PB_EVENTS"
WORK_STREAM = "PB_WORK"
TIMERS_STREAM = "PB_TIMERS"
IDLE_STREAM = "PB_IDLE"  # one durable timer per session: its expiry (PETRIBUS_SESSION_TTL_S)
FILES_BUCKET = "PB_FILES"  # a JetStream object store (its stream is OBJ_PB_FILES)
DELETED_BUCKET = "PB_DELETED"  # a KV bucket: one tombstone per deleted session (petribus.deletion)
EXECUTORS_BUCKET = "PB_EXECUTORS"
DEPLOY_BUCKET = "PB_DEPLOY"  # a KV bucket: deployed versions and deployments per environment (petribus.deploy)
APPS_BUCKET = "PB_APPS"  # an object store: the versions' archives
READY_BUCKET = "PB_READY"  # a KV bucket: which service loaded which version, or why not (petribus.deployed)  # a KV bucket: the live executors, their pools and devices (petribus.registry)
EVENTS_PREFIX = "pb.ev"
WORK_PREFIX = "pb.work"
DELTAS_PREFIX = "pb.delta"  # outside PB_EVENTS' subjects on purpose: deltas are not stored
TIMERS_PREFIX = "pb.timer"
IDLE_PREFIX = "pb.idle"
# Not stored: nats-server republishes here the headers of every claim PB_EVENTS stores
# (pb.landed.<bot>.<session>), so executors know a claim landed the moment it does (petribus_executor.landed).
LANDED_PREFIX = "pb.landed"

SCHEDULER_DURABLE = "scheduler"
SCHEDULER_TIMERS_DURABLE = "scheduler-timers"
SCHEDULER_LEASES_DURABLE = "scheduler-leases"
SCHEDULER_IDLE_DURABLE = "scheduler-idle"
LLM_DURABLE = "llm"


def events(bot: str, session_id: str) -> str:
    """The subjects holding one session's log (a filter): ``pb.ev.<bot>.<session>.<kind>``, one subject per
    kind of event, so that NATS permissions can say which service appends which kind (the gateway never a
    ``transition_fired``) and consumers can take only the kinds they act on. The session's log is all of
    them, in stream order; appends are checked against the last sequence of all of them together."""
    return f"{EVENTS_PREFIX}.{bot}.{session_id}.*"


def event(bot: str, session_id: str, kind: str) -> str:
    """The subject an event of ``kind`` (its ``type``) of one session is appended to."""
    return f"{EVENTS_PREFIX}.{bot}.{session_id}.{kind}"


def bot_events(bot: str) -> str:
    return f"{EVENTS_PREFIX}.{bot}.*.*"


def kinds(*names: str) -> list[str]:
    """Filters for the events of these kinds, of every bot and session (a consumer's filter subjects)."""
    return [f"{EVENTS_PREFIX}.*.*.{name}" for name in names]


def all_events() -> str:
    return f"{EVENTS_PREFIX}.>"


def claims_republished() -> tuple[str, str]:
    """PB_EVENTS' republish of claims: the subjects it takes (every session's ``transition_fired``), and
    where their headers go (``pb.landed.<bot>.<session>``, nats-server's mapping syntax)."""
    return (f"{EVENTS_PREFIX}.*.*.transition_fired",
            f"{LANDED_PREFIX}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}")


def claims_landed(bot: str | None = None) -> str:
    """The republished claims of every session of ``bot``, or of every bot (an executor's subscription)."""
    return f"{LANDED_PREFIX}.>" if bot is None else f"{LANDED_PREFIX}.{bot}.*"


def deltas(bot: str, session_id: str) -> str:
    """Core NATS (not JetStream) subject of a session's streamed reply pieces: shown live, never logged."""
    return f"{DELTAS_PREFIX}.{bot}.{session_id}"


def parse_events(subject: str) -> tuple[str, str]:
    """``pb.ev.<bot>.<session>.<kind>`` -> (bot, session)."""
    parts = subject.split(".")
    if len(parts) != 5 or f"{parts[0]}.{parts[1]}" != EVENTS_PREFIX:
        raise ValueError(f"not an event subject: {subject!r}")
    return parts[2], parts[3]


def work(pool: str) -> str:
    """Every work item of one executor pool: the filter of the pool's shared consumer."""
    return f"{WORK_PREFIX}.{pool}.>"


def work_item(pool: str, bot: str, session_id: str, firing_id: str) -> str:
    """The subject of one firing's work item: while the firing is in flight, its item is there (PB_WORK
    is a work queue: the executor's ack after the outcome removes it)."""
    return f"{WORK_PREFIX}.{pool}.{bot}.{session_id}.{firing_id}"


def session_work(bot: str, session_id: str) -> str:
    """Every work item of one session, in every pool: one stream-info request lists them."""
    return f"{WORK_PREFIX}.*.{bot}.{session_id}.*"


def executor_durable(pool: str, bot: str | None = None) -> str:
    """A pool's shared consumer; with ``bot``, the consumer of that bot's work in the pool only (the
    executors of one deployed version: ``petribus executor --deployments``)."""
    return f"executor-{pool}" if bot is None else f"executor-{pool}~{bot}"


def bot_work(pool: str, bot: str) -> str:
    """Every work item of one bot in one pool: the filter of a bot's own consumer."""
    return f"{WORK_PREFIX}.{pool}.{bot}.>"


def pool_of_durable(durable: str) -> str | None:
    """``executor-<pool>`` or ``executor-<pool>~<bot>`` -> the pool; None for any other consumer."""
    return durable.removeprefix("executor-").split("~", 1)[0] if durable.startswith("executor-") else None


def all_work() -> str:
    return f"{WORK_PREFIX}.>"


def pool_of_work(subject: str) -> str | None:
    """``pb.work.<pool>.<bot>.<session>.<firing>`` -> the pool; None for any other subject."""
    parts = subject.split(".")
    if len(parts) != 6 or f"{parts[0]}.{parts[1]}" != WORK_PREFIX:
        return None
    return parts[2]


def confirm_deadlines() -> str:
    """Where the scheduler keeps one durable timer per pending confirmation."""
    return f"{TIMERS_PREFIX}.confirm"


def lease(bot: str, session_id: str) -> str:
    """The scheduler's durable timer that checks a session's firings in flight still have work items."""
    return f"{TIMERS_PREFIX}.lease.{bot}.{session_id}"


def leases() -> str:
    return f"{TIMERS_PREFIX}.lease.>"


def idle_check(bot: str, session_id: str) -> str:
    """The scheduler's durable timer that expires a session idle for ``PETRIBUS_SESSION_TTL_S``."""
    return f"{IDLE_PREFIX}.{bot}.{session_id}"


def idle_checks() -> str:
    return f"{IDLE_PREFIX}.>"


def tombstone(bot: str, session_id: str) -> str:
    """A deleted session's key in the ``PB_DELETED`` bucket."""
    return f"{bot}.{session_id}"


def file_object(bot: str, session_id: str, file_id: str) -> str:
    """A file's name in the ``PB_FILES`` object store: files belong to one session."""
    return f"{bot}/{session_id}/{file_id}"


def file_url(bot: str, session_id: str, file_id: str) -> str:
    """The gateway path a file is downloaded from (GET) or uploaded to (PUT, or POST multipart)."""
    return f"/bots/{bot}/sessions/{session_id}/files/{file_id}"
