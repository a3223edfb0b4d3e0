"""Callbacks: each outcome of a firing whose transition has ``callback_url=`` is POSTed there, never
holding the firing up.

``notify`` only puts the callback on a bounded queue and returns; a background task takes it from there
and delivers it, a few at once, so one slow receiver does not delay the others. A delivery that meets a
connection error, a 408/425/429 or a 5xx is tried again after an exponential back-off with jitter (a
429's ``Retry-After`` is honoured within the cap), at most ``attempts`` times and within ``budget_s``;
a read timeout is not tried again, because the receiver may have taken it (Beam's rule: no duplicates).
What is still undelivered then is logged (the URL without its query, the firing, the status, why), never
its payload, which may hold outputs a user considers secret.

The request is Beam's: ``POST`` of ``{"data": <payload>}`` as JSON, with ``X-Task-ID`` (the firing id)
and ``X-Task-Status`` (``COMPLETE`` or ``ERROR``) headers. Beam bots send ``data: {}``; petribus sends
what happened (:func:`outcome_payload`). A full queue drops the new callback with a warning: an
outcome is in the session's log either way, so a callback is a notice, not the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import structlog

log = structlog.get_logger("petribus.executor.callbacks")

RETRY_STATUSES = frozenset({408, 425, 429})
BEAM_STATUS = {"completed": "COMPLETE", "failed": "ERROR"}


def outcome_payload(*, bot: str, session_id: str, firing_id: str, transition: str, attempt: int, final: bool,
                    outputs: Any = None, error: Any = None) -> dict[str, Any]:
    """What a callback says about one outcome: ``status`` is ``completed`` (with ``outputs``, the markers
    by location) or ``failed`` (with ``error``: code and message); ``final`` is False for a failure that
    will be retried, and ``attempt`` counts runs from 1."""
    body: dict[str, Any] = {"bot": bot, "session_id": session_id, "firing_id": firing_id,
                            "transition": transition, "attempt": attempt, "final": final}
    if error is None:
        body.update(status="completed", outputs=outputs if outputs is not None else {})
    else:
        body.update(status="failed", error=error)
    return body


def _shown(url: str) -> str:
    """The URL as logs may show it: no query, fragment or credentials (tokens travel there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Callbacks:
    """A bounded queue of callbacks and the task that delivers them."""

    def __init__(self, *, max_queue: int = 1000, concurrency: int = 16, attempts: int = 4,
                 backoff_s: float = 0.5, backoff_max_s: float = 10.0, budget_s: float = 60.0,
                 connect_timeout_s: float = 10.0, read_timeout_s: float = 30.0) -> None:
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(maxsize=max_queue)
        self._limit = asyncio.Semaphore(concurrency)
        self._attempts = max(1, attempts)
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._budget_s = budget_s
        self._timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self._client: httpx.AsyncClient | None = None
        self._drain: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._closed = False
        self.delivered = 0  # counters, for GET /pools-style reports and tests
        self.failed = 0
        self.dropped = 0

    def __repr__(self) -> str:
        return (f"Callbacks(queued={self._queue.qsize()}, sending={len(self._sending)}, delivered={self.delivered}, "
                f"failed={self.failed}, dropped={self.dropped})")

    def notify(self, url: str, payload: dict[str, Any]) -> None:
        """Queue a POST of ``payload`` to ``url`` and return at once. Call from the event loop's thread."""
        if self._closed:
            self.dropped += 1
            log.warning("callback dropped: callbacks are closed", url=_shown(url), firing_id=payload.get("firing_id"))
            return
        if self._drain is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
            self._drain = asyncio.get_running_loop().create_task(self._run(), name="callbacks")
        try:
            self._queue.put_nowait((url, payload))
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("callback dropped: queue full", url=_shown(url), firing_id=payload.get("firing_id"),
                        queued=self._queue.qsize())

    async def _run(self) -> None:
        while True:
            await self._limit.acquire()  # before taking one, so a callback is never held by this loop alone
            url, payload = await self._queue.get()
            task = asyncio.create_task(self._deliver(url, payload))
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._limit.release()
        self._queue.task_done()

    async def _deliver(self, url: str, payload: dict[str, Any]) -> None:
        assert self._client is not None
        status = str(payload.get("status", ""))
        headers = {"X-Task-ID": str(payload.get("firing_id", "")), "X-Task-Status": BEAM_STATUS.get(status, status),
                   "X-Task-Timestamp": str(int(time.time()))}
        body = {"data": payload}
        started = time.monotonic()
        why = ""
        for attempt in range(1, self._attempts + 1):
            retry_after: float | None = None
            try:
                resp = await self._client.post(url, json=body, headers=headers)
            except httpx.ReadTimeout:
                why = "no answer in time (not sent again: the receiver may have it)"
                break
            except (httpx.TransportError, OSError) as exc:  # refused, reset, DNS, connect timeout
                why = f"{type(exc).__name__}"
            else:
                if resp.is_success:
                    self.delivered += 1
                    return
                why = f"HTTP {resp.status_code}"
                if resp.status_code not in RETRY_STATUSES and resp.status_code < 500:
                    break  # the receiver refused it: sending it again would be refused again
                retry_after = _retry_after(resp.headers.get("retry-after"))
            if attempt == self._attempts:
                break
            delay = min(self._backoff_max_s, self._backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            if retry_after is not None:
                delay = min(self._backoff_max_s, max(delay, retry_after))
            if time.monotonic() - started + delay > self._budget_s:
                why += f"; out of time ({self._budget_s:g}s)"
                break
            await asyncio.sleep(delay)
        self.failed += 1
        log.warning("callback not delivered", url=_shown(url), firing_id=payload.get("firing_id"),
                    session_id=payload.get("session_id"), transition=payload.get("transition"), status=status,
                    attempts=attempt, error=why)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop taking callbacks, deliver what is queued within ``timeout`` seconds, drop the rest (logged)."""
        self._closed = True
        if self._drain is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._queue.join()
        self._drain.cancel()
        left = self._queue.qsize() + len(self._sending)
        for task in list(self._sending):
            task.cancel()
        await asyncio.gather(self._drain, *self._sending, return_exceptions=True)
        if left:
            self.dropped += left
            log.warning("callbacks not delivered at shutdown", count=left, timeout_s=timeout)
        if self._client is not None:
            await self._client.aclose()


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (a number or an HTTP date), if it has one."""
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None
