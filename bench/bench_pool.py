"""The executor's worker pool alone (no bus): N async firings at once, then N sync ones.

    .venv/bin/python bench/bench_pool.py [--n 1000] [--workers 16] [--worker-concurrency 256]

Each round runs N firings of ``tests/apps/concurrency.py`` through ``WorkerPool.run`` directly, all
started together: async ``nap`` firings that await ``sleep`` seconds (0: the pool's own cost; 1: the
fan-out shape), and sync no-op ones. Prints wall time, firings/s and the executor process's CPU per
firing (what the pool costs its event loop: leases, pipes, pickling). Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from pathlib import Path

from petribus_executor import protocol as p
from petribus_executor.pool import WorkerPool

APP = f"{Path(__file__).parent.parent / 'tests' / 'apps' / 'concurrency.py'}:bot"


def request(transition: str, location: str, n: int, seconds: float) -> p.Request:
    return p.Request(bot="concurrency", session_id="bench", firing_id=uuid.uuid4().hex, transition=transition,
                     attempt=1, inputs=(p.InputMarker(uuid.uuid4().hex, location, {"n": n, "seconds": seconds}),))


async def no_calls(kind: str, payload: object, timeout: float | None) -> object:
    raise AssertionError(f"unexpected context.{kind}")


async def round_(pool: WorkerPool, n: int, seconds: float, *, sync: bool = False) -> tuple[float, float]:
    transition, location = ("sync_nap", "SyncNap") if sync else ("nap", "Nap")
    cpu, wall = time.process_time(), time.perf_counter()
    outcomes = await asyncio.gather(*(
        pool.run(request(transition, location, i, seconds), on_event=lambda kind, payload: None,
                 on_call=no_calls, timeout=None, asynchronous=not sync)
        for i in range(n)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert all(o.ok for o in outcomes), next(o for o in outcomes if not o.ok)
    return wall, cpu


async def main(n: int, workers: int, concurrency: int, repeat: int) -> None:
    pool = WorkerPool([APP], workers, concurrency=concurrency)
    await pool.start()
    try:
        await round_(pool, n, 0.0)  # warm-up: the workers start
        for label, seconds, sync in (("async, no wait", 0.0, False), ("async, sleep 1 s", 1.0, False),
                                     ("sync, no-op", 0.0, True)):
            for _ in range(repeat):
                wall, cpu = await round_(pool, n, seconds, sync=sync)
                print(f"{n} {label:<16} workers={workers} concurrency={concurrency}: wall {wall:6.3f} s, "
                      f"{n / wall:8,.0f} firings/s, executor CPU {cpu * 1e6 / n:4.0f} us/firing "
                      f"(workers started: {pool.started})", flush=True)
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
