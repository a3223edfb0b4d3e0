"""Our errors as HTTP answers: one body shape (``ErrorBody``), a status per kind of error."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

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
from petribus_gateway.models import ErrorBody

log = logs.get("petribus.gateway")


def status_of(exc: PetribusError) -> int:
    if isinstance(exc, (UnknownBot, UnknownSession, UnknownRequest)):
        return 404
    if isinstance(exc, AlreadyAnswered):
        return 409
    if isinstance(exc, FileTooLarge):
        return 413
    if isinstance(exc, InvalidInput):
        return 422
    if isinstance(exc, BusError):
        return 503
    return 500


async def _petribus_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PetribusError)
    status = status_of(exc)
    if status >= 500:
        log.error("request failed", path=request.url.path, code=exc.code, error=exc.message)
    return JSONResponse(ErrorBody(code=exc.code, message=exc.message).model_dump(), status_code=status)


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
