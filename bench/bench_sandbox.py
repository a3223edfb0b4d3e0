"""What a sandbox costs to start, and what a firing costs in a warm one: forked worker vs container.

    eval "$(scripts/engine)"; .venv/bin/python bench/bench_sandbox.py [--starts 20] [--firings 500]

Prints p50/p99 of:

- **fork start**: a worker forked from the warm fork server (``worker.main`` over a pipe), until it says
  ``ready``: what the pool pays for a new process worker.
- **container start (cold image)**: the first container of a launcher (engine connection, image check,
  leftover sweep) until its worker says ``ready``; one sample per launcher.
- **container start**: a further container of the same launcher and image until ``ready``
  (``container_warm=0``: no spare).
- **container start, warm spare**: ``launch`` when a spare of the same profile is up
  (``container_warm=1``), until ``ready``.
- **no-op firing, warm container** and **no-op firing, forked worker**: one ``run`` of
  ``bench/noop_bot.py``'s ``noop`` to its ``done``, one at a time, on a worker that is already up.

Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from petribus.settings import Settings
from petribus_executor import protocol as p
from petribus_executor import worker as worker_main
from petribus_executor.container import ContainerLauncher
from petribus_executor.images import ensure_image
from petribus_executor.preload import ENV as PRELOAD_ENV
from petribus_executor.sandbox import Profile, as_dict

APP = f"{Path(__file__).resolve().parent / 'noop_bot.py'}:bot"


class Ends:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.frames = p.Frames()
        self.pending: list[tuple[Any, ...]] = []

    def recv(self) -> tuple[Any, ...]:
        while not self.pending:
            data = os.read(self.fd, 1 << 16)
            if not data:
                raise EOFError
            self.pending += self.frames.feed(data)
        return self.pending.pop(0)

    def noop(self, job: int) -> float:
        request = p.Request(bot="bench", session_id="bench", firing_id=uuid.uuid4().hex, transition="noop",
                            attempt=1, inputs=(p.InputMarker(uuid.uuid4().hex, "Tick", {"n": job}),))
        t = time.perf_counter()
        p.write(self.fd, p.frame((p.RUN, job, request)))
        msg = self.recv()
        assert msg[0] == p.DONE and msg[2].ok, msg
        return time.perf_counter() - t


def pct(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"p50 {statistics.median(ms):8.1f} ms   p99 {p99:8.1f} ms   (n={len(ms)})"


def forked(starts: int, firings: int) -> tuple[list[float], list[float]]:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["petribus_executor.preload"])
    os.environ[PRELOAD_ENV] = APP  # as the pool does: the fork server imports the app once
    boot = {"profile": as_dict(Profile()), "cpus": None}
    times, fire = [], []
    for i in range(starts + 1):
        parent, child = ctx.Pipe()
        t = time.perf_counter()
        proc = ctx.Process(target=worker_main.main, args=(child, [APP], boot))
        proc.start()
        child.close()
        ends = Ends(parent.fileno())
        assert ends.recv()[0] == p.READY
        if i:  # the first also starts the fork server
            times.append(time.perf_counter() - t)
        if i == starts:
            fire = [ends.noop(j) for j in range(firings)]
        proc.kill()
        proc.join()
        parent.close()
    return times, fire


async def contained(starts: int, firings: int, cold: int) -> tuple[list[float], list[float], list[float]]:
    await ensure_image(None)  # made once per engine; not what a start costs
    cold_times, warm_times, fire = [], [], []
    for _ in range(cold):
        launcher = ContainerLauncher(Settings(container_warm=0), [APP])
        t = time.perf_counter()
        proc, fd = await launcher.launch(Profile(kind="container", transition="noop"), {"cpus": None})
        assert Ends(fd).recv()[0] == p.READY
        cold_times.append(time.perf_counter() - t)
        os.close(fd)
        await launcher.close()
    launcher = ContainerLauncher(Settings(container_warm=0), [APP])
    try:
        keep = None
        for i in range(starts + 1):
            t = time.perf_counter()
            proc, fd = await launcher.launch(Profile(kind="container", transition="noop"), {"cpus": None})
            ends = Ends(fd)
            assert ends.recv()[0] == p.READY
            if i:
                warm_times.append(time.perf_counter() - t)
                os.close(fd)
                proc.kill()
            else:
                keep = ends
        assert keep is not None
        fire = [keep.noop(j) for j in range(firings)]
    finally:
        await launcher.close()
    return cold_times, warm_times, fire


async def spares(starts: int) -> list[float]:
    launcher = ContainerLauncher(Settings(container_warm=1), [APP])
    times = []
    try:
        for i in range(starts + 1):
            await launcher.warmed()
            t = time.perf_counter()
            proc, fd = await launcher.launch(Profile(kind="container", transition="noop"), {"cpus": None})
            assert Ends(fd).recv()[0] == p.READY
            if i:  # the first had no spare yet
                times.append(time.perf_counter() - t)
            os.close(fd)
            proc.kill()
    finally:
        await launcher.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--firings", type=int, default=500)
    args = parser.parse_args()
    fork_starts, fork_fire = forked(args.starts, args.firings)
    cold, warm, fire = asyncio.run(contained(args.starts, args.firings, args.cold))
    spare = asyncio.run(spares(args.starts))
    print(f"fork start                       {pct(fork_starts)}")
    print(f"container start (new launcher)   {pct(cold)}")
    print(f"container start                  {pct(warm)}")
    print(f"container start, warm spare      {pct(spare)}")
    print(f"no-op firing, forked worker      {pct(fork_fire)}")
    print(f"no-op firing, warm container     {pct(fire)}")


if __name__ == "__main__":
    main()
