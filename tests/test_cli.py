"""``petribus`` as a user runs it: a subprocess, its printed URLs, its chat on a pipe, its exit codes."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .harness import Client

PETRIBUS = str(Path(sys.executable).parent / "petribus")
EXAMPLES = Path(__file__).parent.parent / "examples"
ORDER_BOT = f"{EXAMPLES / 'order_bot.py'}:bot"
START_S = 60.0  # a cold start forks the executor's workers; generous so a loaded machine doesn't flake


class Petribus:
    """A ``petribus`` subprocess. Its stdout is read by a thread, so every wait is bounded."""

    def __init__(self, args: list[str], *, cwd: Path, env: dict[str, str] | None = None,
                 stdin: bool = False) -> None:
        self.stderr_path = cwd / f"stderr-{time.monotonic_ns()}.log"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [PETRIBUS, *args], cwd=cwd, env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})},
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=stderr, text=True, encoding="utf-8",
            )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def output(self) -> str:
        stderr = self.stderr_path.read_text(errors="replace")[-4000:]
        return "\n".join(self.lines) + f"\n--- stderr ---\n{stderr}"

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first line (from the last one matched on) that matches ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        for line in self.lines[getattr(self, "_seen", 0):]:
            self._seen = self.lines.index(line) + 1
            if m := rx.search(line):
                return m
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                rc = self.proc.wait()
                pytest.fail(f"petribus exited ({rc}) before printing {pattern!r}:\n{self.output()}")
            self.lines.append(line)
            self._seen = len(self.lines)
            if m := rx.search(line):
                return m
        pytest.fail(f"no line matching {pattern!r} within {timeout}s:\n{self.output()}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the exit, and keep what it printed until then in ``lines``."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"petribus did not exit within {timeout}s:\n{self.output()}")
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        self._queue.put(None)  # wait() may be called again
        return rc


@pytest.fixture
def petribus(tmp_path: Path) -> Iterator:
    """Start ``petribus`` subprocesses; whatever is still running at the end is stopped, then killed."""
    started: list[Petribus] = []

    def start(*args: str, **kwargs) -> Petribus:
        p = Petribus([str(a) for a in args], cwd=tmp_path, **kwargs)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc.stdin is not None and not p.proc.stdin.closed:
            p.proc.stdin.close()
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
            try:
                p.proc.wait(15)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
    _kill_leftovers(tmp_path)


def _kill_leftovers(tmp_path: Path) -> None:
    """A petribus killed hard leaves its embedded nats-server (own session) behind: find it by its store."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "nats-server" in cmdline and str(tmp_path) in cmdline:
            os.kill(int(proc.name), signal.SIGKILL)


def _refuses(url: str) -> bool:
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return True
    return False


