"""A real nats-server per test (own port, own store), and an in-process stack of every service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from petribus.embedded import NatsServer
from petribus.settings import Settings

APPS = Path(__file__).parent / "apps"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", sync_interval="1s").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(nats_server: NatsServer, tmp_path: Path) -> Settings:
    return Settings(nats_url=nats_server.url, data_dir=tmp_path / "data", port=0, workers=4, ack_wait_s=30.0,
                    retry_backoff_s=0.2)


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator:
    from petribus import bus

    conn = await bus.connect(settings.nats_url, name="test")
    await bus.ensure_streams(conn.jetstream())
    yield conn
    await conn.close()


def app(name: str) -> str:
    """The spec of a test app: ``tests/apps/<name>.py:bot``."""
    return f"{APPS / name}.py:bot"
