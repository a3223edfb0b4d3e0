"""The executor's worker pool alone (no bus): N async firings at once, then N sync ones, then one by one.

    .venv/bin/python bench/bench_pool.py [--n 1000] [--workers 16] [--worker-concurrency 256]

Each round runs N firings of ``tests/apps/concurrency.py`` through ``WorkerPool.run`` directly: async
``nap`` firings that await ``sleep`` seconds (0: the pool's own cost; 1: the fan-out shape) and sync
no-op ones, all started together; then sync no-op ones one after another, each handed over when the one
before returned (what a chain step pays for its run). Sync runs carry the executor's CPU allowance
(``PETRIBUS_SANDBOX_CPU_SECONDS``), so each arms and disarms its limit as in a real firing. Prints wall
time, firings/s, the CPU per firing of the executor process (what the pool costs its event loop: leases,
pipes, pickling) and of its workers, and for the one-by-one round the latency of a run (hand-over to
outcome, p50 / p99). Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from pathlib import Path

from petribus.settings import Settings
from petribus_executor import protocol as p
from petribus_executor.pool import WorkerPool

APP = f"{Path(__file__).parent.parent / 'tests' / 'apps' / 'concurrency.py'}:bot"


CPU_SECONDS = Settings().sandbox_cpu_seconds  # what the executor gives a def run that names no timeout


def request(transition: str, location: str, n: int, seconds: float, *, sync: bool) -> p.Request:
    return p.Request(bot="concurrency", session_id="bench", firing_id=uuid.uuid4().hex, transition=transition,
                     attempt=1, inputs=(p.InputMarker(uuid.uuid4().hex, location, {"n": n, "seconds": seconds}),),
                     cpu_seconds=CPU_SECONDS if sync else None)


def workers_cpu() -> float:
    """User+system CPU so far of this process's descendants (the fork server and its workers), seconds."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        times[pid] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


async def no_calls(kind: str, payload: object, timeout: float | None) -> object:
    raise AssertionError(f"unexpected context.{kind}")


async def one(pool: WorkerPool, i: int, seconds: float, sync: bool) -> p.Outcome:
    transition, location = ("sync_nap", "SyncNap") if sync else ("nap", "Nap")
    return await pool.run(request(transition, location, i, seconds, sync=sync), on_event=lambda kind, payload: None,
                          on_call=no_calls, timeout=None, asynchronous=not sync)


async def round_(pool: WorkerPool, n: int, seconds: float, *, sync: bool = False,
                 one_by_one: bool = False) -> tuple[float, float, float, list[float]]:
    """Wall time, executor CPU, workers' CPU, and each run's latency when ``one_by_one``."""
    cpu, wcpu, wall = time.process_time(), workers_cpu(), time.perf_counter()
    latencies: list[float] = []
    if one_by_one:
        outcomes = []
        for i in range(n):
            t0 = time.perf_counter()
            outcomes.append(await one(pool, i, seconds, sync))
            latencies.append(time.perf_counter() - t0)
    else:
        outcomes = await asyncio.gather(*(one(pool, i, seconds, sync) for i in range(n)))
    wall, cpu, wcpu = time.perf_counter() - wall, time.process_time() - cpu, workers_cpu() - wcpu
    assert all(o.ok for o in outcomes), next(o for o in outcomes if not o.ok)
    return wall, cpu, wcpu, latencies


async def main(n: int, workers: int, concurrency: int, repeat: int) -> None:
    pool = WorkerPool([APP], workers, concurrency=concurrency)
    await pool.start()
    try:
        await round_(pool, n, 0.0)  # warm-up: the workers start
        for label, seconds, sync, one_by_one in (
                ("async, no wait", 0.0, False, False), ("async, sleep 1 s", 1.0, False, False),
                ("sync, no-op", 0.0, True, False), ("sync, one by one", 0.0, True, True)):
            for _ in range(repeat):
                wall, cpu, wcpu, latencies = await round_(pool, n, seconds, sync=sync, one_by_one=one_by_one)
                latency = ""
                if latencies:
                    cuts = statistics.quantiles(latencies, n=100)
                    latency = f", run p50 {cuts[49] * 1e3:5.3f} ms p99 {cuts[98] * 1e3:5.3f} ms"
                print(f"{n} {label:<16} workers={workers} concurrency={concurrency}: wall {wall:6.3f} s, "
                      f"{n / wall:8,.0f} firings/s, CPU per firing: executor {cpu * 1e6 / n:4.0f} us, "
                      f"workers {wcpu * 1e6 / n:4.0f} us{latency} (workers started: {pool.started})", flush=True)
    finally:
        await pool.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--worker-concurrency", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    asyncio.run(main(args.n, args.workers, args.worker_concurrency, args.repeat))
