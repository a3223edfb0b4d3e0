"""Traces: OpenTelemetry spans across every hop, carried through NATS as W3C ``traceparent``.

A client's message is one trace: the gateway's span for the WebSocket message (or REST write) ->
the append of its event -> the scheduler's fold and decision on it -> the claim -> the executor's
run of the firing -> the appends of what the run said and returned; a ``user_message`` continues
into the LLM service's answer and its model calls.

The context crosses processes two ways, kept equal: every append (``bus.EventLog``) and work item
carries a ``traceparent`` header, and the payload carries the same value in its ``trace`` field
(``_Event.trace``, ``WorkItem.trace``). A consumer takes the header; a reader of the log, which gets
payloads without headers, takes the field. An event's ``trace`` names the span it was appended in,
so its consumers' spans are that span's children.

Off unless asked for: a process installs a ``TracerProvider`` only when the standard ``OTEL_*``
variables ask for export (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_TRACES_EXPORTER``; ``OTEL_SDK_DISABLED=true`` wins), the first time anything asks whether
tracing is on. Off, every hook here is a check of one module global: no span object, no context
look-up, no header written or parsed, and OpenTelemetry is not even imported (``active()`` is what
the hot paths test first; ``bench/bench_tracing.py`` measures it). Tests and
embedders install their own span processor with ``install``. docs/observability.md.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # OpenTelemetry itself is imported only once tracing is on: off, it costs no import either
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import SpanContext, Tracer

Kind = Literal["internal", "server", "client", "producer", "consumer"]

__all__ = ["CONTENT_ENV", "TRACEPARENT", "Kind", "active", "configure", "content", "current_ids", "install",
           "installed", "parent_of", "provider", "reset", "set_attributes", "span", "traceparent",
           "uninstall"]

TRACEPARENT = "traceparent"
CONTENT_ENV = "PETRIBUS_TRACE_CONTENT"  # "1": spans of model calls carry the messages' text
SERVICE_NAME = "petribus"
MAX_LINKS = 32  # a decision over a burst of events links to at most this many of them
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_NOOP = contextlib.nullcontext()  # reusable: what ``span`` returns while tracing is off

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_checked = False  # whether the environment was read (once per process, lazily)
_content: bool | None = None


def active() -> bool:
    """Whether spans are made in this process. The first call reads ``OTEL_*`` (``configure``)."""
    if _tracer is not None:
        return True
    if _checked:
        return False
    return configure()


def configure(*, set_global: bool = True) -> bool:
    """Install a provider that exports spans if the environment asks for it; whether one is installed.

    Asked for by ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``; ``none`` turns it off) or, when that
    is unset, by an OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``..._TRACES_ENDPOINT``). OTLP goes
    over HTTP/protobuf (port 4318); the exporter, the batch processor, the sampler and the resource read
    their own ``OTEL_*`` settings. ``service.name`` is ``petribus`` unless ``OTEL_SERVICE_NAME`` or
    ``OTEL_RESOURCE_ATTRIBUTES`` names one. ``set_global``: also make it OpenTelemetry's global
    provider, so that a transition's or a library's own spans join the same traces.
    """
    global _checked
    if _tracer is not None:
        return True
    _checked = True  # before anything that may log (the log processor asks ``active()``)
    exporters = _exporters_asked(os.environ)
    if not exporters:
        return False
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from petribus import logs

    log = logs.get("petribus.tracing")
    processors: list[SpanProcessor] = []
    for name in exporters:
        try:
            if name == "otlp":
                processors.append(BatchSpanProcessor(_otlp_exporter(log)))
            elif name == "console":
                from opentelemetry.sdk.trace.export import ConsoleSpanExporter

                processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
            else:
                log.warning("unknown OTEL_TRACES_EXPORTER ignored; petribus ships otlp and console",
                            exporter=name)
        except Exception as exc:  # a bad OTEL_* value must not take the service down: it runs untraced
            log.error("trace exporter not started; check the OTEL_EXPORTER_OTLP_* settings", exporter=name,
                      error=repr(exc))
    if not processors:
        return False
    provider = install(*processors)
    if set_global:
        from opentelemetry import trace

        trace.set_tracer_provider(provider)
    log.info("tracing on", exporters=exporters,
             endpoint=os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
             or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return True


def _exporters_asked(env: Mapping[str, str]) -> list[str]:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if named:
        return [] if "none" in named else named
    endpoints = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    if any(env.get(name, "").strip() for name in endpoints):
        return ["otlp"]
    return []


def _otlp_exporter(log: Any) -> Any:
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError:
            log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=grpc but the grpc exporter is not installed; exporting "
                        "over http/protobuf (port 4318) instead: pip install "
                        "opentelemetry-exporter-otlp-proto-grpc, or point the endpoint at the collector's "
                        "HTTP port")
        else:
            return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def install(*processors: SpanProcessor, service: str = SERVICE_NAME) -> TracerProvider:
    """Make spans from now on, handed to ``processors`` (an ``InMemorySpanExporter`` behind a
    ``SimpleSpanProcessor`` in tests); replaces what was installed. Returns the provider."""
    global _tracer, _provider, _checked
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    attributes = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in attributes
    provider = TracerProvider(resource=Resource.create({} if named else {"service.name": service}))
    for processor in processors:
        provider.add_span_processor(processor)
    previous = _provider
    _provider, _tracer, _checked = provider, provider.get_tracer("petribus"), True
    if previous is not None:
        previous.shutdown()
    return provider


def uninstall() -> None:
    """Stop making spans (flushing what the installed provider holds); the environment is not read again."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def reset() -> None:
    """``uninstall``, and read the environment again at the next ``active()`` (for tests)."""
    global _checked, _content
    uninstall()
    _checked = False
    _content = None


