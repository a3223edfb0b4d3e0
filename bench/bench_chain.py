"""Durable chain step: a chain of 10 no-op transitions, each step durable before the next one starts.

Petribus runs as a user runs it: ``petribus serve bench/chain_bot.py:bot --no-chat --port 0`` (the
embedded nats-server, every service, a fresh ``--data-dir``), once per fsync setting
(``PETRIBUS_SYNC_INTERVAL``: the default ``1s``, and ``always``). A WebSocket client opens a fresh
session per round, sends the ``A0`` marker and waits for ``step9``'s ``transition_completed``: that
is the chain total; a step is total / 10. The first ``--warmup`` sessions are not counted. From the
same rounds: marker sent -> ``step0``'s ``transition_started`` received, and, from the events' own
``ts``, where a step's time goes (the scheduler's claim, the executor's start, the run and its
completion).

The same chain runs in Burr (SQLite persister, a commit per step) and LangGraph (``SqliteSaver``,
``durability="sync"``, and the default ``"async"``) from ``bench/peers_chain.py`` in a venv of their
own (``bench/.peers``, made by this script; they are not petribus dependencies).

The floor: a raw JetStream round trip on a nats-server with the same settings (file store, the same
``sync_interval``): one 200-byte publish with a ``Nats-Msg-Id``, its ack awaited, one after another;
and a pipe round trip to another process and back (a run handed to a worker). A step stores its
completion and its next claim, each before anyone acts on it, and hands its run to a worker process:
two such appends and one such round trip are printed as the step's lower bound in this design (no
decision, encoding or sandbox in it).

    .venv/bin/python bench/bench_chain.py --sessions 50 --warmup 5

Numbers are printed, never asserted; everything runs in this one process, one system after another,
so compare the ratios within one run. The table at the end is Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import nats
import websockets
from nats.js.api import StorageType, StreamConfig

import serving
from bench_fanout import nats_version, petribus_source
from petribus.embedded import find_binary

HERE = Path(__file__).parent
ROOT = HERE.parent
APP = f"{HERE / 'chain_bot.py'}:bot"
STEPS = 10
PEERS = ("burr", "langgraph", "langgraph-async")
PEER_PACKAGES = {"burr": "burr", "langgraph": "langgraph", "langgraph.checkpoint.sqlite": "langgraph-checkpoint-sqlite"}
SYNC = {"1s": "1s", "always": "always"}
# What nats-server 2.10+ reads: ``sync_interval: always`` (or a duration). Written here rather than through
# petribus.embedded.NatsServer, whose ``sync_always: true`` nats-server 2.15.1 refuses at start.
SYNC_CONF = {"1s": 'sync_interval: "1s"', "always": "sync_interval: always"}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


@dataclass
class Row:
    system: str
    durability: str
    totals: list[float] = field(default_factory=list)  # one chain each, seconds
    notes: list[str] = field(default_factory=list)

    def steps(self) -> list[float]:
        return [t / STEPS for t in self.totals]


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    floors: dict[str, list[float]] = field(default_factory=dict)  # sync setting -> round trips, seconds
    handoffs: list[float] = field(default_factory=list)  # pipe round trips between two processes, seconds
    notes: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # petribus's breakdowns, printed again with the table


# ---------------------------------------------------------------- the floor


@contextlib.contextmanager
def nats_server(store: Path, sync: str) -> Iterator[str]:
    """A nats-server with JetStream on a file store and the given fsync setting; yields its URL."""
    store.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = store / "nats-server.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{\n  store_dir: "{store / "js"}"\n'
                    f"  {SYNC_CONF[sync]}\n}}\n")
    log = open(store / "nats-server.log", "wb")
    proc = subprocess.Popen([find_binary(), "-c", str(conf)], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while b"Server is ready" not in (store / "nats-server.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"nats-server did not start: {(store / 'nats-server.log').read_text()[-500:]}")
            time.sleep(0.02)  # start-up only
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


async def floor(sync: str, samples: int, tmp: Path) -> list[float]:
    """Sequential JetStream publish + ack round trips on a nats-server with petribus's settings."""
    with nats_server(tmp / f"floor-{sync}", sync) as url:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="BENCH_FLOOR", subjects=["bench.floor.>"], storage=StorageType.FILE,
                                         duplicate_window=120.0))
        payload = b"x" * 200  # about the size of a marker_added event
        out = []
        for i in range(samples + 50):  # the first 50 warm the connection and the store up
            t0 = time.perf_counter()
            await js.publish(f"bench.floor.s{i % 16}", payload, headers={"Nats-Msg-Id": uuid.uuid4().hex})
            if i >= 50:
                out.append(time.perf_counter() - t0)
        await nc.close()
    return out


