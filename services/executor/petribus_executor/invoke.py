"""One run of one transition, inside a worker: inputs built from marker data, the function called
(``context`` passed only where it asks for it), its return value checked against its outputs, and how
it ended (an exception, a cancellation) turned into a plain ``Outcome``.

``run_sync`` runs a ``def`` in the calling thread; ``run_async`` runs an ``async def`` as a coroutine of
the running loop. Neither raises: whatever happens is the outcome (``worker.py`` sends it back).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from petribus.context import BotContext, Channel
from petribus.errors import InvalidInput, PetribusError, TransitionOutputError
from petribus.net import Net, TransitionDef
from petribus_executor import protocol as p
from petribus_executor.failures import describe, error_message


def run_sync(nets: dict[str, Net], req: p.Request, channel: Channel) -> p.Outcome:
    """Run a firing in this thread, to its outcome."""
    started = time.perf_counter()
    try:
        net, t, call = _prepare(nets, req, channel)
        result = call()
        if inspect.isawaitable(result):  # a def that hands back a coroutine
            result = asyncio.run(_await(result))
        return _completed(net, t, result, started)
    except (Exception, SystemExit) as exc:
        return _failed(exc, started)


async def run_async(nets: dict[str, Net], req: p.Request, channel: Channel) -> p.Outcome:
    """Run a firing as a coroutine of the running loop, to its outcome (cancelled is an outcome too)."""
    started = time.perf_counter()
    try:
        net, t, call = _prepare(nets, req, channel)
        result = call()
        if inspect.isawaitable(result):
            result = await result
        return _completed(net, t, result, started)
    except (Exception, SystemExit) as exc:
        return _failed(exc, started)
    except asyncio.CancelledError:
        return cancelled(started)


def _prepare(nets: dict[str, Net], req: p.Request,
             channel: Channel) -> tuple[Net, TransitionDef, Callable[[], Any]]:
    net = nets[req.bot]
    t = net.transition(req.transition)
    inputs = build_inputs(net, t, req.inputs)
    context = BotContext(channel, bot=req.bot, session_id=req.session_id, firing_id=req.firing_id,
                         transition=req.transition)
    invoke = _invoker(t)
    return net, t, lambda: invoke(context, inputs)


def _completed(net: Net, t: TransitionDef, result: Any, started: float) -> p.Outcome:
    outputs = collect_outputs(net, t, result)
    return p.Outcome(ok=True, outputs=outputs, duration_ms=(time.perf_counter() - started) * 1000)


def cancelled(started: float = 0.0) -> p.Outcome:
    """The outcome of a run its executor cancelled."""
    return p.Outcome(ok=False, error="cancelled by its executor", error_type=p.CANCELLED, retryable=True,
                     duration_ms=(time.perf_counter() - started) * 1000 if started else 0.0)


def _failed(exc: BaseException, started: float) -> p.Outcome:
    return p.Outcome(
        ok=False, error=error_message(exc), error_type=type(exc).__name__,
        retryable=exc.retryable if isinstance(exc, PetribusError) else True,
        traceback=describe(exc), duration_ms=(time.perf_counter() - started) * 1000,
    )


async def _await(awaitable: Any) -> Any:
    return await awaitable


def build_inputs(net: Net, t: TransitionDef,
                 markers: tuple[p.InputMarker, ...]) -> dict[type[BaseModel], list[Any]]:
    """``{Model: [instances]}`` in the transition's input order, rebuilt from the markers' data."""
    inputs: dict[type[BaseModel], list[Any]] = {net.locations[loc].model: [] for loc, _ in t.inputs}
    for m in markers:
        model = net.locations[m.location].model
        try:
            inputs.setdefault(model, []).append(model.model_validate(m.data))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]["msg"]
            raise InvalidInput(f"marker {m.id} in {m.location} no longer validates as {model.__name__}: "
                               f"{exc.error_count()} error(s), first: {first}") from None
    return inputs


_invokers: dict[int, Callable[[BotContext, Any], Any]] = {}


def _invoker(t: TransitionDef) -> Callable[[BotContext, Any], Any]:
    """A call of ``t.fn`` that passes ``context`` only where the function asks for it, in its own order."""
    cached = _invokers.get(id(t.fn))
    if cached is not None:
        return cached
    try:
        params = list(inspect.signature(t.fn).parameters.values())
    except (TypeError, ValueError):  # not introspectable: the plain (inputs) form
        params = None
    slots: list[tuple[str, str]] = []  # (how, which): how is "pos" or the keyword to pass it by
    for prm in params if params is not None else ():
        if prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
            continue
        is_context = t.wants_context and (
            prm.name == "context" or prm.annotation is BotContext or prm.annotation == "BotContext"
        )
        which = "context" if is_context else "inputs"
        if any(w == which for _, w in slots):
            continue  # a further parameter with a default: leave it be
        slots.append(("pos" if prm.kind is prm.POSITIONAL_ONLY else prm.name, which))
    if params is None:
        slots = [("pos", "inputs")]

    def invoke(context: BotContext, inputs: Any) -> Any:
        values = {"context": context, "inputs": inputs}
        args = [values[which] for how, which in slots if how == "pos"]
        kwargs = {how: values[which] for how, which in slots if how != "pos"}
        return t.fn(*args, **kwargs)

    _invokers[id(t.fn)] = invoke
    return invoke


def collect_outputs(net: Net, t: TransitionDef, result: Any) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Check a transition's return value against its declared outputs; ``(location, data)`` pairs.

    Accepted: ``None`` (no outputs) or ``{Model: [instances]}``, where a value may also be one instance
    or ``None``. Anything else, an undeclared model or an instance of another type, is an error.
    """
    if result is None:
        return ()
    declared = ", ".join(t.outputs) or "nothing"
    if not isinstance(result, dict):
        raise TransitionOutputError(
            f"transition {t.name!r} returned {type(result).__name__}; return {{Model: [instances]}} "
            f"for its outputs ({declared}) or None"
        )
    out: list[tuple[str, dict[str, Any]]] = []
    for key, value in result.items():
        label = getattr(key, "__name__", repr(key))
        loc = net.location_of(key) if isinstance(key, type) else None
        if loc is None or loc not in t.outputs:
            raise TransitionOutputError(
                f"transition {t.name!r} returned {label} markers, but its outputs are {declared}; "
                f"add {label} to outputs=[...] or stop returning it"
            )
        items = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if not isinstance(item, key):
                raise TransitionOutputError(
                    f"transition {t.name!r} returned a {type(item).__name__} under {label}; "
                    f"the values of {{{label}: [...]}} must be {label} instances"
                )
            try:
                data = key.model_validate(item.model_dump()).model_dump(mode="json")
            except ValidationError as exc:
                raise TransitionOutputError(
                    f"transition {t.name!r} returned an invalid {label}: {exc}"
                ) from None
            out.append((loc, data))
    return tuple(out)
