"""``petribus serve --reload``: the services run anew whenever a ``.py`` file under the app's folder changes.

Everything that holds a session stays in the ``serve`` process: the embedded nats-server (the log is
the truth: sessions, markers and firings in flight live there) and the terminal chat. The services (the
scheduler, the LLM service, the gateway and, as its own child, the executor) run in a child process,
``python -m petribus_cli serve APP --lifeline --nats-url URL --no-chat``, which is replaced on change:

1. Changes come from the operating system's file events (``watchfiles``: inotify on Linux; no
   polling loop), Python files only, ``__pycache__``, ``.git``, virtual environments and the like left
   out, and settle for ``DEBOUNCE_MS`` before a reload, so that an editor's save of several files is one.
2. The new code is checked first, in a process of its own (``python -m petribus_cli.reload APP``): it
   must import and its net must validate. A broken edit (a syntax error, an invalid net) is printed and
   the services keep running the code from before, until the next change.
3. Then the old child is stopped as ``serve`` stops: its executor drains (a firing still running is
   handed back to the bus and runs again on the new code), and a new child starts on the same gateway
   port. It says ``ready`` once it serves; only then is the reload printed, one line.

The chat notices its connection drop and resumes with ``since`` (it shows "[reconnecting]"), so it sees
every event of the session, including those appended while no gateway ran. Nothing of a session is in
the child, so no session is lost by a reload.

The child's stdin is its lifeline (``petribus.child``): if ``serve`` dies however it dies, the child
sees end-of-file and stops, and so does its executor.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from petribus.child import READY, START_TIMEOUT_S

DEBOUNCE_MS = 150  # quiet time after the last change before a reload
MAX_DEBOUNCE_MS = 1600  # a reload starts at most this long after the first change of a batch
STOP_TIMEOUT_S = 15.0
CHECK_TIMEOUT_S = 60.0
TAIL_LINES = 20
TAIL_LINE_BYTES = 4096  # of a line kept for the tail
READ_SIZE = 1 << 16


class Services:
    """The child process that runs the services, as ``serve --reload`` sees it."""

    def __init__(self, argv: list[str], env: dict[str, str], *, on_exit: Callable[[int], None]) -> None:
        self.argv = argv
        self.env = env
        self.on_exit = on_exit  # called when the child ends on its own (not stopped)
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)  # its last stderr lines
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> str | None:
        """Start the child; None once it serves, else why it did not (its last lines of output)."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "petribus_cli", *self.argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=self.env, start_new_session=True,  # Ctrl-C reaches serve, which stops the child in order
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        forward = asyncio.create_task(self._forward(self.proc.stderr))
        self._tasks.append(forward)
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            await self.stop()
            return f"the services did not start within {START_TIMEOUT_S:g}s; the log has what they did"
        if line.strip() != READY:
            await self.stop()
            return self.why()
        self._tasks.append(asyncio.create_task(self._drain(self.proc.stdout)))
        self._tasks.append(asyncio.create_task(self._watch(forward)))
        return None

    def why(self) -> str:
        """Why the child stopped, as it said it (its ``error:`` lines), else how it ended."""
        errors = [line.removeprefix("error: ") for line in self.tail if line.startswith("error: ")]
        if errors:
            return "\n".join(errors)
        code = self.proc.returncode if self.proc is not None else None
        how = ("it did not start" if code is None else f"killed by signal {-code}" if code < 0
               else f"exit status {code}")
        return f"{how}; the log has the details"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and not self._stopping

    async def stop(self) -> None:
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()  # the lifeline: the child stops as serve does, draining its firings
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
        await self._finish()

    async def _finish(self) -> None:
        # Its output ends when the last process holding the pipes (its executor's included) is gone.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _watch(self, forward: asyncio.Task[None]) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        if not self._stopping:
            await asyncio.wait([forward], timeout=2.0)  # its last words, for on_exit to show
            self.on_exit(code)

    async def _forward(self, stream: asyncio.StreamReader) -> None:
        """The child's log lines go where serve's go (the log file in chat mode); the last are kept.

        Read in chunks, not lines: a line longer than the reader's limit must not stop the reading, or
        the child would block on a full pipe."""
        partial = b""
        while chunk := await stream.read(READ_SIZE):
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
                out = getattr(sys.stderr, "buffer", None)
                if out is not None:
                    out.write(chunk)
                    out.flush()
                else:
                    sys.stderr.write(chunk.decode(errors="replace"))
            *lines, partial = (partial + chunk).split(b"\n")
            self.tail.extend(line.decode(errors="replace") for line in lines[-TAIL_LINES:])
            partial = partial[-TAIL_LINE_BYTES:]

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        while await stream.readline():  # "petribus stopped." and the like: serve prints its own
            pass


