"""The bus itself fails mid-load: nats-server killed -9 and restarted, a cluster node killed, its leader killed.

Scheduler and executor run as separate processes (``python -m petribus_cli ...``) while the test appends
8 sessions x 25 tokens through the fault. Afterwards every token is ``Finished`` exactly once, every
``moved n`` was said exactly once, nothing is in flight, every marker was consumed once, and the services
are still running. Each test also proves its fault happened (the killed node led the stream and another
was elected; the scheduler failed over to another node; the single server was really dead) and prints
how long recovery took, from the kill to the last token finished: measured, never asserted (a token not
finished within a generous ``FINISH_TIMEOUT_S`` fails the test as stuck).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from petribus import subjects
from petribus.bus import EventLog
from petribus.core import fold
from petribus.embedded import NatsCluster, NatsServer
from petribus.events import AgentMessage, Marker, MarkerAdded, TransitionFired
from petribus.settings import Settings

from .cluster import (  # noqa: F401 - the fixtures register by name
    cluster_fixture,
    cluster_nc_fixture,
    cluster_settings_fixture,
    kill,
    node_serving,
    restart,
    stream_leader,
    wait_caught_up,
    wait_for_leader,
)
from .conftest import app

TOKENS = app("tokens")
SESSIONS, PER_SESSION = 8, 25
PACE_S = 0.025  # one token appended every 25 ms: the load spans the fault
KILL_AFTER = 60  # tokens appended before the fault
DOWN_S = 3.0  # how long the killed server stays down
FINISH_TIMEOUT_S = 90.0  # generous: the slowest recovery path (the work lease sweep) takes about 60 s


class Services:
    """Scheduler and executor as child processes, each writing its log to a file under ``tmp_path``."""

    def __init__(self, url: str, tmp_path: Path, **env: str) -> None:
        self.url, self.tmp_path, self.env = url, tmp_path, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def log_file(self, name: str) -> Path:
        return self.tmp_path / f"{name}.log"

    async def __aenter__(self) -> Services:
        for name, extra in (("scheduler", []), ("executor", ["--workers", "4"])):
            with open(self.log_file(name), "wb") as log:  # noqa: ASYNC230 - test set-up, once
                self.procs[name] = subprocess.Popen(  # noqa: ASYNC220 - killed by group, polled
                    [sys.executable, "-m", "petribus_cli", name, TOKENS, "--nats-url", self.url, *extra,
                     "--log-level", "info"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                    env={**os.environ, **self.env},
                )
        async with asyncio.timeout(60):
            for name in self.procs:
                while f"{name} started" not in self.log_file(name).read_text(errors="replace"):
                    assert self.procs[name].poll() is None, self.tail(name)
                    await asyncio.sleep(0.05)  # a child's log line has no event to await
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None:
            for name in self.procs:
                print(self.tail(name))
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the executor's workers too
            proc.wait()

    def tail(self, name: str, lines: int = 60) -> str:
        text = self.log_file(name).read_text(errors="replace").splitlines()
        return f"---- {name} (exit {self.procs[name].poll()}), last {lines} lines ----\n" + "\n".join(text[-lines:])

    def assert_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} died during the fault\n{self.tail(name)}"

    def lines_with(self, needle: str) -> dict[str, int]:
        return {name: self.log_file(name).read_text(errors="replace").count(needle) for name in self.procs}


class Load:
    """8 sessions x 25 tokens, appended at a steady pace through whatever happens to the bus.

    A client does what a careful client must: it retries an append that failed, with the same Msg-Id,
    until it is acknowledged. What it saw meanwhile (errors, the longest wait) is kept for the report.
    """

    def __init__(self, nc: Any) -> None:
        self.log = EventLog(nc)
        self.sessions = [f"tok{i}" for i in range(SESSIONS)]
        self.markers: dict[str, list[Marker]] = {sid: [] for sid in self.sessions}
        self.events: list[MarkerAdded] = []
        for n in range(SESSIONS * PER_SESSION):
            sid = self.sessions[n % SESSIONS]
            marker = Marker(location="Token", data={"n": n})
            self.markers[sid].append(marker)
            self.events.append(MarkerAdded(bot="tokens", session_id=sid, marker=marker))
        self.appended = 0
        self.errors: Counter[str] = Counter()
        self.longest_append_s = 0.0
        self._progress = asyncio.Event()

    async def append_all(self) -> None:
        for event in self.events:
            started = time.monotonic()
            while True:
                try:
                    await self.log.append(event, msg_id=event.id, timeout=2.0)
                    break
                except Exception as exc:  # noqa: BLE001 - the outage, as the client sees it
                    self.errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.2)
            self.longest_append_s = max(self.longest_append_s, time.monotonic() - started)
            self.appended += 1
            self._progress.set()
            await asyncio.sleep(PACE_S)

    async def reached(self, count: int) -> None:
        while self.appended < count:
            self._progress.clear()
            await self._progress.wait()

    async def all_finished(self, timeout: float = FINISH_TIMEOUT_S) -> float:
        """Poll the sessions' logs until every token is Finished and nothing is in flight; the time it was."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self.appended == len(self.events) and all(
                            await asyncio.gather(*map(self._done, self.sessions))):
                        return time.monotonic()
                    await asyncio.sleep(0.25)  # the truth is the stored log; reading it is the only honest wait
        except TimeoutError:
            stuck = {}
            for sid in self.sessions:
                state = fold(await self.log.read("tokens", sid))
                stuck[sid] = {**state.counts(), "in_flight": len(state.in_flight)}
            raise AssertionError(f"stuck: not every token Finished within {timeout:g}s; appended "
                                 f"{self.appended}/{len(self.events)}; per session {stuck}") from None

    async def _done(self, sid: str) -> bool:
        try:
            state = fold(await self.log.read("tokens", sid))
        except Exception:  # noqa: BLE001 - a read during the outage: try again
            return False
        return state.counts().get("Finished", 0) == PER_SESSION and not state.in_flight

    async def assert_each_token_finished_once(self) -> None:
        for sid in self.sessions:
            events = await self.log.read("tokens", sid)
            state = fold(events)
            ns = [m.data["n"] for m in self.markers[sid]]
            marking = {loc: sorted(m.data["n"] for m in ms) for loc, ms in state.marking().items() if ms}
            assert marking == {"Finished": sorted(ns)}, sid
            assert not state.in_flight, sid
            added = Counter(e.marker.id for _, e in events if isinstance(e, MarkerAdded))
            assert added == Counter({m.id: 1 for m in self.markers[sid]}), f"{sid}: a client append landed twice"
            said = Counter(e.text for _, e in events if isinstance(e, AgentMessage))
            assert said == Counter({f"moved {n}": 1 for n in ns}), sid
            consumed = Counter(mid for _, e in events if isinstance(e, TransitionFired) for mid in e.consumed)
            assert set(consumed.values()) == {1}, f"{sid}: a marker consumed twice"
            assert len(consumed) == 2 * PER_SESSION, f"{sid}: every token and every Moved consumed once"
            assert {m.id for m in self.markers[sid]} <= set(consumed), sid

    def report(self, fault: str, killed_at: float, finished_at: float, services: Services, **more: Any) -> None:
        # What stretched a recovery, as the services logged it (only printed: log wording is no contract).
        more |= {"work_resent_by_lease_sweep": services.lines_with("work items lost")["scheduler"],
                 "work_acked_as_not_runnable": services.lines_with("no runnable state")["executor"]}
        extra = " ".join(f"{k}={v}" for k, v in more.items())
        print(f"\n[bus fault] {fault}: recovery {finished_at - killed_at:.2f}s from kill to last token finished; "
              f"client append errors {dict(self.errors)}, longest append {self.longest_append_s:.2f}s {extra}")


