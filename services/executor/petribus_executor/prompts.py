"""``context.prompt`` on the executor side: the question goes into the log, the answer comes from it.

A transition's ``context.prompt(text, wait_for_response, timeout)`` becomes a ``prompt_request`` event
(a new request id), appended through the firing's outbox so it lands after what the transition said
before. The LLM service answers it with the session's context as a ``prompt_response`` with the same
request id (and, for ``wait_for_response=False``, an ``agent_message`` the user sees).

- wait: the first ``prompt_response`` to the request is awaited on an ordered consumer of the session
  (``EventLog.wait_for``: no polling). Its text is returned; an answer with an error raises it in the
  transition. When ``timeout`` passes first, a ``prompt_response`` saying so is appended with the
  Msg-Id the LLM service would use (``prompt:<request event id>``), so the log says how the question
  ended and a late answer does not land beside it; then the transition gets a ``prompt_timeout``.
- no wait: returns ``None`` once the request is in the log.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

from petribus.bus import EventLog
from petribus.errors import PetribusError
from petribus.events import PromptRequest, PromptResponse, _Event
from petribus.work import WorkItem
from petribus_executor.effects import Effects

Append = Callable[[_Event, str], Awaitable[int]]  # the firing's ordered append (event, Msg-Id): its seq


class Prompts:
    def __init__(self, events: EventLog) -> None:
        self.events = events

    async def prompt(self, item: WorkItem, append: Append, effects: Effects, payload: Any) -> str | None:
        text, wait, timeout = _arguments(payload)
        effect = effects.next("prompt")
        rid = effect.id
        ask = PromptRequest(id=rid, bot=item.bot, session_id=item.session_id, request_id=rid,
                            firing_id=item.firing_id, transition=item.transition, text=text, wait=wait,
                            timeout=timeout, cause=item.firing_id, trace=item.trace)
        if effects.landed(effect):
            asked_at = item.fired_seq  # an earlier run asked this: its answer may be in the log already
        else:
            asked_at = await append(ask, effect.key)
            if effects.rerun:
                asked_at = item.fired_seq
        if not wait:
            return None
        got = await self.events.wait_for(
            item.bot, item.session_id, after=asked_at, timeout=timeout,
            match=lambda e: isinstance(e, PromptResponse) and e.request_id == rid,
        )
        answer = got[1] if got is not None else await self._lapse(item, ask, timeout, asked_at)
        assert isinstance(answer, PromptResponse)
        if answer.code == "prompt_timeout":
            raise PetribusError(
                f"context.prompt got no answer from the model within {timeout:g}s; check that an LLM service "
                f"runs for bot {item.bot!r} (petribus llm ...) and its model answers, or raise timeout=",
                code="prompt_timeout", retryable=True)
        if answer.error is not None:
            raise PetribusError(f"context.prompt: {answer.error}", code=answer.code or "llm_error")
        return answer.text

    async def _lapse(self, item: WorkItem, ask: PromptRequest, timeout: float | None,
                     asked_at: int) -> PromptResponse:
        """Time is up: record that as the answer, unless the model's landed first; the answer that counts."""
        lapsed = PromptResponse(bot=item.bot, session_id=item.session_id, request_id=ask.request_id,
                                cause=ask.id, firing_id=item.firing_id, transition=item.transition,
                                code="prompt_timeout", error=f"no answer within {timeout:g}s", trace=item.trace)
        await self.events.append(lapsed, msg_id=f"prompt:{ask.id}")  # the Msg-Id the LLM service answers with
        for _, event in await self.events.read(item.bot, item.session_id, after=asked_at):
            if isinstance(event, PromptResponse) and event.request_id == ask.request_id:
                return event
        return lapsed


def _arguments(payload: Any) -> tuple[str, bool, float | None]:
    if not isinstance(payload, dict) or not isinstance(payload.get("text"), str):
        raise PetribusError(f"context.prompt sent {type(payload).__name__}, not its arguments",
                            code="context_error")
    timeout = payload.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise PetribusError(f"context.prompt(timeout={timeout!r}): give a positive number of seconds or None",
                            code="invalid_input")
    return payload["text"], bool(payload.get("wait", True)), None if timeout is None else float(timeout)
