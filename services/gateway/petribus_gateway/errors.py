"""Our errors as HTTP answers: one body shape (``ErrorBody``), a status per kind of error.

A bus that is down (NATS restarting, a cluster failing over) is the one failure a client should simply
retry: every route answers it with 503 and ``Retry-After``, whether it surfaced as our ``BusError`` or
as a nats-py error that got past the bus helpers. The body never carries the underlying error's text
(subjects, server URLs); that goes to the gateway's log. Anything else unexpected is a 500 with the
same body shape, never a bare traceback.
"""

from __future__ import annotations

import nats.errors
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from nats.js.errors import ServiceUnavailableError

from petribus import logs
from petribus.errors import (
    AlreadyAnswered,
    BusError,
    FileTooLarge,
    InvalidInput,
    PetribusError,
    UnknownBot,
    UnknownRequest,
    UnknownSession,
)
from petribus.deletion import SessionDeleted
from petribus.outage import is_unavailable
from petribus_gateway.auth import Unauthorized
from petribus_gateway.models import ErrorBody

log = logs.get("petribus.gateway")

RETRY_AFTER_S = 2  # a nats-server restart or a fail-over takes about this long to be over
# How long a request rides out an unavailable bus before it is answered 503 (at most
# PETRIBUS_BUS_OUTAGE_S): a fail-over shorter than this is never seen by clients, and a client's
# HTTP timeout (often 30 s) is not reached first.
REQUEST_OUTAGE_S = 10.0
UNAVAILABLE = "bus_unavailable"
STORAGE_FULL = "storage_full"


class InvalidIdempotencyKey(InvalidInput):
    """An ``Idempotency-Key`` (or a WebSocket ``request_id``) that cannot name a request."""

    code = "invalid_idempotency_key"


class IdempotencyKeyReused(InvalidInput):
    """A key already named a different request in this session."""

    code = "idempotency_key_reused"


def bus_failure(exc: BaseException) -> BusError | None:
    """``exc`` as a ``BusError`` when it is the bus failing (ours or nats-py's), else None.

    A ``BusError`` that is retryable, a ``BusUnavailable`` (an outage longer than the bus helpers ride
    out), a timeout, no responders or a lost connection are all "unavailable": retry later.
    """
    if isinstance(exc, BusError):
        if exc.retryable or exc.code == UNAVAILABLE:
            return BusError(str(exc), code=UNAVAILABLE, retryable=True)
        return exc
    if is_unavailable(exc) or isinstance(exc, (ServiceUnavailableError, nats.errors.ConnectionClosedError)):
        return BusError(f"{type(exc).__name__}: {exc}", code=UNAVAILABLE, retryable=True)
    if isinstance(exc, nats.errors.Error):  # an answer (a bad request, a missing stream): not worth a retry
        return BusError(f"NATS refused the request: {exc!r}", code="bus_error", retryable=False)
    return None


def unavailable_message(request: Request) -> str:
    down = "the session log (NATS) is unavailable right now (restarting or failing over)"
    if request.method in ("GET", "HEAD"):
        return f"{down}; nothing was read. Retry in {RETRY_AFTER_S} s"
    if request.method == "DELETE":
        return f"{down}; the session may not be deleted yet. Retry in {RETRY_AFTER_S} s"
    if "idempotency-key" in request.headers:
        return (f"{down}; your request was not confirmed as recorded. Send it again in {RETRY_AFTER_S} s with "
                "the same Idempotency-Key: it is then recorded exactly once")
    return (f"{down}; your request was not confirmed as recorded. Send it again in {RETRY_AFTER_S} s; give it "
            "an Idempotency-Key header (the same on every try) and it is recorded exactly once")


def status_of(exc: PetribusError) -> int:
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, (UnknownBot, UnknownSession, UnknownRequest, SessionDeleted)):
        return 404
    if isinstance(exc, (AlreadyAnswered, IdempotencyKeyReused)):
        return 409
    if isinstance(exc, FileTooLarge):
        return 413
    if isinstance(exc, InvalidIdempotencyKey):
        return 400
    if isinstance(exc, InvalidInput):
        return 422
    if isinstance(exc, BusError):
        return 503 if exc.code == UNAVAILABLE else 500
    return 500


def _bus_answer(request: Request, exc: BaseException, bus: BusError) -> JSONResponse:
    if bus.code == STORAGE_FULL:  # an answer, not an outage: the stream is at its limit (docs/limits.md)
        log.warning("session log full", method=request.method, path=request.url.path, error=repr(exc))
        return JSONResponse(ErrorBody(code=STORAGE_FULL, message=bus.message).model_dump(), status_code=507)
    if bus.code == UNAVAILABLE:
        log.warning("bus unavailable", method=request.method, path=request.url.path, error=repr(exc))
        body = ErrorBody(code=UNAVAILABLE, message=unavailable_message(request))
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
    log.error("bus refused request", method=request.method, path=request.url.path, code=bus.code,
              error=repr(exc))
    body = ErrorBody(code=bus.code, message="the session log refused this request; it was not recorded. "
                     "The gateway's log says why; retrying will not help until that is fixed")
    return JSONResponse(body.model_dump(), status_code=500)


async def _petribus_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PetribusError)
    if isinstance(exc, BusError):
        return _bus_answer(request, exc, bus_failure(exc) or exc)
    status = status_of(exc)
    if status >= 500:
        log.error("request failed", path=request.url.path, code=exc.code, error=exc.message)
    headers = {"WWW-Authenticate": 'Bearer realm="petribus"'} if status == 401 else None
    return JSONResponse(ErrorBody(code=exc.code, message=exc.message).model_dump(), status_code=status,
                        headers=headers)


async def _foreign_error(request: Request, exc: Exception) -> JSONResponse:
    bus = bus_failure(exc)
    if bus is not None:
        return _bus_answer(request, exc, bus)
    log.error("request failed", method=request.method, path=request.url.path, error=repr(exc), exc_info=exc)
    body = ErrorBody(code="internal_error",
                     message="the gateway failed on this request; the gateway's log says why")
    return JSONResponse(body.model_dump(), status_code=500)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    message = f"invalid request: {'; '.join(problems)}; see the request schema at /docs"
    return JSONResponse(ErrorBody(code="invalid_input", message=message).model_dump(), status_code=422)


def install(app: FastAPI) -> None:
    app.add_exception_handler(PetribusError, _petribus_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    # nats-py's errors, and timeouts, that got past the bus helpers: still a 503, never a bare 500.
    app.add_exception_handler(nats.errors.Error, _foreign_error)
    app.add_exception_handler(TimeoutError, _foreign_error)
    app.add_exception_handler(Exception, _foreign_error)