def provider() -> TracerProvider | None:
    """The provider this module installed, or None while tracing is off."""
    return _provider


def content() -> bool:
    """Whether spans may carry what people and models wrote (``PETRIBUS_TRACE_CONTENT=1``): off by
    default, as message text is personal data and traces often leave the machine."""
    global _content
    if _content is None:
        _content = os.environ.get(CONTENT_ENV, "").strip().lower() in ("1", "true", "yes")
    return _content


def span(name: str, *, parent: str | None = None, kind: Kind = "internal",
         links: Sequence[str | None] = (), root: bool = False,
         attributes: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[Any]:
    """A span made current for the ``with`` block (the span itself, or None while tracing is off).

    Its parent is ``parent`` (a traceparent) when given and valid, else the current span; ``root``
    starts a new trace instead. ``links`` are traceparents of other causes (None and invalid ones are
    skipped). An exception leaving the block is recorded on the span and marks it failed.
    """
    tracer = _tracer
    if tracer is None:
        if _checked or not configure():
            return _NOOP
        tracer = _tracer
        assert tracer is not None
    from opentelemetry import trace

    context = None
    if parent is not None and (found := _span_context(parent)) is not None:
        context = trace.set_span_in_context(trace.NonRecordingSpan(found))
    elif root:
        context = trace.set_span_in_context(trace.INVALID_SPAN)
    made = [trace.Link(c) for tp in links[:MAX_LINKS]
            if tp is not None and (c := _span_context(tp)) is not None]
    return tracer.start_as_current_span(name, context=context, kind=trace.SpanKind[kind.upper()], links=made,
                                        attributes=_clean(attributes))


def traceparent() -> str | None:
    """The current span as a W3C traceparent, or None (tracing off, or no span)."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span, as hex, for log lines; None when there is none."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def parent_of(msg_headers: Mapping[str, str] | None, trace_field: str | None = None) -> str | None:
    """The traceparent a received message continues: its header, else its payload's ``trace`` field."""
    if _tracer is None:
        return None
    found = msg_headers.get(TRACEPARENT) if msg_headers else None
    return found or trace_field


def set_attributes(attributes: Mapping[str, Any]) -> None:
    """Set ``attributes`` on the current span (None values skipped). Nothing while tracing is off."""
    if _tracer is None:
        return
    from opentelemetry import trace

    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes(_clean(attributes) or {})


def _span_context(value: str) -> SpanContext | None:
    from opentelemetry.trace import SpanContext, TraceFlags, TraceState

    match = _TRACEPARENT.match(value.strip().lower())
    if match is None or match.group(1) == "ff":
        return None
    trace_id, span_id = int(match.group(2), 16), int(match.group(3), 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(match.group(4), 16)),
                       trace_state=TraceState())


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Attributes OpenTelemetry takes: None values dropped (it warns about them otherwise)."""
    if not attributes:
        return None
    return {k: v for k, v in attributes.items() if v is not None}


@contextlib.contextmanager
def installed(*processors: SpanProcessor) -> Iterator[TracerProvider]:
    """``install`` for the ``with`` block, then ``reset`` (for tests)."""
    provider = install(*processors)
    try:
        yield provider
    finally:
        reset()
