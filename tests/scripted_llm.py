"""A scripted OpenAI-compatible server for the tests: ``POST /v1/chat/completions``, streamed (SSE) or not.

Replies come from rules: ``llm.when("cancel alice", call("UserName", name="alice"), say("Done."))``
makes the requests whose last *user* message contains "cancel alice" get those steps in turn (the
last one repeats), so a correction round (same user message, tool results after it) takes the next
step. A request no rule matches gets ``default`` (a short text). Every request is recorded, with its
headers, for the test to read. ``key`` makes it answer 401 to any other key, echoing the key it got
the way OpenAI does, so a test can check that petribus never repeats it. ``hold`` makes matching
requests wait until the test releases them.

Run it with ``async with ScriptedLLM() as llm:``; ``llm.base_url`` is what ``OPENAI_BASE_URL`` wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}  # every answer's, streamed or not


@dataclass(frozen=True)
class Step:
    """One scripted answer: text and/or tool calls, or an HTTP error."""

    text: str = ""
    calls: tuple[tuple[str, str], ...] = ()  # (tool name, raw JSON arguments)
    status: int = 200
    error: str = ""
    headers: tuple[tuple[str, str], ...] = ()


def say(text: str) -> Step:
    return Step(text=text)


def call(tool: str, raw: str | None = None, /, **arguments: Any) -> Step:
    """One tool call; ``raw`` sends its arguments verbatim (e.g. broken JSON)."""
    return calls((tool, raw if raw is not None else arguments))


def calls(*items: tuple[str, dict[str, Any] | str], text: str = "") -> Step:
    """Several tool calls in one reply."""
    return Step(text=text, calls=tuple((n, a if isinstance(a, str) else json.dumps(a)) for n, a in items))


def fail(status: int, message: str = "scripted failure", **headers: str) -> Step:
    return Step(status=status, error=message, headers=tuple((k.replace("_", "-"), v) for k, v in headers.items()))


@dataclass
class Rule:
    match: str
    steps: list[Step]
    hold: asyncio.Event | None = None
    taken: int = 0

    def next(self) -> Step:
        step = self.steps[min(self.taken, len(self.steps) - 1)]
        self.taken += 1
        return step


@dataclass
class Recorded:
    body: dict[str, Any]
    headers: dict[str, str]
    status: int = 200

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages", [])

    @property
    def system(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] == "system")

    @property
    def last_user(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

    @property
    def tool_names(self) -> list[str]:
        return [t["function"]["name"] for t in self.body.get("tools") or []]


@dataclass
class ScriptedLLM:
    key: str | None = None
    models: tuple[str, ...] = ("gpt-test",)
    default: str = "OK."
    rules: list[Rule] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)  # set at every request
    base_url: str = ""

    def when(self, match: str, *steps: Step, hold: asyncio.Event | None = None) -> Rule:
        rule = Rule(match, list(steps) or [say(self.default)], hold)
        self.rules.append(rule)
        return rule

    def requests_for(self, match: str) -> list[Recorded]:
        return [r for r in self.requests if match in r.last_user]

    async def wait_for(self, pred: Callable[[Recorded], bool]) -> Recorded:
        while True:
            found = next((r for r in self.requests if pred(r)), None)
            if found is not None:
                return found
            self.received.clear()
            await self.received.wait()

    # -- the HTTP side -------------------------------------------------------------------------------

    def app(self, ready: asyncio.Event) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            ready.set()
            yield

        app = FastAPI(lifespan=lifespan)
        ids = itertools.count(1)

        @app.post("/v1/chat/completions")
        async def completions(request: Request) -> Any:
            body = await request.json()
            rec = Recorded(body, dict(request.headers))
            self.requests.append(rec)
            self.received.set()
            got = request.headers.get("authorization", "").removeprefix("Bearer ")
            if self.key is not None and got != self.key:
                rec.status = 401
                return _error(401, f"Incorrect API key provided: {got}. You can find your API key at "
                                   "https://platform.openai.com/account/api-keys.", "invalid_api_key")
            if body.get("model") not in self.models:
                rec.status = 404
                return _error(404, f"The model `{body.get('model')}` does not exist or you do not have "
                                   "access to it.", "model_not_found")
            rule = next((r for r in self.rules if r.match in rec.last_user), None)
            if rule is not None and rule.hold is not None:
                await rule.hold.wait()
            last = rec.messages[-1]["role"] if rec.messages else "user"
            step = rule.next() if rule is not None else say("Done." if last == "tool" else self.default)
            if step.status != 200:
                rec.status = step.status
                return _error(step.status, step.error, "scripted", dict(step.headers))
            cid = f"chatcmpl-{next(ids)}"
            if body.get("stream"):
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return StreamingResponse(_sse(cid, body["model"], step, usage), media_type="text/event-stream")
            return JSONResponse(_completion(cid, body["model"], step))

        return app

    async def __aenter__(self) -> "ScriptedLLM":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self._sock = sock
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        ready = asyncio.Event()
        config = uvicorn.Config(self.app(ready), log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        started = asyncio.create_task(ready.wait())
        await asyncio.wait({started, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            self._task.result()  # it stopped while starting: say why
        return self

    async def __aexit__(self, *exc: object) -> None:
        for rule in self.rules:
            if rule.hold is not None:
                rule.hold.set()  # let held requests finish so the server can stop
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._sock.close()


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _tool_calls(step: Step) -> list[dict[str, Any]]:
    return [{"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}
            for i, (name, args) in enumerate(step.calls)]


def _completion(cid: str, model: str, step: Step) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": step.text or None}
    if step.calls:
        message["tool_calls"] = _tool_calls(step)
    return {
        "id": cid, "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if step.calls else "stop"}],
        "usage": USAGE,
    }


async def _sse(cid: str, model: str, step: Step, usage: bool = False) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        data = {"id": cid, "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(data)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    words = step.text.split(" ")
    for i, word in enumerate(words if step.text else []):
        yield chunk({"content": word if i == 0 else " " + word})
        await asyncio.sleep(0)
    for i, call_ in enumerate(_tool_calls(step)):
        args = call_["function"]["arguments"]
        yield chunk({"tool_calls": [{"index": i, "id": call_["id"], "type": "function",
                                     "function": {"name": call_["function"]["name"], "arguments": ""}}]})
        for j in range(0, len(args), 7):  # arguments arrive in pieces, as they do from OpenAI
            yield chunk({"tool_calls": [{"index": i, "function": {"arguments": args[j:j + 7]}}]})
    yield chunk({}, "tool_calls" if step.calls else "stop")
    if usage:  # as OpenAI sends it for stream_options.include_usage: a last chunk with no choices
        last = {"id": cid, "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [],
                "usage": USAGE}
        yield f"data: {json.dumps(last)}\n\n"
    yield "data: [DONE]\n\n"
