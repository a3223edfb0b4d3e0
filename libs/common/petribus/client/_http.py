"""The gateway's REST API, retried where a retry is safe, and its errors as ``ClientError``.

Every write that adds to a log goes out with an ``Idempotency-Key`` (a new uuid unless the caller
names one) and is sent again with the same key while the gateway answers 503 (its log is restarting
or failing over) or cannot be reached: it lands once, and a retry of one that had landed gets the
first answer back. Reads are retried the same way. Creating a session takes no key: a retry may leave
an empty session behind, never two with events.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from petribus.client._errors import ClientError, Unavailable, from_answer

RETRIES = 5  # sends of one request after the first, while the gateway or its log is unavailable
BACKOFF_S = 0.5  # times the attempt, when the gateway gives no Retry-After
MAX_WAIT_S = 5.0


def new_key() -> str:
    return uuid.uuid4().hex


class Rest:
    """An ``httpx.AsyncClient`` on the gateway at ``base`` (``http://host:port``)."""

    def __init__(self, base: str, *, headers: Mapping[str, str] | None = None, timeout: float = 60.0) -> None:
        self.base = base.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.base, headers=dict(headers or {}), timeout=timeout)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def call(self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None,
                   key: str | None = None, content: Callable[[], Any] | None = None,
                   headers: Mapping[str, str] | None = None) -> Any:
        """The JSON body of a 2xx answer (None for 204); a ``ClientError`` for anything else.

        ``content`` makes the request body anew for each try (a file opened again).
        """
        sent = dict(headers or {})
        if key is not None:
            sent["Idempotency-Key"] = key
        failure, wait = "", 0.0
        for attempt in range(RETRIES + 1):
            if attempt:
                await asyncio.sleep(wait)
            try:
                if content is None:
                    resp = await self.http.request(method, path, json=json, params=params, headers=sent)
                else:
                    with content() as body:
                        resp = await self.http.request(method, path, content=body, params=params, headers=sent)
            except httpx.TransportError as exc:
                # Nothing sent, or a keyed or read-only request: sending it again is safe.
                if not (isinstance(exc, httpx.ConnectError) or key is not None or method == "GET"):
                    raise Unavailable(f"{method} {path}: {exc!r}; it may or may not have been done",
                                      code="unreachable") from exc
                failure, wait = f"{type(exc).__name__}: {exc}", BACKOFF_S * (attempt + 1)
                continue
            if resp.status_code == 503:
                failure, wait = _message(resp), _retry_after(resp, attempt)
                continue
            if resp.status_code >= 400:
                raise refusal(method, path, resp)
            return None if resp.status_code == 204 or not resp.content else resp.json()
        raise Unavailable(f"{method} {path} failed {RETRIES + 1} times: {failure}")

    def stream(self, method: str, path: str) -> Any:
        return self.http.stream(method, path)


def refusal(method: str, path: str, resp: httpx.Response) -> ClientError:
    """A 4xx or 5xx answer (its body read) as the error to raise."""
    return from_answer(resp.status_code, _code(resp), f"{method} {path}: {_message(resp)}")


def _retry_after(resp: httpx.Response, attempt: int) -> float:
    header = resp.headers.get("Retry-After", "")
    return min(MAX_WAIT_S, float(header)) if header.isdigit() else BACKOFF_S * (attempt + 1)


def _code(resp: httpx.Response) -> str | None:
    try:
        body = resp.json()
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    return f"HTTP {resp.status_code}: {message or resp.text[:300]}"
