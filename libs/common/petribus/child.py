"""A service run as a child process of ``petribus serve``, with the same start/wait/stop face as a Service.

``serve`` runs the scheduler, the LLM service and the gateway on one event loop, and the executor in a
process of its own (``python -m petribus_executor --lifeline``): it is the service with the most work
per firing (it hands every firing to a worker process and writes its outcome), so it gets a core of its
own instead of taking turns with the others. Measured on a 2-core machine with the fan-out of 1,000
async firings (``bench/bench_fanout.py``): see docs/benchmarks.md.

The child inherits stderr (its log lines go where serve's go) and the environment but for the model key
(``child_environ``), plus every setting of serve's as a ``PETRIBUS_*`` variable (never a secret: the
executor needs none). It says ``ready`` on
stdout once it serves; its stdin is a lifeline: when serve closes it, or dies however it dies, the
child sees end-of-file and stops gracefully, so no executor outlives the command that started it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from pydantic import SecretStr

from petribus.errors import PetribusError
from petribus.settings import Settings

READY = b"ready"
START_TIMEOUT_S = 60.0


def settings_env(settings: Settings) -> dict[str, str]:
    """``PETRIBUS_*`` variables that give a child process these settings (secrets left out)."""
    env: dict[str, str] = {}
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        if field.validation_alias is not None or value is None or isinstance(value, SecretStr):
            continue
        env[f"PETRIBUS_{name.upper()}"] = str(value) if isinstance(value, Path) else f"{value}"
    return env


def child_environ() -> dict[str, str]:
    """This process's environment without the secrets it holds for itself (the model key is the LLM
    service's, which runs in this process; a child executor never needs it, and its transitions must
    never be able to find it)."""
    secret = {str(f.validation_alias) for f in Settings.model_fields.values()
              if f.validation_alias is not None and f.annotation is not None and "SecretStr" in str(f.annotation)}
    return {k: v for k, v in os.environ.items() if k not in secret}


class ChildService:
    """``python -m <module> --lifeline ARGS`` as a service of this process."""

    def __init__(self, name: str, module: str, args: list[str], settings: Settings) -> None:
        self.name = name
        self.module = module
        self.args = args
        self.settings = settings
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False  # a start after a stop (a restart) watches the new process again
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", self.module, "--lifeline", *self.args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
            env={**child_environ(), **settings_env(self.settings)},
            start_new_session=True,  # a Ctrl-C at the terminal reaches serve, which stops it in order
        )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            line = b""
        if line.strip() != READY:
            exited = self.proc.returncode is not None or self.proc.stdout.at_eof()
            await self.stop(timeout=1.0)
            self._stopping = False  # not a stop anyone asked for: wait() reports it as the failure it is
            what = "exited before it was ready" if exited else f"did not start within {START_TIMEOUT_S:g}s"
            raise PetribusError(f"the {self.name} process {what} (exit status {self.proc.returncode}); "
                                "its log lines above say why", code="service_failed")

    async def wait(self) -> None:
        """Returns only if the child ends on its own, which is a failure."""
        assert self.proc is not None
        code = await self.proc.wait()
        if not self._stopping:
            raise PetribusError(f"the {self.name} process exited ({_describe(code)})", code="service_failed")

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # the lifeline: the child drains its firings and exits
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()


def watch_lifeline() -> None:
    """In the child: when stdin reaches end-of-file (the parent closed it or died), send ourselves
    SIGTERM, which the service handles as a graceful stop."""
    import threading

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="petribus-lifeline", daemon=True).start()


def say_ready() -> None:
    sys.stdout.buffer.write(READY + b"\n")
    sys.stdout.buffer.flush()


def _describe(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
