"""Core path benchmark: every service and nats-server on this machine, each in its own process.

Prints
  * raw JetStream publish rate (pipelined, one stream, same server) — the ceiling to compare with;
  * marker_added -> transition_started latency, p50 / p99, for single markers in fresh sessions;
  * sustained no-op firings per second over many sessions (marker_added -> transition_completed).

    python bench/bench_core.py [--latency-samples 300] [--sessions 200] [--per-session 25]

Numbers are printed, never asserted. The machine is shared: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nats

from petribus import bus, subjects
from petribus.bus import EventLog
from petribus.embedded import NatsServer, free_ports
from petribus.events import Marker, MarkerAdded, SessionCreated

import pprof_top  # bench/: run as a script, its folder is on sys.path

HERE = Path(__file__).parent
APP = f"{HERE / 'noop_bot.py'}:bot"


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def raw_publish_rate(url: str, n: int = 20_000, trials: int = 3) -> list[float]:
    """Pipelined publishes a second, in ``trials`` rounds of ``n`` (one round is half a second, and moved
    by a third between runs on a shared machine: the best of several is the ceiling compared with)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="BENCH_RAW", subjects=["bench.raw"])
    payload = b"x" * 200  # about the size of a marker_added event
    rates = []
    for _ in range(trials):
        t0 = time.perf_counter()
        futures = [await js.publish_async("bench.raw", payload) for _ in range(n)]
        await asyncio.gather(*futures)
        rates.append(n / (time.perf_counter() - t0))
    await js.delete_stream("BENCH_RAW")
    await nc.close()
    return rates


