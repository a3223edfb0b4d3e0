"""``petribus serve`` in a subprocess, for the benchmarks: started as a user starts it, its stdout read by
a thread (so every wait is bounded), its log kept in a file, stopped with SIGTERM (SIGKILL after 30 s)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PETRIBUS = str(Path(sys.executable).parent / "petribus")
START_S = 120.0


class Serve:
    def __init__(self, app: str, data_dir: Path, *, env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = data_dir / "serve.stderr"
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [PETRIBUS, "serve", app, "--no-chat", "--port", "0", "--data-dir", str(data_dir / "data"),
             "--log-level", "warning", *(args or [])],
            env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def ws_url(self) -> str | None:
        """The gateway's WebSocket URL once serve prints it; None if serve exits or prints none in time."""
        deadline = time.monotonic() + START_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if m := re.search(r"WebSocket\s+(ws://\S+/ws)", line):
                return m.group(1)
        return None

    def log_lines(self) -> list[str]:
        if not self.stderr.closed:
            self.stderr.flush()
        return self.stderr_path.read_text(errors="replace").strip().splitlines()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.stderr.close()
