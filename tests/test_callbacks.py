"""Callbacks against a real local HTTP server: retried until delivered once, never retried when the
receiver refuses, never blocking ``notify``, and no payload in the logs."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import structlog

from petribus_executor.callbacks import Callbacks, outcome_payload

SECRET_OUTPUT = "tok-9Xq2-never-in-a-log"


class Receiver:
    """A local HTTP server answering each path with its scripted statuses in turn, then 200."""

    def __init__(self) -> None:
        self.script: dict[str, list[int]] = {}
        self.requests: list[dict[str, Any]] = []
        self.hold = threading.Event()  # set: requests to /hold wait until released
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver._lock:
                    codes = receiver.script.get(self.path, [])
                    code = codes.pop(0) if codes else 200
                    receiver.requests.append({"path": self.path, "code": code, "body": body,
                                              "headers": dict(self.headers)})
                    receiver._lock.notify_all()
                if self.path == "/hold":
                    receiver.hold.wait()
                self.send_response(code)
                if code == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def to(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]

    def wait_for(self, path: str, code: int, count: int) -> None:
        """Block until ``path`` has been answered ``code`` ``count`` times (run it in a thread)."""
        with self._lock:
            self._lock.wait_for(lambda: sum(r["code"] == code for r in self.to(path)) >= count)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    try:
        yield r
    finally:
        r.hold.set()
        r.server.shutdown()
        r.server.server_close()


def dead_url() -> str:
    """A local port nobody listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook?token=abc"


def outcome(firing: str, **kw: Any) -> dict[str, Any]:
    return outcome_payload(bot="b", session_id="s1", firing_id=firing, transition="t", attempt=1, final=True, **kw)


def fast(**kw: Any) -> Callbacks:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    return Callbacks(**kw)


async def test_failing_twice_then_succeeding_is_delivered_exactly_once(receiver):
    receiver.script = {"/ok": [500, 503], "/limited": [429, 502]}
    cb = fast()
    cb.notify(f"{receiver.url}/ok", outcome("f1", outputs={"B": [{"y": 1}]}))
    cb.notify(f"{receiver.url}/limited", outcome("f2", error={"code": "boom", "message": "no"}))
    await cb.close(timeout=30)

    assert [r["code"] for r in receiver.to("/ok")] == [500, 503, 200]
    assert [r["code"] for r in receiver.to("/limited")] == [429, 502, 200]
    assert (cb.delivered, cb.failed, cb.dropped) == (2, 0, 0)
    done = receiver.to("/ok")[-1]
    assert done["body"] == {"data": {"bot": "b", "session_id": "s1", "firing_id": "f1", "transition": "t",
                                     "attempt": 1, "final": True, "status": "completed",
                                     "outputs": {"B": [{"y": 1}]}}}
    assert (done["headers"]["X-Task-ID"], done["headers"]["X-Task-Status"]) == ("f1", "COMPLETE")
    failed = receiver.to("/limited")[-1]
    assert failed["body"]["data"]["status"] == "failed" and failed["headers"]["X-Task-Status"] == "ERROR"


async def test_a_refusal_is_not_sent_again(receiver):
    receiver.script = {"/bad": [400]}
    cb = fast()
    cb.notify(f"{receiver.url}/bad", outcome("f1"))
    await cb.close(timeout=30)
    assert len(receiver.to("/bad")) == 1
    assert (cb.delivered, cb.failed) == (0, 1)


async def test_giving_up_logs_why_without_payload_or_query(receiver):
    receiver.script = {"/down?token=abc": [500] * 10}
    cb = fast(attempts=3)
    with structlog.testing.capture_logs() as logs:
        cb.notify(f"{receiver.url}/down?token=abc", outcome("f1", outputs={"Key": [{"v": SECRET_OUTPUT}]}))
        cb.notify(dead_url(), outcome("f2", outputs={"Key": [{"v": SECRET_OUTPUT}]}))
        await cb.close(timeout=30)
    assert len(receiver.to("/down?token=abc")) == 3  # attempts, then no more
    assert (cb.delivered, cb.failed) == (0, 2)
    gave_up = [e for e in logs if e["event"] == "callback not delivered"]
    assert {e["firing_id"] for e in gave_up} == {"f1", "f2"}
    assert any(e["error"] == "HTTP 500" for e in gave_up)
    assert any("ConnectError" in e["error"] for e in gave_up)
    assert SECRET_OUTPUT not in repr(logs) and "token=abc" not in repr(logs)


