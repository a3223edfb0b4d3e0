"""Replay benchmark: how fast a recorded session is folded, and how fast ``?at=`` answers in a long one.

Builds one session of ``--events`` events (default 100,000: runs of the 10-step chain of
``bench/chain_bot.py``, each a marker added and ten claims, starts and completions) in a real
nats-server, then prints

  * events folded per second from the bytes as stored, decoding included, in memory: streamed (each
    event decoded and folded in turn, as the gateway's timeline does) and decoded into one list first
    (what reading a whole session and then folding it costs);
  * the same read from NATS (``EventLog.scan``, batched direct gets), the network included;
  * ``GET /bots/chain/sessions/{id}?at=SEQ`` over HTTP against a gateway: the first question (which
    builds the gateway's snapshots), then p50 / p99 over ``--queries`` random sequences, with the state
    only (``events=false``), the history page of 100 steps at random points, and ``?at=`` with its
    events in the body (the first such body makes each event's client form; later ones join them).

    python bench/bench_replay.py [--events 100000] [--queries 50]

Numbers are printed, never asserted. The machine is shared: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from petribus import bus
from petribus.bus import MAX_BATCH, EventLog
from petribus.core import fold
from petribus.embedded import NatsServer
from petribus.events import (
    Marker,
    MarkerAdded,
    TransitionCompleted,
    TransitionFired,
    TransitionStarted,
    decode,
    encode,
    new_id,
)
from petribus.loader import load_net
from petribus.settings import Settings

HERE = Path(__file__).parent
APP = f"{HERE / 'chain_bot.py'}:bot"
STEPS = 10
SESSION = "replay-bench"


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def chain_log(count: int) -> list[bytes]:
    """``count`` events of chain runs as the services write them, encoded as stored."""
    out: list[bytes] = []
    common = {"bot": "chain", "session_id": SESSION}
    while len(out) < count:
        marker = Marker(location="A0", data={"step": 0})
        out.append(encode(MarkerAdded(**common, marker=marker, source="api")))
        for i in range(STEPS):
            firing = new_id()
            out.append(encode(TransitionFired(**common, firing_id=firing, transition=f"step{i}",
                                              consumed=[marker.id])))
            out.append(encode(TransitionStarted(**common, firing_id=firing, transition=f"step{i}",
                                                executor="executor-bench")))
            marker = Marker(location=f"A{i + 1}", data={"step": i + 1})
            out.append(encode(TransitionCompleted(**common, firing_id=firing, transition=f"step{i}",
                                                  outputs=[marker], duration_ms=0.2)))
    return out[:count]


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>10,.0f} events/s"


def from_bytes(raw: list[bytes]) -> tuple[float, float]:
    t0 = time.perf_counter()
    state = fold((seq, decode(data)) for seq, data in enumerate(raw, 1))
    streamed = time.perf_counter() - t0
    t0 = time.perf_counter()
    events = [(seq, decode(data)) for seq, data in enumerate(raw, 1)]
    listed_state = fold(events)
    listed = time.perf_counter() - t0
    assert state.counts() == listed_state.counts()
    return streamed, listed


async def store(log: EventLog, raw: list[bytes]) -> list[int]:
    """Append the log in atomic batches; the sequences it got."""
    seqs: list[int] = []
    last = 0
    for start in range(0, len(raw), MAX_BATCH):
        chunk = [decode(data) for data in raw[start:start + MAX_BATCH]]
        got = await log.append_batch(chunk, expected_last_seq=last, msg_ids=[e.id for e in chunk])
        seqs.extend(got)
        last = got[-1]
    return seqs


async def from_nats(log: EventLog) -> tuple[float, int]:
    t0 = time.perf_counter()
    state = None
    async for batch in log.scan("chain", SESSION):
        state = fold(batch, state)
    assert state is not None
    return time.perf_counter() - t0, state.events


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()

    raw = chain_log(args.events)
    size = sum(map(len, raw))
    print(f"# replay: {args.events:,} events, {size / args.events:.0f} bytes each on average, "
          f"Python {sys.version.split()[0]}")
    streamed, listed = from_bytes(raw)
    print(f"from bytes, decoded and folded one by one   {rate(args.events, streamed)}")
    print(f"from bytes, decoded into a list, then folded {rate(args.events, listed)}"
          f"   ({listed / streamed:.1f}x the time)")

    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats", sync_interval="1s").start()
        try:
            nc = await bus.connect(server.url, "bench-replay")
            await bus.ensure_streams(nc.jetstream())
            log = EventLog(nc)
            t0 = time.perf_counter()
            seqs = await store(log, raw)
            print(f"stored in PB_EVENTS in {time.perf_counter() - t0:.1f} s (atomic batches of {MAX_BATCH})")
            seconds, folded = await from_nats(log)
            assert folded == args.events
            print(f"from NATS (EventLog.scan), folded           {rate(args.events, seconds)}")
            await at_queries(server.url, Path(tmp), seqs, args.queries)
            await nc.close()
        finally:
            server.stop()


async def at_queries(url: str, tmp: Path, seqs: list[int], queries: int) -> None:
    from petribus_gateway.app import Gateway

    gateway = Gateway(Settings(nats_url=url, data_dir=tmp / "data", port=0), [load_net(APP)])
    await gateway.start()
    try:
        path = f"/bots/chain/sessions/{SESSION}"
        async with httpx.AsyncClient(base_url=gateway.url, timeout=120.0) as http:
            middle = seqs[len(seqs) // 2]
            t0 = time.perf_counter()
            first = await http.get(path, params={"at": middle, "events": "false"})
            cold = time.perf_counter() - t0
            assert first.status_code == 200 and first.json()["last_seq"] == middle, first.text[:300]
            print(f"?at= first question (builds the snapshots)   {cold * 1000:>8.0f} ms")
            rng = random.Random(7)
            for label, params in (("?at=SEQ&events=false", {"events": "false"}),
                                  ("history, 100 steps after SEQ", {"limit": 100})):
                times = []
                for _ in range(queries):
                    seq = rng.choice(seqs)
                    route = f"{path}/history" if "limit" in params else path
                    query = {**params, ("after" if "limit" in params else "at"): seq}
                    t0 = time.perf_counter()
                    r = await http.get(route, params=query)
                    times.append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == 200, r.text[:300]
                print(f"{label:<44} p50 {pct(times, 50):6.1f} ms  p99 {pct(times, 99):6.1f} ms  "
                      f"mean {statistics.fmean(times):6.1f} ms  ({queries} random sequences)")
            for label in ("first body (makes the client forms)", "the same again"):
                t0 = time.perf_counter()
                r = await http.get(path, params={"at": middle})
                full = time.perf_counter() - t0
                print(f"?at= middle with its {len(r.json()['events']):,} events in the body, {label:<36} "
                      f"{full * 1000:>8.0f} ms ({len(r.content) / 1e6:.1f} MB)")
            times = []
            for _ in range(queries):
                seq = rng.choice(seqs)
                t0 = time.perf_counter()
                r = await http.get(path, params={"at": seq})
                times.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, r.text[:300]
            print(f"{'?at=SEQ with its events in the body':<44} p50 {pct(times, 50):6.1f} ms  p99 "
                  f"{pct(times, 99):6.1f} ms  mean {statistics.fmean(times):6.1f} ms  ({queries} random sequences)")
    finally:
        await gateway.stop(timeout=5.0)


if __name__ == "__main__":
    asyncio.run(main())
