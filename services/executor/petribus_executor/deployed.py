"""``petribus executor --deployments``: an executor per deployed version, started while running.

Every version wanted (``petribus.deploy.Catalog.wanted``: active now or before in some environment) gets
an executor process of its own, ``python -m petribus_executor --scoped --lifeline <folder>/<app>@<bot>``:
the version's code is imported only there (its modules never meet another version's), under the version's
own bot name, and it takes only that bot's work, on consumers of its own (``executor-<pool>~<bot>``). So
versions run side by side and a new one is picked up without restarting anything. Before starting one, its
app is loaded here once, in a thread, to report a version that cannot load (``PB_READY``) instead of
starting a process that would die; a child that exits on its own is started again after a pause.

Metrics: this process serves ``PETRIBUS_METRICS_PORT`` (compose gives every service the same one), so a
version's executor must not inherit it: it could not listen there, and its firings would never reach this
port. Each child gets a loopback port of its own (``metrics.for_child``, as ``petribus serve`` does for its
executor), which this process's endpoint reads and adds in; the port is forgotten when the child stops.

The pools are this command's (``--pool``, or the defaults), for every version: a version whose
transitions need a pool this executor does not serve waits for an executor that does (the gateway sends it
no sessions until then). Plain executors (without ``--deployments``) of the same pools cannot run beside
these: JetStream refuses a pool's shared consumer next to the bots' own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path

from petribus import metrics
from petribus.child import ChildService
from petribus.deploy import Version, load
from petribus.deployed import Deployed, apps_dir
from petribus.service import Service
from petribus.settings import Settings

RESTART_PAUSE_S = 2.0


class DeployedExecutors(Service):
    name = "executor"

    def __init__(self, settings: Settings, *, pools: list[str] | None = None, labels: list[str] | None = None,
                 instance: str | None = None) -> None:
        super().__init__(settings)
        self.pools = list(pools or [])
        self.labels = list(labels or [])
        self.instance = instance or f"executors-{'+'.join(self.pools) or 'default'}@{socket.gethostname()}:{os.getpid()}"
        self.children: dict[str, ChildService] = {}  # bot -> its executor
        self.deployed: Deployed | None = None

    async def start(self) -> None:
        nc = await self.connect()
        self.deployed = Deployed(nc, role="executor", instance=self.instance,
                                 cache_dir=apps_dir(self.settings.data_dir), on_version=self._start_version,
                                 replicas=self.settings.replicas)
        await self.deployed.start()
        self.log.info("executors started", versions=sorted(self.children), pools=self.pools or "default")

    async def _start_version(self, version: Version, folder: Path) -> None:
        await asyncio.to_thread(load, folder, version)  # a version that cannot load is reported, not started
        file, _, attr = version.app.rpartition(":")
        spec = f"{(folder / file).resolve()}:{attr}@{version.bot}"
        args = [spec, "--scoped", "--nats-url", self.settings.nats_url]
        for pool in self.pools:
            args += ["--pool", pool]
        for label in self.labels:
            args += ["--label", label]
        child = ChildService(f"executor of {version.bot}", "petribus_executor", args, self._child_settings())
        try:
            await child.start()
        except BaseException:
            self._forget(child)
            raise
        self.children[version.bot] = child
        self.spawn(self._watch(version, child), f"watch:{version.bot}")

    async def _watch(self, version: Version, child: ChildService) -> None:
        """Start the version's executor again whenever it ends on its own."""
        while True:
            try:
                await child.wait()
                return  # stopped by us
            except Exception as exc:
                self.log.error("a version's executor ended; starting it again", bot=version.bot, error=str(exc))
            await asyncio.sleep(RESTART_PAUSE_S)
            self._forget(child)
            child.settings = self._child_settings()  # a fresh port: the old one may be another's by now
            with contextlib.suppress(Exception):
                await child.start()

    def _child_settings(self) -> Settings:
        """This process's settings but for the metrics port, which is this process's own (if it has one)."""
        return self.settings if self.settings.metrics_port is None else metrics.for_child(self.settings)

    def _forget(self, child: ChildService) -> None:
        if child.settings is not self.settings:
            metrics.forget_child(child.settings)

    async def drain(self) -> None:
        if self.deployed is not None:
            await self.deployed.close()
        await asyncio.gather(*(child.stop() for child in self.children.values()), return_exceptions=True)
        for child in self.children.values():
            self._forget(child)
