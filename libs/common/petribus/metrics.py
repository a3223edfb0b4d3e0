"""Prometheus metrics: every metric petribus exports, one registry per process, and its text endpoint.

Two ways a number gets here:

- **Counted where it happens**, for what no service keeps: a firing's run, its outcome, its duration and
  its wait in the queue (the executor, ``firing.py``), a model call's latency and tokens (the LLM
  service, ``openai_responder.py``), WebSocket clients (the gateway, ``metrics_route.py``). Each hook is
  one call into this module; a label set is a dictionary look-up and a lock, nothing waits on I/O.
- **Read when scraped**, from what the services already count: the scheduler's and the LLM service's
  ``stats``, the executor's held work, the sessions a scheduler holds, and the JetStream consumers'
  pending and redelivered counts. Every service registers itself at ``Service.connect`` (``watch``)
  and leaves at ``Service.stop`` (``unwatch``); its counts then stay in the totals, so a counter never
  goes down while the process lives. Consumer info costs a NATS request per consumer: it is asked at
  most once every ``CONSUMER_INFO_TTL_S`` whatever the scrape rate, concurrent scrapes share one
  refresh, and a refresh that does not answer within ``CONSUMER_INFO_TIMEOUT_S`` leaves those samples
  out rather than holding the scrape.

Labels are bounded: bot and transition names come from the nets, the pool and consumer names from the
deployment, the model from the configuration; never a session, firing or user id.

The gateway serves ``render()`` at ``/metrics``; any service serves it on ``PETRIBUS_METRICS_PORT``
(``MetricsServer``: a tiny HTTP server on the event loop, shared by every service of the process).
``petribus serve`` runs its executor in a child process (``petribus.child``), and ``executor --deployments``
one per version: each child serves its metrics on a loopback port of its own (``for_child``; never the
parent's, where the parent listens) and ``render`` adds them into this process's, series by series, so
there is still one endpoint with every metric once. A child that stops for good is forgotten
(``forget_child``). What each metric means: docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from petribus import logs, subjects
from petribus.errors import PetribusError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format every Prometheus reads
CONSUMER_INFO_TTL_S = 5.0
CONSUMER_INFO_TIMEOUT_S = 2.0

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

log = logs.get("petribus.metrics")

# Seconds: from a millisecond no-op to the ten minutes a long transition or a slow queue may take.
FIRING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                  600.0)
LLM_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
FIRING = ("bot", "transition")
MODEL = ("bot", "model")

FIRINGS_STARTED = Counter(
    "petribus_firings_started", "Runs of a firing an executor started (every attempt, retries included).",
    FIRING, registry=REGISTRY)
FIRINGS_COMPLETED = Counter(
    "petribus_firings_completed", "Firings whose transition_completed an executor appended.",
    FIRING, registry=REGISTRY)
FIRINGS_FAILED = Counter(
    "petribus_firings_failed", "transition_failed events an executor appended; final=true: failed for good "
    "(its markers went back), final=false: a retry follows.", (*FIRING, "final"), registry=REGISTRY)
FIRING_DURATION = Histogram(
    "petribus_firing_duration_seconds", "How long a run took in its worker; outcome: ok or error.",
    (*FIRING, "outcome"), buckets=FIRING_BUCKETS, registry=REGISTRY)
QUEUE_WAIT = Histogram(
    "petribus_firing_queue_wait_seconds", "From the work item's arrival in PB_WORK (right after the claim) "
    "to the first run's start: waiting for an executor and a free worker.", FIRING, buckets=FIRING_BUCKETS,
    registry=REGISTRY)
LLM_REQUESTS = Counter(
    "petribus_llm_requests", "Model calls (every try of a retried call); outcome: ok or error.",
    (*MODEL, "outcome"), registry=REGISTRY)
LLM_LATENCY = Histogram(
    "petribus_llm_request_duration_seconds", "How long a model call took, to its last streamed piece; "
    "failed calls included.", MODEL, buckets=LLM_BUCKETS, registry=REGISTRY)
LLM_TOKENS = Counter(
    "petribus_llm_tokens", "Tokens the model endpoint reported in its answers' usage; kind: prompt or "
    "completion.", (*MODEL, "kind"), registry=REGISTRY)
WEBSOCKET_CLIENTS = Gauge(
    "petribus_websocket_clients", "WebSocket connections open on the gateway.", ("bot",), registry=REGISTRY)


# ---------------------------------------------------------------- hooks: one call where it happens


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: a firing counts itself four times, and ``labels`` takes a
    lock and builds a key each time. Bounded like the label values (bots and transitions)."""
    key = (id(metric), labels)
    child = _CHILDREN.get(key)
    if child is None:
        if len(_CHILDREN) > 10_000:
            _CHILDREN.clear()
        child = _CHILDREN[key] = metric.labels(*labels)
    return child