class Reloader:
    """Runs the services in a child and replaces it with one on the new code after each good change."""

    def __init__(self, spec: str, argv: list[str], env: dict[str, str], *, say: Callable[[str], None]) -> None:
        self.spec = spec
        self.argv = argv
        self.env = env
        self.say = say  # one line for the person at the terminal
        self.folder = folder_of(spec)
        self.services: Services | None = None
        self._changes: AsyncIterator[list[Path]] | None = None
        self._next: asyncio.Future[list[Path]] | None = None

    async def start(self) -> str | None:
        """Start the services; None once they serve, else why not."""
        services = self.services = Services(self.argv, self.env, on_exit=self._exited)
        return await services.start()

    async def watch(self, stop: asyncio.Event) -> None:
        """Start watching the folder (before the services start: no change after this is missed)."""
        self._changes = changes(self.folder, stop)
        self._next = asyncio.ensure_future(anext(self._changes))
        # Its first step makes the OS watch, before its first await (watchfiles.awatch): let it take it.
        for _ in range(3):
            await asyncio.sleep(0)

    async def run(self) -> None:
        """Reload on every batch of changes, until the ``stop`` given to ``watch`` is set."""
        assert self._next is not None
        while True:
            try:
                paths = await self._next
            except StopAsyncIteration:
                return
            await self.reload(shown(paths, self.folder))
            self._next = asyncio.ensure_future(anext(self._changes))

    async def reload(self, what: str) -> None:
        began = time.monotonic()
        if (broken := await check(self.spec, self.env)) is not None:
            running = self.services is not None and self.services.running
            self.say(f"not reloaded after change to {what}: {broken}\n  "
                     + ("the services go on with the code from before" if running else "no services are running")
                     + "; waiting for the next change")
            return
        if self.services is not None:
            await self.services.stop()
        if (why := await self.start()) is not None:
            self.say(f"reload after change to {what} failed: {why}\n  waiting for the next change")
            return
        self.say(f"reloaded after change to {what} ({elapsed(began)})")

    async def close(self) -> None:
        if self._next is not None:
            self._next.cancel()
            await asyncio.gather(self._next, return_exceptions=True)
        if self.services is not None:
            await self.services.stop()

    def _exited(self, code: int) -> None:
        why = self.services.why() if self.services is not None else f"exit status {code}"
        self.say(f"the services stopped: {why}\n  they start again on the next change to a .py file under "
                 f"{self.folder}")


async def check(spec: str, env: dict[str, str]) -> str | None:
    """None if ``spec`` imports and its net validates, in a fresh process; else the error it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "petribus_cli.reload", spec, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), CHECK_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return f"importing the app took longer than {CHECK_TIMEOUT_S:g}s"
    if proc.returncode == 0:
        return None
    return stderr.decode(errors="replace").strip() or f"the check exited with status {proc.returncode}"


async def changes(folder: Path, stop: asyncio.Event) -> AsyncIterator[list[Path]]:
    """Batches of changed ``.py`` files under ``folder``, as the OS reports them, settled for ``DEBOUNCE_MS``."""
    from watchfiles import PythonFilter, awatch

    async for batch in awatch(folder, watch_filter=PythonFilter(), debounce=MAX_DEBOUNCE_MS, step=DEBOUNCE_MS,
                              stop_event=stop, recursive=True):
        yield sorted({Path(path) for _, path in batch})


def folder_of(spec: str) -> Path:
    """The folder whose Python files make up the app: the app file's, or its top package's."""
    module, _, _ = spec.rpartition(":")
    path = Path(module)
    if module.endswith(".py") or path.exists():
        return path.resolve().parent
    import importlib.util

    found = importlib.util.find_spec(module.split(".")[0])
    if found is not None and found.origin:
        return Path(found.origin).resolve().parent  # a package's folder, or a module's
    return Path.cwd()


def shown(paths: list[Path], folder: Path) -> str:
    names = [str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p) for p in paths]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def elapsed(since: float) -> str:
    return f"{time.monotonic() - since:.1f}s"


def main(argv: list[str]) -> int:
    """``python -m petribus_cli.reload APP``: exit 0 if the app imports and its net validates, else say why."""
    from petribus.errors import AppLoadError, NetDefinitionError
    from petribus.loader import load_net

    [spec] = argv
    try:
        load_net(spec)
    except (AppLoadError, NetDefinitionError) as exc:
        print(exc.message, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