@pytest.mark.timeout(240)
async def test_killing_the_event_stream_leader_mid_load_loses_and_doubles_nothing(
    cluster: NatsCluster, cluster_settings: Settings, cluster_nc: Any, tmp_path: Path
) -> None:
    async with Services(cluster.url, tmp_path, PETRIBUS_REPLICAS="3") as services:
        load = Load(cluster_nc)
        appending = asyncio.create_task(load.append_all())
        await load.reached(KILL_AFTER)
        leader = await wait_for_leader(cluster_nc)
        leads = {s: await stream_leader(cluster_nc, s) for s in (subjects.WORK_STREAM, subjects.TIMERS_STREAM)}
        killed_at = time.monotonic()
        kill(cluster, leader)
        assert load.appended < len(load.events)  # the fault lands mid-load: tokens are still arriving
        elected = await wait_for_leader(cluster_nc, other_than=leader)
        elected_at = time.monotonic()
        await asyncio.sleep(DOWN_S)  # the node stays dead a while: the fault, not a wait for an event
        restart(cluster, leader)
        await appending
        finished_at = await load.all_finished()
        load.report(f"PB_EVENTS leader {leader} killed", killed_at, finished_at, services,
                    election=f"{elected_at - killed_at:.2f}s", new_leader=elected, other_leaders=leads)

        assert elected != leader  # an election really took place
        await wait_caught_up(cluster_nc)  # the restarted node too: any replica may answer a read
        await load.assert_each_token_finished_once()
        services.assert_alive()


