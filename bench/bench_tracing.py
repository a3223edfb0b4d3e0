"""What tracing costs: the hooks with tracing off, and appends to a real log with it off and on.

Off (no ``OTEL_*``), every hook on the hot path is a look at one module global: this prints the
cost of each hook per call, next to an empty function call for scale, and checks that opentelemetry
was not even imported. Then it appends events to one session of an embedded nats-server, one at a
time (``EventLog.append``: a span per append when on) and as atomic batches of 1,000 (the scheduler's
claims: one span per batch), with tracing off and then on (spans to an in-memory exporter, so the
cost is making spans, not shipping them).

    .venv/bin/python bench/bench_tracing.py [--appends 2000] [--batches 20]

Numbers are printed, never asserted; docs/observability.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

from petribus import bus, tracing
from petribus.embedded import NatsServer
from petribus.events import Marker, MarkerAdded, TransitionFired, new_id


def hooks_off() -> None:
    assert not tracing.active()
    n = 1_000_000

    def empty() -> None:
        pass

    headers = {tracing.TRACEPARENT: "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    cases = {
        "empty function call (scale)": empty,
        "tracing.active()": tracing.active,
        "with tracing.span(...): pass": lambda: _enter(tracing.span("x", kind="consumer")),
        "tracing.parent_of(headers, trace)": lambda: tracing.parent_of(headers, "t"),
        "tracing.traceparent()": tracing.traceparent,
        "logs.add_trace_ids (a log line)": lambda: tracing.current_ids(),
    }
    print(f"hooks with tracing off, {n:,} calls each")
    for name, fn in cases.items():
        ns = timeit.timeit(fn, number=n) / n * 1e9
        print(f"  {name:<40} {ns:7.0f} ns")
    print(f"  opentelemetry imported: {'opentelemetry.trace' in sys.modules}")


def _enter(cm: object) -> None:
    with cm:  # type: ignore[attr-defined]
        pass


async def appends(appends: int, batches: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats", sync_interval="1s").start()
        try:
            nc = await bus.connect(server.url, name="bench-tracing")
            await bus.ensure_streams(nc.jetstream())
            log = bus.EventLog(nc)
            out: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
            for label in ("off", "on") * rounds:  # alternated: the stream grows as the rounds go
                if label == "on":
                    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
                    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

                    tracing.install(SimpleSpanProcessor(InMemorySpanExporter()))
                else:
                    tracing.uninstall()
                session = new_id()
                started = time.perf_counter()
                for i in range(appends):
                    await log.append(MarkerAdded(bot="bench", session_id=session,
                                                 marker=Marker(location="Item", data={"n": i})))
                single = appends / (time.perf_counter() - started)
                last = await log.last_seq("bench", session)
                started = time.perf_counter()
                for _ in range(batches):
                    fired = [TransitionFired(bot="bench", session_id=session, firing_id=new_id(),
                                             transition="t", consumed=[]) for _ in range(1000)]
                    ids = [f.id for f in fired]
                    last = (await log.append_batch(fired, expected_last_seq=last, msg_ids=ids))[-1]
                batched = batches * 1000 / (time.perf_counter() - started)
                out[label].append((single, batched))
            await nc.close()
            return out
        finally:
            tracing.reset()
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    hooks_off()
    rates = asyncio.run(appends(args.appends, args.batches, args.rounds))
    print(f"\nappends to one session ({args.appends:,} single, {args.batches} batches of 1,000), "
          f"median of {args.rounds} alternated rounds")
    print(f"  {'tracing':<8} {'single/s':>10} {'batched events/s':>18}")
    for label, runs in rates.items():
        single = statistics.median(r[0] for r in runs)
        batched = statistics.median(r[1] for r in runs)
        print(f"  {label:<8} {single:>10,.0f} {batched:>18,.0f}")


if __name__ == "__main__":
    main()
