"""A real 3-node JetStream cluster per test, and the moves of a fail-over: find a leader, kill it, bring it back.

Import the fixtures into a test module (``from .cluster import cluster_fixture, ...``): each is registered
under its ``name`` (``cluster``, ``cluster_settings``, ``cluster_nc``), which a test then asks for.
Nodes are ``n0``, ``n1``, ``n2``; each keeps its ports and store across a kill and restart.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from petribus import bus, subjects
from petribus.embedded import NatsCluster
from petribus.settings import Settings

REPLICAS = 3


@pytest.fixture(name="cluster")
def cluster_fixture(tmp_path: Path) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path / "cluster", sync_interval="1s").start()
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture(name="cluster_settings")
def cluster_settings_fixture(cluster: NatsCluster, tmp_path: Path) -> Settings:
    return Settings(nats_url=cluster.url, replicas=REPLICAS, data_dir=tmp_path / "data", port=0, workers=4,
                    ack_wait_s=30.0, retry_backoff_s=0.2)


@pytest.fixture(name="cluster_nc")
async def cluster_nc_fixture(cluster_settings: Settings) -> AsyncIterator[Any]:
    """A connection to every node, with the streams created at three replicas (so the cluster is usable)."""
    conn = await bus.connect(cluster_settings.nats_url, name="test")
    # A fresh meta leader can still refuse the first R3 create while peers catch up: retry briefly.
    async with asyncio.timeout(30):
        while True:
            try:
                await bus.ensure_streams(conn.jetstream(), replicas=REPLICAS)
                break
            except Exception:  # noqa: BLE001 - not ready yet is several error types
                await asyncio.sleep(0.2)
    yield conn
    await conn.close()


async def stream_info(nc: Any, stream: str = subjects.EVENTS_STREAM, timeout: float = 0.5) -> Any | None:
    """The stream's info, or None while no answer comes (mid-election: no responders, a timeout)."""
    try:
        return await nc.jetstream(timeout=timeout).stream_info(stream)
    except Exception:  # noqa: BLE001 - several error types mean "not now"; the caller polls
        return None


async def stream_leader(nc: Any, stream: str = subjects.EVENTS_STREAM, timeout: float = 0.5) -> str | None:
    """The node leading ``stream`` now, or None while it has none (or no answer came within ``timeout``:
    short, so that an election is timed to within about that)."""
    info = await stream_info(nc, stream, timeout)
    return info.cluster.leader if info and info.cluster and info.cluster.leader else None


async def wait_for_leader(nc: Any, stream: str = subjects.EVENTS_STREAM, *, other_than: str | None = None,
                          timeout: float = 30.0) -> str:
    """Wait until ``stream`` has a leader (one that is not ``other_than``); return its name."""
    async with asyncio.timeout(timeout):
        while True:
            leader = await stream_leader(nc, stream)
            if leader is not None and leader != other_than:
                return leader
            await asyncio.sleep(0.1)  # an election has no event a client can wait on


async def wait_caught_up(nc: Any, stream: str = subjects.EVENTS_STREAM, timeout: float = 30.0) -> None:
    """Wait until every replica of ``stream`` is current with no lag: a direct get may be answered by any
    replica, so a check that reads the log after a restart waits for this first."""
    async with asyncio.timeout(timeout):
        while True:
            info = await stream_info(nc, stream, timeout=1.0)
            group = info.cluster if info else None
            peers = (group.replicas or []) if group else []
            if group and group.leader and len(peers) == REPLICAS - 1 and all(
                    p.current and not p.lag and not p.offline for p in peers):
                return
            await asyncio.sleep(0.1)


def kill(cluster: NatsCluster, name: str) -> None:
    """kill -9 one node; returns once the process is gone."""
    cluster.nodes[name].kill()
    assert not cluster.nodes[name].running


def restart(cluster: NatsCluster, name: str) -> None:
    """Bring a killed node back on the same ports and store."""
    cluster.nodes[name].restart()


def node_serving(cluster: NatsCluster, client_name: str) -> str | None:
    """The running node a client named ``client_name`` (e.g. ``petribus-scheduler``) is connected to."""
    for name, node in cluster.nodes.items():
        if not node.running:
            continue
        with urllib.request.urlopen(f"http://{node.host}:{node.http_port}/connz", timeout=2) as resp:
            if any(c.get("name") == client_name for c in json.loads(resp.read())["connections"]):
                return name
    return None