_ECHO = "import os\nwhile True:\n    b = os.read(0, 64)\n    if not b:\n        break\n    os.write(1, b)\n"


def handoff(samples: int) -> list[float]:
    """Round trips of a few bytes through pipes to another process and back, one after another: what
    handing a run to a worker process and hearing back costs at least (two wake-ups across processes)."""
    echo = subprocess.Popen([sys.executable, "-c", _ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            bufsize=0)
    try:
        out = []
        for i in range(samples + 50):  # the first 50 warm up
            t0 = time.perf_counter()
            os.write(echo.stdin.fileno(), b"run")
            os.read(echo.stdout.fileno(), 64)
            if i >= 50:
                out.append(time.perf_counter() - t0)
        return out
    finally:
        echo.stdin.close()
        echo.wait(10)


# ---------------------------------------------------------------- petribus


class Serve(serving.Serve):
    """``petribus serve`` of the chain bot with its fsync setting, on its embedded server or ``nats_url``."""

    def __init__(self, data_dir: Path, sync: str, nats_url: str | None = None) -> None:
        self.nats_log = data_dir / "data" / "nats" / "nats-server.log"
        # The bench is the gateway's one client and opens a session per chain: the per-address limit on
        # new sessions (2 a second, bursts of 100) would refuse the 101st.
        env = {"PETRIBUS_SYNC_INTERVAL": SYNC[sync], "PETRIBUS_SESSION_CREATE_RATE": "0"}
        super().__init__(APP, data_dir, env=env, args=["--nats-url", nats_url] if nats_url else [])

    def log_tail(self) -> str:
        """The last line of serve's log, and of its embedded nats-server's log if that says why it stopped."""
        lines = self.log_lines()
        tail = lines[-1][:300] if lines else "(empty)"
        if self.nats_log.exists() and (nats_lines := self.nats_log.read_text(errors="replace").strip().splitlines()):
            tail += f"; nats-server: {nats_lines[-1][:300]}"
        return tail


@dataclass
class Chain:
    """One session's chain: client clocks (perf_counter from the send) and the events' own ``ts``."""

    total: float  # send -> step9's transition_completed received
    first_start: float  # send -> step0's transition_started received
    sent_at: float  # time.time() just before the send
    received_at: float  # time.time() when step9's completion arrived
    ts: dict[tuple[str, str | None], float]  # (event type, transition name) -> ts


async def chain_round(url: str, idle_s: float) -> Chain:
    async with websockets.connect(url, max_size=None) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert first["type"] == "session_created", first
        marker = {"type": "marker_added", "value": {"location": "A0", "data": {"step": 0}}}
        sent_at = time.time()
        t0 = time.perf_counter()
        await ws.send(json.dumps(marker))
        ts: dict[tuple[str, str | None], float] = {}
        first_start = None
        last = f"step{STEPS - 1}"
        while True:
            try:
                ev = json.loads(await asyncio.wait_for(ws.recv(), idle_s))
            except TimeoutError:
                seen = sorted(f"{k}:{n}" for k, n in ts)
                raise RuntimeError(f"stalled {time.perf_counter() - t0:.0f} s after the marker; seen {seen}") from None
            now = time.perf_counter() - t0
            kind, meta = ev["type"], ev.get("metadata") or {}
            name = meta.get("transition_name")
            if kind in ("error", "transition_failed"):
                raise RuntimeError(f"{kind}: {ev.get('value')!r}"[:500])
            if meta.get("ts") is not None:
                ts.setdefault((kind, name), meta["ts"])
            if kind == "transition_started" and name == "step0":
                first_start = now
            if kind == "transition_completed" and name == last:
                received_at = time.time()
                assert first_start is not None
                return Chain(now, first_start, sent_at, received_at, ts)


def breakdown(chains: list[Chain]) -> list[str]:
    """Where a step's time goes, from the events' ``ts`` (one clock: every process is on this machine)."""
    def step_parts(c: Chain) -> tuple[float, float, float] | None:
        claim = start = run = 0.0
        prev = c.ts.get(("marker_added", None))
        for i in range(STEPS):
            name = f"step{i}"
            fired, started = c.ts.get(("transition_fired", name)), c.ts.get(("transition_started", name))
            done = c.ts.get(("transition_completed", name))
            if None in (prev, fired, started, done):
                return None
            claim += fired - prev  # previous output made -> the scheduler's claim made
            start += started - fired  # claim -> the executor's started
            run += done - started  # started -> completed (the no-op run and the hand-back)
            prev = done
        return claim / STEPS, start / STEPS, run / STEPS

    parts = [p for c in chains if (p := step_parts(c))]
    added = [c.ts[("marker_added", None)] - c.sent_at for c in chains if ("marker_added", None) in c.ts]
    tail = [c.received_at - c.ts[("transition_completed", f"step{STEPS - 1}")] for c in chains]
    lines = []
    if parts:
        lines.append(f"per step, p50 of the {len(parts)} chains' means (from the events' ts): "
                     f"output -> claim (scheduler) {ms(median(p[0] for p in parts))}, "
                     f"claim -> started (dispatch, executor) {ms(median(p[1] for p in parts))}, "
                     f"started -> completed (run, outputs) {ms(median(p[2] for p in parts))}")
    if added:
        lines.append(f"ends: send -> marker_added made (client, gateway) {ms(median(added))}; "
                     f"last completed made -> received by the client {ms(median(tail))}")
    return lines


async def run_petribus(sync: str, sessions: int, warmup: int, idle_s: float, results: Results) -> None:
    row = Row("petribus", f"JetStream file store, {'fsync every write' if sync == 'always' else 'fsync every 1 s'}"
              f" (sync_interval {SYNC[sync]})")
    results.rows.append(row)
    print(f"petribus, PETRIBUS_SYNC_INTERVAL={SYNC[sync]}", flush=True)
    chains: list[Chain] = []
    with tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp, contextlib.ExitStack() as stack:
        serve = Serve(Path(tmp) / "embedded", sync)
        url = serve.ws_url()
        if url is None:
            serve.stop()
            row.notes.append(f"`PETRIBUS_SYNC_INTERVAL={SYNC[sync]} petribus serve` did not start (its embedded "
                             f"nats-server refused the config: {serve.log_tail()}); measured instead with "
                             f"`petribus serve --nats-url` to a nats-server this script started with "
                             f"`{SYNC_CONF[sync]}`")
            print(f"  {row.notes[-1]}", flush=True)
            row.durability += ", own nats-server (see note)"
            nats_url = stack.enter_context(nats_server(Path(tmp) / "nats", sync))
            serve = Serve(Path(tmp) / "external", sync, nats_url)
            url = serve.ws_url()
            if url is None:
                serve.stop()
                row.notes.append(f"petribus serve printed no WebSocket URL: {serve.log_tail()}")
                return
        try:
            for rnd in range(warmup + sessions):
                try:
                    c = await chain_round(url, idle_s)
                except (RuntimeError, OSError, websockets.WebSocketException) as exc:
                    note = f"petribus sync {sync}: round {rnd} failed: {exc}; server log: {serve.log_tail()}"
                    row.notes.append(note)
                    print(f"  {note}", flush=True)
                    break
                if rnd >= warmup:
                    chains.append(c)
                    row.totals.append(c.total)
        finally:
            serve.stop()
    if not chains:
        return
    first = [c.first_start for c in chains]
    first_ts = [c.ts[("transition_started", "step0")] - c.ts[("marker_added", None)] for c in chains
                if ("marker_added", None) in c.ts]
    lines = [f"petribus sync {sync}: step p50 {ms(median(row.steps()))}, p99 {ms(pct(row.steps(), 99))}; "
             f"chain total p50 {ms(median(row.totals))}, p99 {ms(pct(row.totals, 99))} (n={len(chains)})",
             f"first step: marker sent -> transition_started received p50 {ms(median(first))}, "
             f"p99 {ms(pct(first, 99))}"
             + (f"; marker_added ts -> transition_started ts p50 {ms(median(first_ts))}, "
                f"p99 {ms(pct(first_ts, 99))}" if first_ts else ""),
             *breakdown(chains)]
    for line in lines:
        print(f"  {line}", flush=True)
    results.lines.extend(lines)


# ---------------------------------------------------------------- peers


def peers_python(venv: Path, results: Results) -> Path | None:
    """The peers' venv with burr, langgraph and its SQLite checkpointer, made on first use."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making {venv} for the peers (pip install {' '.join(PEER_PACKAGES.values())}) ...", flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        made = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            results.notes.append(f"could not make the peers' venv {venv}: {made.stderr.strip()[-300:]}")
            return None
    for module, package in PEER_PACKAGES.items():
        if subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0:
            continue
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", package], capture_output=True, text=True)
        if pip.returncode != 0:
            results.notes.append(f"{package} did not install: {pip.stderr.strip()[-300:]}")
    return python


PEER_DURABILITY = {
    "burr": "SQLitePersister: INSERT + COMMIT after every step",
    "langgraph": 'SqliteSaver, durability="sync": checkpoint committed before the next step',
    "langgraph-async": 'SqliteSaver, durability="async" (default): checkpoint written while the next step runs',
}


def run_peer(python: Path, system: str, sessions: int, warmup: int, results: Results) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-chain-peer-") as tmp:
        cmd = [str(python), str(HERE / "peers_chain.py"), system, "--rounds", str(warmup + sessions), "--dir", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            results.notes.append(f"{system}: timed out")
            return
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    rounds = [x for x in lines if "round" in x]
    if done.returncode != 0 or not rounds:
        note = f"{system}: failed ({done.stderr.strip().splitlines()[-1:] or done.returncode})"
        results.notes.append(note)
        print(f"  {note}", flush=True)
        return
    info = next((x for x in lines if "sqlite" in x), {})
    sq = info.get("sqlite", {})
    durability = (f"{PEER_DURABILITY[system]}; SQLite journal_mode={sq.get('journal_mode')}, "
                  f"synchronous={sq.get('synchronous')}")
    row = Row(system, durability)
    row.totals = [x["total_s"] for x in rounds if x["round"] >= warmup]
    rows_per_chain = sorted({x["rows"] for x in rounds})
    results.notes.append(f"{system} {info.get('version', '?')}: rows persisted per chain {rows_per_chain} "
                         f"(SQLite {info.get('sqlite_version', '?')})")
    results.rows.append(row)
    print(f"  {system}: step p50 {ms(median(row.steps()))}, p99 {ms(pct(row.steps(), 99))}; "
          f"chain total p50 {ms(median(row.totals))} (n={len(row.totals)})", flush=True)


# ---------------------------------------------------------------- report


def machine() -> list[str]:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    fs = subprocess.run(["df", "-T", tempfile.gettempdir()], capture_output=True, text=True).stdout.split("\n")
    fstype = fs[1].split()[1] if len(fs) > 1 and fs[1].split() else "unknown"
    return [
        f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"machine: nproc {os.cpu_count()}, {cpu}, {platform.platform()}, load average before: {load}, "
        f"temp folder on {fstype}",
    ]


def table(results: Results) -> str:
    base = next((median(r.steps()) for r in results.rows if r.system == "petribus" and r.totals), None)
    lines = ["| system | durability | step p50 | step p99 | chain total p50 | ratio to petribus |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results.rows:
        if not r.totals:
            lines.append(f"| {r.system} | {r.durability} | failed | | | |")
            continue
        step = median(r.steps())
        ratio = f"{step / base:.2f}×" if base else "–"
        lines.append(f"| {r.system} | {r.durability} | {ms(step)} | {ms(pct(r.steps(), 99))} "
                     f"| {ms(median(r.totals))} | {ratio} |")
    return "\n".join(lines)


def floor_lines(results: Results) -> list[str]:
    out = []
    for sync, rts in results.floors.items():
        out.append(f"floor, sync_interval {SYNC[sync]}: JetStream publish + ack, sequential, p50 {ms(median(rts))}, "
                   f"p99 {ms(pct(rts, 99))} (n={len(rts)}); 10 such round trips {ms(10 * median(rts))}")
    if results.handoffs:
        rt = median(results.handoffs)
        out.append(f"floor: a pipe round trip to another process and back, p50 {ms(rt)}, "
                   f"p99 {ms(pct(results.handoffs, 99))} (n={len(results.handoffs)})")
        for sync, rts in results.floors.items():
            # A step appends its completion and its next claim, each stored before anyone acts on it, and
            # hands its run to a worker process: no decision, encoding or sandbox counted.
            out.append(f"a step's lower bound in this design, sync_interval {SYNC[sync]}: two durable appends "
                       f"and one worker round trip, {ms(2 * median(rts) + rt)}")
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=50, help="counted chains per system (default 50)")
    ap.add_argument("--warmup", type=int, default=5, help="chains run first and not counted (default 5)")
    ap.add_argument("--no-peers", action="store_true", help="run petribus and the floor only")
    ap.add_argument("--peers-venv", type=Path, default=HERE / ".peers",
                    help="venv for burr and langgraph (made if missing; default bench/.peers)")
    ap.add_argument("--sync", choices=["1s", "always", "both"], default="both",
                    help="petribus's PETRIBUS_SYNC_INTERVAL for the chain (default both)")
    ap.add_argument("--floor-samples", type=int, default=1000, help="JetStream round trips per sync setting")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds without an event after which a chain stalled")
    args = ap.parse_args()

    results = Results()
    python = None if args.no_peers else peers_python(args.peers_venv, results)
    syncs = ["1s", "always"] if args.sync == "both" else [args.sync]
    header = [*machine(), f"python {platform.python_version()}, nats-server {nats_version()}", petribus_source()]
    print("\n".join(header), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-chain-floor-") as tmp:
        for sync in syncs:
            results.floors[sync] = await floor(sync, args.floor_samples, Path(tmp))
            print(floor_lines(Results(floors={sync: results.floors[sync]}))[0], flush=True)
    results.handoffs = handoff(args.floor_samples)
    print(floor_lines(Results(handoffs=results.handoffs))[0], flush=True)
    for sync in syncs:
        await run_petribus(sync, args.sessions, args.warmup, args.idle, results)
    if python:
        print("peers", flush=True)
        for system in PEERS:
            run_peer(python, system, args.sessions, args.warmup, results)

    exe = Path(sys.executable)
    exe_shown = exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else exe
    command = f"{exe_shown} bench/bench_chain.py " + " ".join(sys.argv[1:])
    print(f"\n{command}\n" + "\n".join(header) + "\n")
    print(table(results))
    print()
    for line in floor_lines(results) + results.lines:
        print(f"- {line}")
    print("\nA chain is 10 steps, one after another; step = chain total / 10. petribus: `petribus serve`, a "
          "fresh session per chain over the WebSocket, timed from sending the A0 marker until step9's "
          "transition_completed arrives; each step appends a claim, a start and a completion (and a work item) "
          "to JetStream before the next step can be claimed. Peers: one process, no client round trip, a "
          "fresh application (Burr app_id, LangGraph thread_id) per chain in one SQLite file.")
    for note in results.notes + [n for r in results.rows for n in r.notes]:
        print(f"note: {note}")


if __name__ == "__main__":
    asyncio.run(main())