_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def firing_started(bot: str, transition: str, queued_s: float | None = None) -> None:
    """A run began; ``queued_s``, for a firing's first run only, is how long its work item waited."""
    _child(FIRINGS_STARTED, bot, transition).inc()
    if queued_s is not None:
        _child(QUEUE_WAIT, bot, transition).observe(max(0.0, queued_s))


def firing_ran(bot: str, transition: str, ok: bool, duration_ms: float) -> None:
    _child(FIRING_DURATION, bot, transition, "ok" if ok else "error").observe(max(0.0, duration_ms) / 1000)


def firing_completed(bot: str, transition: str) -> None:
    _child(FIRINGS_COMPLETED, bot, transition).inc()


def firing_failed(bot: str, transition: str, final: bool) -> None:
    FIRINGS_FAILED.labels(bot, transition, "true" if final else "false").inc()


def llm_request(bot: str, model: str, started: float, usage: Any = None, *, ok: bool = True) -> None:
    """A model call ended (``started``: its ``time.perf_counter()``); ``usage`` is the answer's, if any."""
    LLM_REQUESTS.labels(bot, model, "ok" if ok else "error").inc()
    LLM_LATENCY.labels(bot, model).observe(max(0.0, time.perf_counter() - started))
    for kind in ("prompt", "completion"):
        tokens = getattr(usage, f"{kind}_tokens", None)
        if isinstance(tokens, int) and tokens > 0:
            LLM_TOKENS.labels(bot, model, kind).inc(tokens)


# ---------------------------------------------------------------- read when scraped

# stats key -> (metric name without _total, help)
SCHEDULER_STATS = {
    "fired": ("petribus_scheduler_firings_claimed", "Firings claimed (transition_fired appended)."),
    "claim_batches": ("petribus_scheduler_claim_batches", "Atomic claim batches committed."),
    "conflicts": ("petribus_scheduler_claim_conflicts",
                  "Claims refused because the session moved on (another writer appended first)."),
    "rebuilds": ("petribus_scheduler_session_rebuilds", "Sessions folded from the start of their log."),
    "catchups": ("petribus_scheduler_session_catchups", "Cached sessions that read events they missed."),
    "failed": ("petribus_scheduler_session_failures", "Steps of a session that raised (retried later)."),
    "redispatched": ("petribus_scheduler_work_redispatched", "Lost work items a lease check sent again."),
    "stalled": ("petribus_scheduler_stalled_sessions", "Sessions the sweep found with something undone."),
    "stale_reads": ("petribus_scheduler_stale_reads", "Reads of a session that came back behind the event."),
}
LLM_STATS = {
    "answered": ("petribus_llm_messages_answered", "User messages answered."),
    "prompts": ("petribus_llm_prompts_answered", "Transition prompts (context.prompt) answered."),
    "markers": ("petribus_llm_markers_proposed", "Markers the model proposed that were added."),
    "already_answered": ("petribus_llm_already_answered", "Deliveries whose answer was already in the log."),
    "failed": ("petribus_llm_answers_failed", "Messages that got an error event instead of an answer."),
    "llm_errors": ("petribus_llm_model_errors", "Model calls that failed for good (after retries)."),
}
EXECUTOR_STATS = {
    "cancelled": ("petribus_executor_firings_cancelled", "Firings whose session was deleted while they ran."),
}
STATS = {"scheduler": SCHEDULER_STATS, "llm": LLM_STATS, "executor": EXECUTOR_STATS}