async def test_out_of_budget_stops_retrying(receiver):
    receiver.script = {"/down": [503] * 10}
    cb = fast(attempts=10, backoff_s=1.0, backoff_max_s=1.0, budget_s=0.1)
    with structlog.testing.capture_logs() as logs:
        cb.notify(f"{receiver.url}/down", outcome("f1"))
        await cb.close(timeout=30)
    assert len(receiver.to("/down")) == 1  # the first retry would already overrun the budget
    assert any("out of time" in e.get("error", "") for e in logs)


async def test_notify_never_waits_on_a_dead_or_stuck_receiver(receiver):
    cb = fast(max_queue=5, concurrency=2)
    for i in range(50):  # returns each time; the first few are taken, the rest overflow
        cb.notify(f"{receiver.url}/hold", outcome(f"h{i}"))
    for i in range(50):
        cb.notify(dead_url(), outcome(f"d{i}"))
    assert cb.dropped >= 50 + 50 - 5 - 2  # queue and in-flight hold the rest
    with structlog.testing.capture_logs() as logs:
        await cb.close(timeout=0.2)  # two are stuck at /hold: they are abandoned, not waited for
    receiver.hold.set()
    assert cb.delivered == 0
    assert any(e["event"] == "callbacks not delivered at shutdown" for e in logs)
    cb.notify(f"{receiver.url}/late", outcome("late"))  # after close: dropped, still no error
    assert receiver.to("/late") == []


# --- end to end: the executor calls back once per outcome --------------------------------------------

CALLBACK_APP = '''
from pydantic import BaseModel

from petribus import Bot, BotLocation, TaskPolicy


class Job(BaseModel):
    n: int


class Done(BaseModel):
    n: int


bot = Bot(name="calling", locations=[BotLocation(marker=Job), BotLocation(marker=Done)])


@bot.transition(inputs={Job: 1}, outputs=[Done], callback_url="{url}/hook")
def work(inputs):
    job = inputs[Job][0]
    if job.n < 0:
        raise ValueError("negative job")
    return {Done: [Done(n=job.n)]}
'''


async def test_executor_calls_back_once_per_outcome_through_failing_receivers(
    settings, nc, tmp_path, receiver
):
    from petribus.events import TransitionCompleted, TransitionFailed

    from .harness import Stack
    from .test_llm_openai import Session

    receiver.script = {"/hook": [503, 500]}  # the first outcome's first two tries fail
    app = tmp_path / "calling.py"
    app.write_text(CALLBACK_APP.replace("{url}", receiver.url))
    async with Stack(settings, [f"{app}:bot"], parts=("scheduler", "executor")), \
            Session(nc, bot="calling") as session:
        await session.add("Job", n=7)
        [completed] = await session.until(TransitionCompleted, transition="work")
        await session.add("Job", n=-1)
        [failed] = await session.until(TransitionFailed, transition="work")
        await asyncio.to_thread(receiver.wait_for, "/hook", 200, 2)
    delivered = [r for r in receiver.to("/hook") if r["code"] == 200]
    assert [r["code"] for r in receiver.to("/hook")] == [503, 500, 200, 200]
    by_firing = {r["body"]["data"]["firing_id"]: r for r in delivered}
    assert set(by_firing) == {completed.firing_id, failed.firing_id}  # one delivery per outcome
    ok = by_firing[completed.firing_id]
    assert ok["headers"]["X-Task-Status"] == "COMPLETE" and ok["body"]["data"]["outputs"] == {"Done": [{"n": 7}]}
    bad = by_firing[failed.firing_id]
    assert bad["headers"]["X-Task-Status"] == "ERROR" and "negative job" in bad["body"]["data"]["error"]["message"]