def cpu_seconds(pid: int) -> float:
    """User+system CPU of a process and its reaped children (Linux /proc), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU of a process and its live descendants (the executor's workers)."""
    total = cpu_seconds(pid)
    for child in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((child / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            total += tree_cpu(int(child.name))
    return total


def start_services(url: str, workers: int, log_dir: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "PETRIBUS_LOG_LEVEL": "warning"}
    procs = []
    for cmd in (["scheduler"], ["executor", "--workers", str(workers)], ["llm"], ["gateway", "--port", "0"]):
        log = open(log_dir / f"{cmd[0]}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "petribus_cli", cmd[0], APP, "--nats-url", url, *cmd[1:]],
                                      stdout=log, stderr=log, env=env, start_new_session=True))
    return procs


class Watch:
    """Wakes on every event of the bench bot (a plain NATS subscription: no polling)."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.completed = 0
        self.all_done = asyncio.Event()
        self.target = 0
        self.waiters: dict[str, asyncio.Future] = {}

    async def on_msg(self, msg) -> None:
        now = time.perf_counter()
        # The subject names the session and the kind (pb.ev.<bot>.<session>.<kind>): nothing to decode, so
        # the client's own CPU stays small beside the services it measures on the same cores.
        _, _, _, sid, kind = msg.subject.split(".")
        if kind == "transition_started" and sid not in self.started:
            self.started[sid] = now
            fut = self.waiters.pop(sid, None)
            if fut and not fut.done():
                fut.set_result(now)
        elif kind == "transition_completed":
            self.completed += 1
            if self.target and self.completed >= self.target:
                self.all_done.set()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency-samples", type=int, default=300)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--per-session", type=int, default=25)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rate", type=float, metavar="R",
                    help="offer the sustained run's markers at R a second (default: as fast as they append); "
                         "below capacity, CPU per firing is steadier to compare changes by")
    ap.add_argument("--server-profile", type=Path, metavar="FILE",
                    help="also profile nats-server during the sustained run (its pprof, written to FILE) and "
                         "print where its CPU went (bench/pprof_top.py reads FILE again)")
    ap.add_argument("--server-profile-s", type=int, default=4, metavar="S",
                    help="seconds of the sustained run to profile nats-server for (default 4)")
    args = ap.parse_args()
    # A killed bench stops what it started (its services run in sessions of their own): SIGTERM cancels
    # this task, so the finally below runs while the nats-server still does.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)

    prof_port = free_ports(1)[0] if args.server_profile else None
    profiled: concurrent.futures.Future[bytes] | None = None
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats", prof_port=prof_port) as server:
        raws = await raw_publish_rate(server.url)
        raw = max(raws)
        procs = start_services(server.url, args.workers, Path(tmp))
        try:
            nc = await bus.connect(server.url, "bench")
            await bus.ensure_streams(nc.jetstream())
            log = EventLog(nc)
            watch = Watch()
            # Only the kinds it times, filtered by the server: starts while it times them, completions
            # throughout. The client runs on the cores it measures; the rest it is not sent.
            starts = await nc.subscribe(subjects.event("bench", "*", "transition_started"), cb=watch.on_msg)
            await nc.subscribe(subjects.event("bench", "*", "transition_completed"), cb=watch.on_msg)

            # Warm up: worker processes started, consumers created, caches hot.
            # Every session opens as the gateway opens one (session_created), before anything is timed.
            await log.append_many([SessionCreated(bot="bench", session_id=f"{prefix}{i}")
                                   for prefix, n in (("warm", 20), ("lat", args.latency_samples),
                                                     ("tp", args.sessions)) for i in range(n)])
            for i in range(20):
                fut = asyncio.get_running_loop().create_future()
                watch.waiters[f"warm{i}"] = fut
                await log.append(MarkerAdded(bot="bench", session_id=f"warm{i}",
                                             marker=Marker(location="Tick", data={"n": i})))
                await asyncio.wait_for(fut, 60)

            lat = []
            for i in range(args.latency_samples):
                sid = f"lat{i}"
                fut = asyncio.get_running_loop().create_future()
                watch.waiters[sid] = fut
                ev = MarkerAdded(bot="bench", session_id=sid, marker=Marker(location="Tick", data={"n": i}))
                t0 = time.perf_counter()
                await log.append(ev)
                lat.append((await asyncio.wait_for(fut, 30) - t0) * 1000)

            await starts.unsubscribe()  # the sustained run counts completions only
            total = args.sessions * args.per_session
            watch.completed = 0
            watch.target = total
            events = [MarkerAdded(bot="bench", session_id=f"tp{s}", marker=Marker(location="Tick", data={"n": k}))
                      for k in range(args.per_session) for s in range(args.sessions)]
            names = ["scheduler", "executor", "llm", "gateway"]
            cpu0 = {n: tree_cpu(p.pid) for n, p in zip(names, procs)}
            cpu0["nats-server"] = cpu_seconds(server.proc.pid)
            cpu0["bench client"] = time.process_time()
            if prof_port is not None:  # Go's profiler samples for S seconds, then answers
                url = f"http://127.0.0.1:{prof_port}/debug/pprof/profile?seconds={args.server_profile_s}"
                profiled = concurrent.futures.ThreadPoolExecutor(1).submit(
                    lambda: urllib.request.urlopen(url, timeout=args.server_profile_s + 30).read())
            t0 = time.perf_counter()
            if args.rate is None:
                for i in range(0, len(events), 500):
                    await log.append_many(events[i:i + 500])
            else:  # a steady offer, in slices every 10 ms: CPU per firing without a backlog's batching
                step = max(1, round(args.rate / 100))
                for n, i in enumerate(range(0, len(events), step)):
                    await asyncio.sleep(max(0.0, t0 + n * step / args.rate - time.perf_counter()))
                    await log.append_many(events[i:i + step])
            await asyncio.wait_for(watch.all_done.wait(), 600)
            elapsed = time.perf_counter() - t0
            rate = total / elapsed
            cpu = {n: tree_cpu(p.pid) - cpu0[n] for n, p in zip(names, procs)}
            cpu["nats-server"] = cpu_seconds(server.proc.pid) - cpu0["nats-server"]
            cpu["bench client"] = time.process_time() - cpu0["bench client"]
            if profiled is not None:
                args.server_profile.write_bytes(await asyncio.wrap_future(profiled))
            await nc.close()
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)

    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print(f"raw JetStream publish (pipelined, 200 B):   {raw:10.0f} msg/s   (best of "
          f"{', '.join(f'{r:.0f}' for r in raws)})")
    print(f"marker_added -> transition_started latency: p50 {statistics.median(lat):6.2f} ms   "
          f"p99 {pct(lat, 99):6.2f} ms   (n={len(lat)})")
    print(f"sustained no-op firings ({args.sessions} sessions x {args.per_session}): {rate:8.0f} firings/s "
          f"({rate * 4:.0f} events/s; {rate * 4 / raw:.1%} of raw publish rate)")
    print("CPU during the sustained run (share of one core):",
          "  ".join(f"{n} {c / elapsed:.0%}" for n, c in cpu.items()))
    # Steadier than the rate on a shared machine (another process's turn slows the run, not its CPU):
    # compare changes by this too.
    print(f"CPU per firing: {sum(cpu.values()) * 1e6 / total:.0f} us in all (",
          ", ".join(f"{n} {c * 1e6 / total:.0f}" for n, c in cpu.items() if c * 1e6 / total >= 1), ")", sep="")
    if args.server_profile:
        samples, _, inclusive = pprof_top.top(args.server_profile.read_bytes())
        print(f"nats-server profile ({samples} samples over {args.server_profile_s} s, {args.server_profile}); "
              "its functions by share of samples, with what they called:")
        for name, count in inclusive.most_common(15):
            print(f"  {100 * count / max(samples, 1):5.1f}%  {name}")


if __name__ == "__main__":
    asyncio.run(main())