class _Watched:
    """The services of this process, read at scrape time, and the counts of those that stopped."""

    def __init__(self) -> None:
        self.services: weakref.WeakSet[Any] = weakref.WeakSet()
        self.retired: dict[str, int] = {}  # metric name -> what stopped services had counted
        self.consumers: dict[tuple[str, str], Any] = {}  # (stream, durable) -> ConsumerInfo, last read
        self.read_at = -float("inf")
        self._refresh: asyncio.Task[None] | None = None

    def counts(self, svc: Any) -> dict[str, int]:
        spec = STATS.get(getattr(svc, "name", ""), {})
        stats = _stats(svc)
        return {name: int(stats.get(key, 0)) for key, (name, _) in spec.items()}

    def retire(self, svc: Any) -> None:
        if svc in self.services:
            self.services.discard(svc)
            for name, value in self.counts(svc).items():
                self.retired[name] = self.retired.get(name, 0) + value

    def wanted(self) -> dict[tuple[str, str], Any]:
        """(stream, durable) -> a JetStream context to ask, for every consumer a live service pulls from."""
        out: dict[tuple[str, str], Any] = {}
        for svc in list(self.services):
            js = getattr(svc, "js", None) or getattr(getattr(svc, "events", None), "js", None)
            if js is None:
                continue
            for key in _consumers(svc):
                out.setdefault(key, js)
        return out

    async def refresh(self) -> None:
        """Read the consumers' info if the last read is older than the TTL; one refresh at a time."""
        if time.monotonic() - self.read_at < CONSUMER_INFO_TTL_S:
            return
        task = self._refresh
        # (A task of another event loop is one a test's closed loop left behind.)
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            self._refresh = asyncio.ensure_future(self._read())
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._refresh), CONSUMER_INFO_TIMEOUT_S)

    async def _read(self) -> None:
        wanted = self.wanted()
        self.read_at = time.monotonic()  # a slow or failing NATS is asked again only after the TTL

        async def one(key: tuple[str, str], js: Any) -> tuple[tuple[str, str], Any]:
            try:
                return key, await asyncio.wait_for(js.consumer_info(*key), CONSUMER_INFO_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001  left out of this scrape; the service logs its outage
                log.debug("consumer info not read", stream=key[0], consumer=key[1], error=repr(exc))
                return key, None

        found = await asyncio.gather(*(one(k, js) for k, js in wanted.items()))
        self.consumers = {k: info for k, info in found if info is not None}


WATCHED = _Watched()


def _stats(svc: Any) -> dict[str, int]:
    if getattr(svc, "name", "") == "executor":
        runner = getattr(svc, "runner", None)
        return {"cancelled": getattr(runner, "cancelled", 0)}
    stats = getattr(svc, "stats", None)
    return stats if isinstance(stats, dict) else {}


def _consumers(svc: Any) -> list[tuple[str, str]]:
    name = getattr(svc, "name", "")
    if name == "scheduler":
        return [(subjects.EVENTS_STREAM, subjects.SCHEDULER_DURABLE)]
    if name == "llm":
        return [(subjects.EVENTS_STREAM, subjects.LLM_DURABLE)]
    if name == "executor":
        return [(subjects.WORK_STREAM, subjects.executor_durable(p, getattr(svc, "scope", None)))
                for p in getattr(svc, "pools", [])]
    return []


class _ScrapeCollector:
    """What the services already count, turned into samples when Prometheus asks."""

    def describe(self) -> list[Metric]:
        return []  # samples vary with what runs here: describe nothing, so registration never collects

    def collect(self) -> Iterator[Metric]:
        services = list(WATCHED.services)
        for kind, spec in STATS.items():
            totals = {name: WATCHED.retired.get(name, 0) for name, _ in spec.values()}
            for svc in services:
                if getattr(svc, "name", "") == kind:
                    for name, value in WATCHED.counts(svc).items():
                        totals[name] += value
            for name, text in spec.values():
                family = CounterMetricFamily(name, text)
                family.add_metric([], totals[name])
                yield family
        yield from self._sessions(services)
        yield from self._executors(services)
        yield from self._consumers()

    def _sessions(self, services: list[Any]) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "petribus_sessions_active", "Sessions a scheduler of this process holds that have a firing in "
            "flight (claimed, running, or awaiting confirmation).", labels=["bot"])
        cached = GaugeMetricFamily(
            "petribus_scheduler_sessions_cached", "Sessions whose state a scheduler of this process holds.")
        by_bot: dict[str, int] = {}
        held = 0
        for svc in services:
            if getattr(svc, "name", "") != "scheduler":
                continue
            for bot in getattr(svc, "nets", {}):
                by_bot.setdefault(bot, 0)
            sessions = list(getattr(svc, "sessions", {}).items())  # a copy: the loop does not yield
            held += len(sessions)
            for (bot, _), state in sessions:
                if state.in_flight:
                    by_bot[bot] = by_bot.get(bot, 0) + 1
        for bot, n in sorted(by_bot.items()):
            active.add_metric([bot], n)
        cached.add_metric([], held)
        yield active
        yield cached

    def _executors(self, services: list[Any]) -> Iterator[Metric]:
        held = GaugeMetricFamily(
            "petribus_executor_firings_held", "Work items the executors of this process hold (running, "
            "waiting for a worker, or writing their outcome).", labels=["pool"])
        capacity = GaugeMetricFamily(
            "petribus_executor_capacity", "Work items the executors of this process may hold at once.",
            labels=["pool"])
        totals: dict[str, tuple[int, int]] = {}
        for svc in services:
            if getattr(svc, "name", "") != "executor":
                continue
            for pool, n in dict(getattr(svc, "held", {})).items():
                consumer = getattr(svc, "consumers", {}).get(pool)
                cap = getattr(consumer, "max_inflight", 0)
                have, room = totals.get(pool, (0, 0))
                totals[pool] = (have + n, room + cap)
        for pool, (n, cap) in sorted(totals.items()):
            held.add_metric([pool], n)
            capacity.add_metric([pool], cap)
        yield held
        yield capacity

    def _consumers(self) -> Iterator[Metric]:
        labels = ["stream", "consumer"]
        pending = GaugeMetricFamily(
            "petribus_consumer_pending_messages", "Messages the consumer has not delivered yet (a backlog).",
            labels=labels)
        acks = GaugeMetricFamily(
            "petribus_consumer_ack_pending_messages", "Messages delivered and not acked yet (in work).",
            labels=labels)
        redelivered = GaugeMetricFamily(
            "petribus_consumer_redelivered_messages", "Messages delivered more than once and not yet acked.",
            labels=labels)
        watched = WATCHED.wanted()  # a consumer whose service stopped is not reported from the cache
        for (stream, durable), info in sorted(WATCHED.consumers.items()):
            if (stream, durable) not in watched:
                continue
            pending.add_metric([stream, durable], info.num_pending or 0)
            acks.add_metric([stream, durable], info.num_ack_pending or 0)
            redelivered.add_metric([stream, durable], info.num_redelivered or 0)
        yield pending
        yield acks
        yield redelivered


