"""A responder on the ``openai`` SDK: any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp).

The model comes from ``PETRIBUS_LLM_MODEL`` or else ``Bot(model=...)``; the key from ``OPENAI_API_KEY``
and the endpoint from ``OPENAI_BASE_URL`` (a local server needs no key). The key is only ever handed
to the SDK: it is not logged, and an endpoint's error text is redacted before it is logged.

Answering a user's message is a small agent loop:

1. The model gets the system prompt, the conversation and the tools (``prompt.py``, ``tools.py``).
2. Every tool call it makes is checked with the marker's model (a ``transfer_to_<bot>`` call proposes
   a hand-off to that bot instead, at most one per bot). Each gets a tool result (accepted,
   or the validation error) and the model is asked again, so it can correct a bad call or say what it
   did. Bad calls go back at most ``PETRIBUS_LLM_MAX_CORRECTIONS`` times; then the user is told, in
   the reply, what could not be added and why.
3. The reply is streamed: every piece of text goes to ``on_delta`` as it comes, and the pieces add up
   to the final text.

A transition's prompt gets the same context without tools: one answer in text, streamed only when it
is shown to the user.

Failures: timeouts, connection errors, 408/409/429 and 5xx are retried with exponential backoff
(``Retry-After`` honoured, bounded) up to ``PETRIBUS_LLM_MAX_RETRIES`` times; the SDK's own retries
are off so that this is the one policy. A bad key, a missing model, a refused permission or a bad
request are not retried: they raise an ``LLMError`` that says what to check.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import openai
from openai import AsyncOpenAI

from petribus import logs, metrics, tracing
from petribus.net import Net
from petribus.settings import Settings

from petribus_llm import prompt, tools
from petribus_llm.conversation import Conversation
from petribus_llm.errors import (
    LLMAuthError,
    LLMBadRequest,
    LLMError,
    LLMModelNotFound,
    LLMPermissionError,
    LLMUnavailable,
    endpoint,
    redact,
)
from petribus_llm.responder import Ask, OnDelta, ProposedHandoff, ProposedMarker, Reply

RETRY_STATUSES = {408, 409, 429}
BACKOFF_S = 0.5
MAX_BACKOFF_S = 20.0
NO_KEY = "no-key"  # local servers take any key; the SDK insists on one


@dataclass
class Completion:
    text: str = ""
    calls: list[tools.ToolCall] = field(default_factory=list)
    usage: Any = None  # the endpoint's token counts (CompletionUsage), when it reported them


class Speaker:
    """The reply being written: its text so far, with each new piece handed to ``on_delta``."""

    def __init__(self, on_delta: OnDelta | None) -> None:
        self.on_delta = on_delta
        self.text = ""
        self._gap = ""  # goes in front of the next piece: separates what two model calls said

    async def say(self, piece: str) -> None:
        if not piece:
            return
        if self.text:
            piece = self._gap + piece
        self._gap = ""
        offset = len(self.text)
        self.text += piece
        if self.on_delta is not None:
            await self.on_delta(piece, offset)

    def paragraph(self) -> None:
        self._gap = "\n\n"

    def rewind(self, mark: int) -> None:
        """A retried call says its part again from ``mark``."""
        self.text = self.text[:mark]


class OpenAIResponder:
    def __init__(self, settings: Settings, net: Net, *, backoff_s: float = BACKOFF_S,
                 max_backoff_s: float = MAX_BACKOFF_S) -> None:
        self.model = settings.llm_model or net.model or ""
        self.bot = net.bot
        secret = net.api_key or settings.openai_api_key  # the bot's own endpoint first (Beam's Bot(api_key=))
        key = secret.get_secret_value() if secret else None
        base_url = net.base_url or settings.openai_base_url
        self._secrets = (key,) if key else ()
        self.where = endpoint(base_url)
        self.client = AsyncOpenAI(api_key=key or NO_KEY, base_url=base_url or None,
                                  max_retries=0, timeout=settings.llm_timeout_s)
        self.tools = tools.for_net(net)
        self.budget = settings.llm_context_chars
        self.max_retries = max(0, settings.llm_max_retries)
        self.max_corrections = max(0, settings.llm_max_corrections)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.log = logs.get("petribus.llm").bind(bot=net.bot, model=self.model, endpoint=self.where)

    def __repr__(self) -> str:
        return f"OpenAIResponder(model={self.model!r}, endpoint={self.where!r})"

    async def aclose(self) -> None:
        await self.client.close()

    async def respond(self, net: Net, conversation: Conversation, ask: Ask,
                      on_delta: OnDelta | None) -> Reply:
        messages = prompt.messages(net, conversation, ask, budget=self.budget)
        speaker = Speaker(on_delta if ask.shown else None)
        if ask.kind == "prompt":
            await self._traced_call(messages, None, speaker)
            return Reply(speaker.text)
        markers: list[ProposedMarker] = []
        handoffs: list[ProposedHandoff] = []
        corrections = 0
        for _ in range(self.max_corrections + 3):  # a correction round per allowed correction, and room to finish
            done = await self._traced_call(messages, self.tools, speaker)
            if not done.calls:
                break
            messages.append({"role": "assistant", "content": done.text or None, "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in done.calls]})
            failed: list[tools.Rejected] = []
            for call in done.calls:
                outcome = tools.check(net, call, ask.text)
                if isinstance(outcome, tools.Rejected):
                    failed.append(outcome)
                    result = tools.rejected(outcome)
                elif isinstance(outcome, ProposedHandoff):
                    if all(h.bot != outcome.bot for h in handoffs):  # one hand-off per bot per message
                        handoffs.append(outcome)
                    result = tools.accepted(outcome)
                else:
                    markers.append(outcome)
                    result = tools.accepted(outcome)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
            if failed:
                corrections += 1
                self.log.info("tool call refused", corrections=corrections,
                              problems=[f"{r.call.name}: {r.problem}" for r in failed])
                if corrections > self.max_corrections:
                    speaker.paragraph()
                    await speaker.say(tools.explain(failed))
                    break
            speaker.paragraph()
        if not speaker.text:  # the model only called tools: say what was done
            added = ", ".join(f"{m.location} {json.dumps(m.data, ensure_ascii=False)}" for m in markers)
            handed = " and ".join(h.bot for h in handoffs)
            said = " ".join(([f"Added {added}."] if markers else [])
                            + ([f"I handed your request over to {handed}."] if handoffs else []))
            await speaker.say(said or "I have nothing to add.")
        return Reply(speaker.text, tuple(markers), tuple(handoffs))

    async def _traced_call(self, messages: list[dict[str, Any]], tool_defs: list[dict[str, Any]] | None,
                           speaker: Speaker) -> Completion:
        """``_call`` in a span (tracing on): the model, the latency and the token counts the endpoint
        reported; what was said only with ``PETRIBUS_TRACE_CONTENT=1``."""
        if not tracing.active():
            return await self._call(messages, tool_defs, speaker)
        with tracing.span(f"chat {self.model}", kind="client", attributes={
                "gen_ai.operation.name": "chat", "gen_ai.system": "openai",
                "gen_ai.request.model": self.model, "server.address": self.where, "petribus.llm.streamed": speaker.on_delta is not None,
                "petribus.llm.tools": len(tool_defs or ())}) as span:
            started = time.perf_counter()
            done = await self._call(messages, tool_defs, speaker)
            span.set_attributes({"petribus.llm.latency_ms": round((time.perf_counter() - started) * 1000, 3),
                                 "petribus.llm.tool_calls": len(done.calls)})
            if done.usage is not None:  # the endpoint's counts, when it sent them
                span.set_attributes({"gen_ai.usage.input_tokens": done.usage.prompt_tokens,
                                     "gen_ai.usage.output_tokens": done.usage.completion_tokens})
            if tracing.content():
                sent = json.dumps(messages, ensure_ascii=False)
                span.set_attributes({"gen_ai.input.messages": _bounded(sent),
                                     "gen_ai.output.text": _bounded(done.text)})
            return done

    async def _call(self, messages: list[dict[str, Any]], tool_defs: list[dict[str, Any]] | None,
                    speaker: Speaker) -> Completion:
        """One model call, retried on transient failures; text goes through ``speaker``."""
        for attempt in range(self.max_retries + 1):
            mark = len(speaker.text)
            started = time.perf_counter()
            try:
                if speaker.on_delta is not None:
                    done = await self._stream(messages, tool_defs, speaker)
                else:
                    done = await self._once(messages, tool_defs)
                    await speaker.say(done.text)
                metrics.llm_request(self.bot, self.model, started, done.usage)
                return done
            except openai.APIError as exc:
                metrics.llm_request(self.bot, self.model, started, ok=False)
                failure = self._convert(exc)
                if not failure.retryable:
                    self.log.warning("model call failed", code=failure.code, **self._describe(exc))
                    raise failure from None
                if attempt == self.max_retries:
                    self.log.error("model call failed; no retries left", attempts=attempt + 1,
                                   **self._describe(exc))
                    raise failure from None
                delay = self._delay(attempt, exc)
                self.log.warning("model call failed; retrying", attempt=attempt + 1, delay_s=round(delay, 2),
                                 **self._describe(exc))
                speaker.rewind(mark)
                await asyncio.sleep(delay)  # backoff before the retry
        raise AssertionError("unreachable")

    async def _once(self, messages: list[dict[str, Any]], tool_defs: list[dict[str, Any]] | None) -> Completion:
        kwargs: dict[str, Any] = {"tools": tool_defs} if tool_defs else {}
        response = await self.client.chat.completions.create(model=self.model, messages=messages,  # type: ignore[arg-type]
                                                             **kwargs)
        if not response.choices:
            return Completion(usage=response.usage)
        message = response.choices[0].message
        calls = [tools.ToolCall(c.id, c.function.name, c.function.arguments or "")
                 for c in (message.tool_calls or []) if getattr(c, "function", None) is not None]
        return Completion(message.content or "", calls, response.usage)

    async def _stream(self, messages: list[dict[str, Any]], tool_defs: list[dict[str, Any]] | None,
                      speaker: Speaker) -> Completion:
        kwargs: dict[str, Any] = {"tools": tool_defs} if tool_defs else {}
        stream = await self.client.chat.completions.create(model=self.model, messages=messages,  # type: ignore[arg-type]
                                                           stream=True, stream_options={"include_usage": True},
                                                           **kwargs)
        text: list[str] = []
        usage = None  # the last chunk's, with no choices, when the endpoint honours include_usage
        parts: dict[int, dict[str, str]] = {}  # tool call index -> id, name, arguments so far
        async with stream:
            async for chunk in stream:
                usage = chunk.usage or usage
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                if delta.content:
                    text.append(delta.content)
                    await speaker.say(delta.content)
                for piece in delta.tool_calls or []:
                    part = parts.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                    if piece.id:
                        part["id"] = piece.id
                    if piece.function is not None:
                        part["name"] += piece.function.name or ""
                        part["arguments"] += piece.function.arguments or ""
        calls = [tools.ToolCall(p["id"] or f"call_{i}", p["name"], p["arguments"])
                 for i, p in sorted(parts.items())]
        return Completion("".join(text), calls, usage)

    def _convert(self, exc: openai.APIError) -> LLMError:
        """Our error for an SDK error: what failed and what to check, never the key."""
        model, where = self.model, self.where
        if isinstance(exc, openai.APITimeoutError):
            return LLMUnavailable(f"the model at {where} did not answer in time; check that it is up and not "
                                  "overloaded (or raise PETRIBUS_LLM_TIMEOUT_S), then send your message again")
        if isinstance(exc, openai.APIConnectionError):
            return LLMUnavailable(f"cannot reach the model at {where}; check OPENAI_BASE_URL and that the "
                                  "server is running, then send your message again")
        status = getattr(exc, "status_code", None)
        if isinstance(exc, openai.AuthenticationError):
            return LLMAuthError(f"the model endpoint {where} refused the API key (HTTP 401); check "
                                "OPENAI_API_KEY where the LLM service runs (and OPENAI_BASE_URL for a local server)")
        if isinstance(exc, openai.PermissionDeniedError):
            return LLMPermissionError(f"the model endpoint {where} does not let this API key use model "
                                      f"{model!r} (HTTP 403); check the key's project and its model access")
        if isinstance(exc, openai.NotFoundError):
            return LLMModelNotFound(f"the model endpoint {where} has no model {model!r} (HTTP 404); check "
                                    "Bot(model=...) or PETRIBUS_LLM_MODEL, and that OPENAI_BASE_URL ends in /v1")
        if isinstance(exc, openai.RateLimitError) or status in RETRY_STATUSES or (status or 0) >= 500:
            what = "rate limited the requests (HTTP 429)" if status == 429 else f"kept failing (HTTP {status})"
            return LLMUnavailable(f"the model at {where} {what} after {self.max_retries + 1} tries; check its "
                                  "status and your quota, then send your message again")
        if isinstance(exc, openai.APIStatusError):
            detail = redact(str(getattr(exc, "message", "") or ""), self._secrets)[:300]
            return LLMBadRequest(f"the model endpoint {where} rejected the request (HTTP {status}: {detail}); "
                                 f"check that model {model!r} supports tool calls and that the conversation "
                                 "fits its context (PETRIBUS_LLM_CONTEXT_CHARS)")
        return LLMError(f"the model at {where} sent an answer petribus could not read "
                        f"({type(exc).__name__}); check that it is OpenAI-compatible")

    def _describe(self, exc: openai.APIError) -> dict[str, Any]:
        """Log fields for an SDK error, with any secret taken out of the endpoint's words."""
        return {"error_type": type(exc).__name__, "status": getattr(exc, "status_code", None),
                "detail": redact(str(getattr(exc, "message", "") or ""), self._secrets)[:500]}

    def _delay(self, attempt: int, exc: openai.APIError) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        response = getattr(exc, "response", None)
        if response is not None:
            hint = _retry_after(response.headers)
            if hint is not None:
                return min(self.max_backoff_s, hint)
        return base * (0.5 + random.random() / 2)  # jitter: many sessions don't retry in step


def _bounded(text: str, limit: int = 16_384) -> str:
    """Text for a span attribute: collectors refuse (or cut) very long ones."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            return max(0.0, float(raw) / scale)
        except ValueError:
            return None
    return None