@pytest.mark.timeout(240)
async def test_killing_a_follower_node_mid_load_loses_and_doubles_nothing(
    cluster: NatsCluster, cluster_settings: Settings, cluster_nc: Any, tmp_path: Path
) -> None:
    async with Services(cluster.url, tmp_path, PETRIBUS_REPLICAS="3") as services:
        load = Load(cluster_nc)
        appending = asyncio.create_task(load.append_all())
        await load.reached(KILL_AFTER)
        leader = await wait_for_leader(cluster_nc)
        follower = next(name for name in cluster.nodes if name != leader)
        leads = {s: await stream_leader(cluster_nc, s) for s in (subjects.WORK_STREAM, subjects.TIMERS_STREAM)}
        killed_at = time.monotonic()
        kill(cluster, follower)
        assert load.appended < len(load.events)  # the fault lands mid-load: tokens are still arriving
        await asyncio.sleep(DOWN_S)
        restart(cluster, follower)
        await appending
        finished_at = await load.all_finished()
        load.report(f"follower {follower} killed (PB_EVENTS leader {leader})", killed_at, finished_at,
                    services, other_leaders=leads)

        assert follower != leader
        await wait_caught_up(cluster_nc)  # the restarted node too: any replica may answer a read
        await load.assert_each_token_finished_once()
        services.assert_alive()


@pytest.mark.timeout(240)
async def test_a_single_server_killed_mid_load_and_restarted_on_its_store_loses_and_doubles_nothing(
    nats_server: NatsServer, settings: Settings, nc: Any, tmp_path: Path
) -> None:
    url = nats_server.url
    async with Services(url, tmp_path) as services:
        load = Load(nc)
        appending = asyncio.create_task(load.append_all())
        await load.reached(KILL_AFTER)
        old = nats_server.proc
        assert old is not None
        killed_at = time.monotonic()
        nats_server.kill()
        assert load.appended < len(load.events)  # the fault lands mid-load: tokens are still arriving
        assert old.poll() == -signal.SIGKILL  # really dead, not drained
        await asyncio.sleep(DOWN_S)
        nats_server.restart()
        assert nats_server.url == url and nats_server.proc is not old
        await appending
        finished_at = await load.all_finished()
        load.report("single nats-server killed", killed_at, finished_at, services,
                    service_connection_errors=services.lines_with("nats connection error"))

        await load.assert_each_token_finished_once()
        services.assert_alive()


@pytest.mark.timeout(240)
async def test_killing_the_node_the_scheduler_is_connected_to_mid_load_loses_and_doubles_nothing(
    cluster: NatsCluster, cluster_settings: Settings, cluster_nc: Any, tmp_path: Path
) -> None:
    async with Services(cluster.url, tmp_path, PETRIBUS_REPLICAS="3") as services:
        load = Load(cluster_nc)
        appending = asyncio.create_task(load.append_all())
        await load.reached(KILL_AFTER)
        served_by = node_serving(cluster, "petribus-scheduler")
        assert served_by is not None
        leader = await wait_for_leader(cluster_nc)
        killed_at = time.monotonic()
        kill(cluster, served_by)
        assert load.appended < len(load.events)  # the fault lands mid-load: tokens are still arriving
        async with asyncio.timeout(30):
            while (moved_to := node_serving(cluster, "petribus-scheduler")) is None:
                await asyncio.sleep(0.1)  # a reconnect has no event a test can wait on
        await asyncio.sleep(DOWN_S)
        restart(cluster, served_by)
        await appending
        finished_at = await load.all_finished()
        load.report(f"node {served_by} under the scheduler killed (PB_EVENTS leader {leader})", killed_at,
                    finished_at, services, reconnected_to=moved_to)

        assert moved_to != served_by  # the scheduler failed over to another node
        await wait_caught_up(cluster_nc)  # the restarted node too: any replica may answer a read
        await load.assert_each_token_finished_once()
        services.assert_alive()


@pytest.mark.timeout(120)
async def test_without_a_fault_a_cluster_finishes_every_token_with_no_lease_sweep(
    cluster: NatsCluster, cluster_settings: Settings, cluster_nc: Any, tmp_path: Path
) -> None:
    # The control run, and the strict one: with the lease sweep out of reach, a work item lost or
    # wrongly dropped anywhere leaves its token unfinished instead of a minute late.
    async with Services(cluster.url, tmp_path, PETRIBUS_REPLICAS="3", PETRIBUS_WORK_LEASE_S="3600") as services:
        load = Load(cluster_nc)
        await load.append_all()
        try:
            await load.all_finished(timeout=45)
        finally:
            print(f"\n[bus fault] none: {services.lines_with('no runnable state')['executor']} work items "
                  "acked as not runnable")
        await load.assert_each_token_finished_once()
        services.assert_alive()