REGISTRY.register(_ScrapeCollector())  # type: ignore[arg-type]


async def render() -> bytes:
    """The registry in Prometheus' text format, consumer info refreshed if it is stale, with the metrics of
    the child processes this one follows (``for_child``) added in."""
    await WATCHED.refresh()
    if not _children:
        return generate_latest(REGISTRY)
    texts = await asyncio.gather(*(_fetch(url) for url in _children))
    return generate_latest(_Merged(REGISTRY, [t for t in texts if t is not None]))  # type: ignore[arg-type]


# ---------------------------------------------------------------- child processes (petribus serve)

_children: list[str] = []


def for_child(settings: Any) -> Any:
    """``settings`` for a child process whose metrics this process reports as its own: ``petribus serve``
    runs the executor in a process of its own, and still has one endpoint. The child serves them on a free
    loopback port; ``render`` reads them there at every scrape and adds them to this process's."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _children.append(_child_url(port))
    return settings.model_copy(update={"metrics_port": port, "metrics_host": "127.0.0.1"})


def forget_child(settings: Any) -> None:
    """The child given ``settings`` by ``for_child`` stopped for good: its port is no longer read (a scrape
    would only wait for a refused connection, and the port may go to another process)."""
    with contextlib.suppress(ValueError):
        _children.remove(_child_url(settings.metrics_port))


def _child_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


async def _fetch(url: str) -> str | None:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=CONSUMER_INFO_TIMEOUT_S) as http:
            answer = await http.get(url)
        answer.raise_for_status()
        return answer.text
    except httpx.HTTPError as exc:  # a child starting or gone: this scrape has this process's metrics only
        log.debug("child metrics not read", url=url, error=repr(exc))
        return None


class _Merged:
    """This registry's families with the children's samples added: the same series summed (counts of
    different processes add up; a ``_created`` keeps the earliest), a series only a child has put in the
    family it belongs to, and the children's ``process_*`` and ``python_*`` left out (those describe this
    process). Merged sample by sample: the text format names a family by its samples (``x_total``), the
    registry by its metric (``x``)."""

    SUFFIXES = ("", "_total", "_created", "_bucket", "_count", "_sum", "_info")

    def __init__(self, own: CollectorRegistry, texts: list[str]) -> None:
        self.own = own
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        families = list(self.own.collect())
        owner = {family.name + suffix: family for family in families for suffix in self.SUFFIXES}
        index = {(s.name, frozenset(s.labels.items())): (family, i)
                 for family in families for i, s in enumerate(family.samples)}
        for text in self.texts:
            for family in text_string_to_metric_families(text):
                if family.name.startswith(("process_", "python_")):
                    continue
                for sample in family.samples:
                    key = (sample.name, frozenset(sample.labels.items()))
                    if key in index:
                        mine, i = index[key]
                        have = mine.samples[i].value
                        created = sample.name.endswith("_created")
                        both = min(have, sample.value) if created else have + sample.value
                        mine.samples[i] = mine.samples[i]._replace(value=both)
                        continue
                    home = owner.get(sample.name)
                    if home is None:  # a metric this process does not define (another version's)
                        home = owner[sample.name] = Metric(family.name, family.documentation, family.type)
                        families.append(home)
                    home.samples.append(sample)
                    index[key] = (home, len(home.samples) - 1)
        return iter(families)


# ---------------------------------------------------------------- services and the metrics port


class MetricsServer:
    """``GET /metrics`` over plain HTTP on the event loop; shared by every service of the process."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.asked = port
        self.port = 0
        self.users = 0
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else (self.host or "127.0.0.1")
        return f"http://{host}:{self.port}/metrics"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host or None, self.asked)
        except OSError as exc:
            raise PetribusError(f"cannot serve metrics on {self.host}:{self.asked} ({exc}); choose another "
                                "PETRIBUS_METRICS_PORT / PETRIBUS_METRICS_HOST, or unset the port",
                                code="metrics_listen") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics listening", url=self.url)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD") or path != "/metrics":
                status, body, kind = "404 Not Found", b"only GET /metrics is served here\n", "text/plain"
            else:
                status, body, kind = "200 OK", await render(), CONTENT_TYPE
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # a client that went away or sent no request: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


_servers: dict[tuple[str, int], MetricsServer] = {}


async def watch(svc: Any) -> MetricsServer | None:
    """Read ``svc``'s counts at every scrape; open the metrics port its settings ask for (None: none)."""
    WATCHED.services.add(svc)
    port = getattr(svc.settings, "metrics_port", None)
    if port is None or getattr(svc, "metrics_server", None) is not None:  # off, or watched already
        return getattr(svc, "metrics_server", None)
    key = (svc.settings.metrics_host, port)
    server = _servers.get(key)
    if server is None:
        server = MetricsServer(*key)
        await server.start()
        _servers[key] = server
    server.users += 1
    return server


async def unwatch(svc: Any) -> None:
    """``svc`` stopped: its counts stay in the totals; the port closes with its last service."""
    WATCHED.retire(svc)
    server, svc.metrics_server = getattr(svc, "metrics_server", None), None
    if server is None:
        return
    server.users -= 1
    if server.users <= 0:
        _servers.pop((server.host, server.asked), None)
        await server.close()