async def test_serve_headless_runs_the_bot_and_sessions_survive_a_restart(petribus, tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg")}  # the default data folder, kept between runs
    first = petribus("serve", ORDER_BOT, "--no-chat", "--port", "0", "--workers", "2", env=env)
    ws_url = first.wait_for(r"WebSocket\s+(ws://\S+/ws)", START_S).group(1)
    nats_url = first.wait_for(r"NATS\s+(nats://\S+)").group(1)
    assert not ws_url.endswith(":0/bots/order_bot/ws"), "port 0 must be reported as the real port"
    rival = petribus("serve", ORDER_BOT, "--no-chat", "--port", "0", env=env)
    assert rival.wait() == 1 and "is in use by petribus serve" in rival.output(), "two servers on one store"

    client = await Client.connect(ws_url)
    session_id = (await client.until("session_created"))["value"]
    await client.send({"type": "marker_added", "value": {"location": "UserName", "data": {"name": "alice"}}})
    done = await client.until(lambda e: e["type"] == "transition_completed"
                              and e["metadata"]["transition_name"] == "offer_refund", timeout=60)
    assert done["value"]["outputs"][0]["data"] == {"message": "refund_offered"}
    await client.close()

    assert first.stop() == 0, first.output()
    assert _refuses(nats_url), "the embedded nats-server outlived petribus"
    assert (tmp_path / "xdg" / "petribus" / "nats" / "jetstream").is_dir()

    second = petribus("serve", ORDER_BOT, "--no-chat", "--port", "0", "--workers", "1", env=env)
    http = second.wait_for(r"REST API\s+(http://\S+)/docs", START_S).group(1)
    listed = httpx.get(f"{http}/bots/order_bot/sessions", timeout=10).json()
    sessions = {s["session_id"]: s["events"] for s in listed["sessions"]}
    assert session_id in sessions and sessions[session_id] >= 8, listed
    assert second.stop() == 0, second.output()


def _children(pid: int, marker: str) -> list[int]:
    """Pids of the processes whose parent is ``pid`` and whose command line holds ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid and marker in cmdline:
            found.append(int(proc.name))
    return found


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie counts as gone: it runs nothing
            if (Path("/proc") / str(pid) / "stat").read_text().split(") ")[1].startswith("Z"):
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


async def test_serve_runs_its_executor_as_a_child_that_never_outlives_it(petribus, tmp_path):
    first = petribus("serve", ORDER_BOT, "--no-chat", "--port", "0", "--workers", "1",
                     "--data-dir", tmp_path / "one")
    first.wait_for(r"WebSocket\s+(ws://\S+/ws)", START_S)
    [child] = _children(first.proc.pid, "petribus_executor")
    assert first.stop() == 0, first.output()
    assert _gone(child, 15), "a stopped serve left its executor running"

    second = petribus("serve", ORDER_BOT, "--no-chat", "--port", "0", "--workers", "1",
                      "--data-dir", tmp_path / "two")
    second.wait_for(r"WebSocket\s+(ws://\S+/ws)", START_S)
    [child] = _children(second.proc.pid, "petribus_executor")
    second.proc.kill()  # SIGKILL: serve gets no chance to stop anything
    second.proc.wait()
    assert _gone(child, 30), "an executor outlived the serve that was killed under it"


async def test_chat_on_a_pipe_adds_a_marker_and_resumes_the_session(petribus, tmp_path):
    data = tmp_path / "data"
    chat = petribus("serve", ORDER_BOT, "--port", "0", "--workers", "2", "--data-dir", data, stdin=True)
    chat.wait_for(r"logs\s+\S+petribus\.log", START_S)
    session_id = chat.wait_for(r"^\[session_created\] (\S+)", 30).group(1)
    chat.send('/add UserName {"name": "alice"}')
    chat.wait_for(r'^\[marker_added\] UserName \{"name": "alice"\}', 30)
    chat.wait_for(r"^\[transition_started\] cancel_order", 30)
    chat.wait_for(r"^🤖 Order cancelled for alice", 30)
    chat.wait_for(r'^\[transition_completed\] cancel_order → OrderStatus '
                  r'\{"message": "order_cancelled for alice"\}')
    chat.send("/quit")
    assert chat.wait() == 0, chat.output()
    assert f"--session {session_id}" in chat.output()
    # Service logs went to the file, not between the chat's lines.
    assert not any("level=" in line for line in chat.lines), chat.output()
    assert "llm service started" in (data / "logs" / "petribus.log").read_text()

    again = petribus("serve", ORDER_BOT, "--port", "0", "--workers", "1", "--data-dir", data,
                     "--session", session_id, stdin=True)
    again.wait_for(r"^🤖 Order cancelled for alice", START_S)  # the history, replayed
    again.send("hello?")
    again.wait_for(r"^🤖 I'm running without a language model", 30)  # the offline LLM says what it can do
    again.wait_for(r'^\s+/add UserName \{"name": "\.\.\."\}', 5)
    again.proc.stdin.close()  # end of input leaves like /quit
    assert again.wait() == 0, again.output()


async def test_one_command_per_service_makes_one_deployment(petribus, nats_server, tmp_path):
    with socket.socket() as sock:  # the standalone gateway logs its URL; a known port is simpler to find
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = ["--nats-url", nats_server.url]
    services = [
        petribus("scheduler", ORDER_BOT, *url),
        petribus("executor", ORDER_BOT, *url, "--workers", "1"),
        petribus("llm", ORDER_BOT, *url, "--log-format", "json"),
        petribus("gateway", ORDER_BOT, *url, "--port", port),
    ]
    client = None
    deadline = time.monotonic() + START_S
    while client is None:  # the gateway is up when it accepts a session
        try:
            client = await Client.connect(f"ws://127.0.0.1:{port}/bots/order_bot/ws")
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail("the gateway never listened:\n" + services[-1].output())
            await asyncio.sleep(0.2)
    await client.send({"type": "user_message", "value": '/add UserName {"name": "carol"}'})
    said = await client.until(lambda e: e["type"] == "agent_message" and "carol" in e["value"]
                              and e["metadata"]["transition_name"] == "cancel_order", timeout=60)
    assert said["value"] == "Order cancelled for carol"
    await client.close()
    for service in services:
        service.proc.send_signal(signal.SIGTERM)
    assert [s.wait() for s in services] == [0, 0, 0, 0], "\n".join(s.output() for s in services)


class _Lines:
    """What a chat prints, one line at a time, awaitable (a file for its rich Console)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._new = asyncio.Condition()
        self._partial = ""

    def write(self, text: str) -> int:
        *done, self._partial = (self._partial + text).split("\n")
        self.lines.extend(done)
        if done:
            asyncio.get_running_loop().create_task(self._notify())
        return len(text)

    def flush(self) -> None:
        pass

    async def _notify(self) -> None:
        async with self._new:
            self._new.notify_all()

    async def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        rx = re.compile(pattern)
        async with asyncio.timeout(timeout), self._new:
            while True:
                for line in self.lines:
                    if m := rx.search(line):
                        return m
                await self._new.wait()


async def test_chat_reconnects_with_since_and_misses_nothing(settings):
    from rich.console import Console

    from petribus.chat import Chat
    from petribus.loader import load_net
    from petribus_gateway.app import Gateway

    with socket.socket() as sock:  # a fixed port, so the restarted gateway is where the chat left it
        sock.bind(("127.0.0.1", 0))
        settings = settings.model_copy(update={"port": sock.getsockname()[1]})
    net = load_net(ORDER_BOT)
    shown = _Lines()
    typed: asyncio.Queue[str | None] = asyncio.Queue()

    async def lines():
        while (line := await typed.get()) is not None:
            yield line

    gateway = Gateway(settings, [net])
    await gateway.start()
    chat = Chat(gateway.url.replace("http://", "ws://"), net.bot,
                console=Console(file=shown, soft_wrap=True, markup=False, emoji=False))
    talking = asyncio.create_task(chat.run(lines()))
    try:
        session_id = (await shown.wait_for(r"^\[session_created\] (\S+)")).group(1)
        typed.put_nowait("before")
        await shown.wait_for(r"^\[user_message\] before$")
        await gateway.stop()  # closes the chat's socket (1012): the chat retries
        await shown.wait_for(r"^\[reconnecting\]")
        gateway = Gateway(settings, [net])
        await gateway.start()
        typed.put_nowait("after")
        await shown.wait_for(r"^\[user_message\] after$")
        typed.put_nowait(None)
        assert await asyncio.wait_for(talking, 20) == session_id
    finally:
        talking.cancel()
        await gateway.stop()
    # Notices about the connection come and go with timing; the session's events must be exactly these.
    events = [line for line in shown.lines if not line.startswith(("[reconnecting]", "[resending]"))]
    assert events == [f"[session_created] {session_id}", "[user_message] before", "[user_message] after"]


@pytest.mark.parametrize(("args", "rc", "says"), [
    (["serve", "no/such/app.py:bot", "--no-chat"], 2, "app file 'no/such/app.py' does not exist"),
    (["serve", f"{EXAMPLES / 'order_bot.py'}:nobot", "--no-chat"], 2, "'nobot' is missing"),
    (["llm", "bad_net.py:bot"], 2, "3 problem(s)"),
    (["scheduler", ORDER_BOT, "--nats-url", "nats://127.0.0.1:1"], 3, "cannot reach NATS at nats://127.0.0.1:1"),
])
def test_bad_invocations_exit_with_one_clear_message(tmp_path, args, rc, says):
    (tmp_path / "bad_net.py").write_text(
        "from pydantic import BaseModel\nfrom petribus import Bot, BotLocation\n"
        "class A(BaseModel):\n    x: int\nclass B(BaseModel):\n    y: int\n"
        "bot = Bot(locations=[BotLocation(marker=A)])\n"
        "@bot.transition(inputs={A: 0}, outputs=[B], cpu=-1)\ndef t(inputs):\n    return {}\n"
    )
    done = subprocess.run([PETRIBUS, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg")})
    assert done.returncode == rc, done
    assert says in done.stderr and done.stderr.startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_petribus_has_the_secrets_commands() -> None:
    done = subprocess.run([sys.executable, "-m", "petribus_cli", "secrets", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert all(command in done.stdout for command in ("set", "list", "delete"))


def test_version_and_out_of_range_ports():
    from importlib.metadata import version

    from typer.testing import CliRunner

    from petribus_cli.main import app as cli

    shown = CliRunner().invoke(cli, ["--version"])
    assert shown.exit_code == 0 and shown.output.strip() == f"petribus {version('petribus')}"
    for how in (["serve", "examples/order_bot.py:bot", "--port", "99999"], ["gateway", "examples/order_bot.py:bot"]):
        env = {"PETRIBUS_PORT": "70000"} if "--port" not in how else {}
        refused = CliRunner().invoke(cli, how, env=env)
        assert refused.exit_code == 2, refused.output  # refused before anything starts, not a silent other port
        assert "65535" in refused.output and "--port" in refused.output
