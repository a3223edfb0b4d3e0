"""What dispatching work costs nats-server: a work item per firing in a work-queue stream (today), or
executors consuming the claims themselves from the log (issue 10's "claim as the dispatch").

    .venv/bin/python bench/bench_dispatch.py [--firings 20000] [--sessions 200] [--rounds 3]

No petribus services: one nats-server (``petribus.embedded``) and one client process that plays every
part with plain nats-py, the same way in both shapes, so what differs is what the server is asked to do.
A firing is four events of its session appended to a limits stream (marker_added, transition_fired,
transition_started, transition_completed), all read and acked by one durable consumer over every
event (the scheduler's), and its dispatch:

* ``work item``: a fifth message, published to a work-queue stream (``Nats-Msg-Id``), pulled and acked
  by a second durable (the executor's); the ack removes it.
* ``claim``: the claim's subject names its pool (``ev.<session>.transition_fired.cpu``) and the
  executor's durable is filtered on ``ev.*.transition_fired.cpu`` over the log itself.

Prints, per shape and round, firings a second and CPU per firing of nats-server and of the client
(``/proc``), and the server's share. Rounds alternate between the shapes. Numbers are printed, never
asserted; the machine is shared, so compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

from petribus.embedded import NatsServer

KINDS = ("marker_added", "transition_fired", "transition_started", "transition_completed")
EVENT = b"x" * 200  # about an event's size
WORK = b"w" * 300  # about a work item's size


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drain(js, stream: str, durable: str, expected: int, batch: int = 256) -> None:
    sub = await js.pull_subscribe_bind(durable, stream)
    got = 0
    while got < expected:
        try:
            msgs = await sub.fetch(batch, timeout=5)
        except nats.errors.TimeoutError:
            raise RuntimeError(f"{durable}: {got} of {expected} after a 5 s wait") from None
        for m in msgs:
            await m.ack()
        got += len(msgs)
    await sub.unsubscribe()


async def one_round(url: str, shape: str, firings: int, sessions: int, tag: str,
                    server_pid: int) -> tuple[float, float, float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    ev, wq = f"EV{tag}", f"WQ{tag}"
    await js.add_stream(StreamConfig(name=ev, subjects=[f"{ev.lower()}.>"]))
    await js.add_consumer(ev, ConsumerConfig(durable_name="sched", ack_policy=AckPolicy.EXPLICIT,
                                             max_ack_pending=100_000))
    if shape == "work item":
        await js.add_stream(StreamConfig(name=wq, subjects=[f"{wq.lower()}.>"],
                                         retention=RetentionPolicy.WORK_QUEUE))
        await js.add_consumer(wq, ConsumerConfig(durable_name="exec", ack_policy=AckPolicy.EXPLICIT,
                                                 max_ack_pending=100_000))
    else:
        await js.add_consumer(ev, ConsumerConfig(durable_name="exec", ack_policy=AckPolicy.EXPLICIT,
                                                 filter_subject=f"{ev.lower()}.*.transition_fired.cpu",
                                                 max_ack_pending=100_000))
    p = ev.lower()
    cpu0, scpu0, t0 = time.process_time(), cpu_s(server_pid), time.perf_counter()
    readers = [asyncio.create_task(drain(js, ev, "sched", firings * 4)),
               asyncio.create_task(drain(js, wq if shape == "work item" else ev, "exec", firings))]
    chunk = 250
    for start in range(0, firings, chunk):
        acks = []
        for i in range(start, min(firings, start + chunk)):
            s = f"s{i % sessions}"
            acks.append(await js.publish_async(f"{p}.{s}.marker_added", EVENT))
            if shape == "work item":
                acks.append(await js.publish_async(f"{wq.lower()}.cpu.{s}.f{i}", WORK,
                                                   headers={"Nats-Msg-Id": f"work:f{i}"}))
                acks.append(await js.publish_async(f"{p}.{s}.transition_fired", EVENT,
                                                   headers={"Nats-Msg-Id": f"fire:f{i}"}))
            else:
                acks.append(await js.publish_async(f"{p}.{s}.transition_fired.cpu", EVENT + WORK,
                                                   headers={"Nats-Msg-Id": f"fire:f{i}"}))
            acks.append(await js.publish_async(f"{p}.{s}.transition_started", EVENT))
            acks.append(await js.publish_async(f"{p}.{s}.transition_completed", EVENT))
        await asyncio.gather(*acks)
    await asyncio.gather(*readers)
    wall, cpu, scpu = time.perf_counter() - t0, time.process_time() - cpu0, cpu_s(server_pid) - scpu0
    for name in (ev, wq) if shape == "work item" else (ev,):
        await js.delete_stream(name)
    await nc.close()
    return firings / wall, cpu / firings * 1e6, scpu / firings * 1e6


async def main(firings: int, sessions: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as server:
        print(f"machine: {os.cpu_count()} cores; {firings} firings over {sessions} sessions a round",
              flush=True)
        await one_round(server.url, "claim", 2000, sessions, "W", server.proc.pid)  # warm-up
        results: dict[str, list[tuple[float, float, float]]] = {"work item": [], "claim": []}
        for r in range(rounds):
            for shape in ("work item", "claim") if r % 2 == 0 else ("claim", "work item"):
                rate, client, srv = await one_round(server.url, shape, firings, sessions, f"{r}{shape[0]}",
                                                    server.proc.pid)
                results[shape].append((rate, client, srv))
                print(f"round {r + 1} {shape:>9}: {rate:7,.0f} firings/s; CPU per firing: "
                      f"nats-server {srv:4.0f} us, client {client:4.0f} us", flush=True)
        for shape, rows in results.items():
            srv = sorted(x[2] for x in rows)
            print(f"{shape:>9}: nats-server CPU per firing, median of {len(rows)}: "
                  f"{srv[len(srv) // 2]:.0f} us")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--firings", type=int, default=20_000)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    asyncio.run(main(args.firings, args.sessions, args.rounds))
