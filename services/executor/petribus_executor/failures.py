"""What a failed run tells its user: where it failed (a traceback) and what it consumed (its inputs).

A ``transition_failed`` event carries both, so a user sees the state at the time of the error and can
fork the session from before the failure once the code is fixed (docs/debugging.md).

**The traceback** is made in the worker, where the exception and its frames are (``describe``):

- The frames on the way into the transition (the worker, ``invoke.py``, ``asyncio.run`` for a ``def``
  that returns a coroutine) are left out: it starts at the user's function. Frames the user's code calls into, petribus's included, stay. A
  failure with no frame of the user's (a marker that no longer validates) keeps petribus's frames.
- The user's frames show their local variables, each ``repr`` cut short (``reprlib``), so that a
  failure shows the values it failed on. Library and standard-library frames show none.
- Bounded: at most ``MAX_FRAMES`` frames per exception (the outermost few and the innermost rest, with
  "… N frames left out" between), at most ``MAX_CHAINED`` chained exceptions, and ``MAX_CHARS``
  characters in all (the start and the end kept, the middle left out, saying how much).
- Secret values masked: every value the worker's profile holds as a secret is replaced by ``***``,
  in a local's value before its ``repr`` is cut short (so that no prefix of a secret survives), and in
  the text as a whole. Nothing else of the environment is shown: the worker's environment is not part
  of any frame, and its variables are not locals.

The executor masks again (``mask``) with what it knows, the profile's secrets and the model key if it
has one, on the error message too: a container's worker or a message made from a secret is covered
the same way.

**The inputs** are the markers the firing consumed (``WorkItem.inputs``). The event must fit in one
message of the bus: when they do not, ``fitted`` keeps the markers that fit, in order, and the
error message says how many were left out (the ``transition_fired`` event names them all).
"""

from __future__ import annotations

import json
import os
import reprlib
import sys
import traceback
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from petribus.events import Marker, _Event, encode

MASK = "***"
MAX_FRAMES = 30  # per exception: the first HEAD_FRAMES and the innermost rest
HEAD_FRAMES = 5
MAX_CHAINED = 3  # exceptions of a chain (raise ... from ..., or during handling of another)
MAX_CHARS = 8192  # the whole traceback
MAX_ERROR_CHARS = 4096  # the error message (str of the exception)
MAX_LOCALS = 25  # local variables shown per frame

_INTERNAL = tuple(str(Path(m).resolve().parent) + os.sep for m in (
    __file__, sys.modules["petribus"].__file__ or "",
))
_LIBRARY = tuple({str(Path(p).resolve()) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})

E = TypeVar("E", bound=_Event)

_hidden: tuple[str, ...] = ()  # this worker's secret values (its profile's) in every form masked, longest first


def hide(values: Iterable[str]) -> None:
    """In a worker, at boot: the secret values its tracebacks must never show."""
    global _hidden
    _hidden = _forms(values)


def mask(text: str, values: Iterable[str] | None = None) -> str:
    """``text`` with every occurrence of each secret value replaced by ``***`` (``values``; by default this
    worker's), as written and as a ``repr`` or JSON writes it, once or twice over (a repr of an exception
    whose message is a repr)."""
    for form in (_hidden if values is None else _forms(values)):
        if form in text:
            text = text.replace(form, MASK)
    return text


def bound(text: str, limit: int, *, keep_head: int | None = None) -> str:
    """``text`` cut to about ``limit`` characters: its start and its end, saying how much is left out."""
    if len(text) <= limit:
        return text
    head = limit // 8 if keep_head is None else keep_head
    tail = limit - head
    left_out = len(text) - head - tail
    return f"{text[:head]}\n… {left_out:,} characters left out …\n{text[len(text) - tail:]}"


def describe(exc: BaseException) -> str:
    """The traceback of a failed run, as the user should see it (see the module's docstring); never raises."""
    try:
        text = "".join(_format_chain(exc))
    except Exception:  # a repr that raised oddly, no memory left: the plain form is better than none
        try:
            text = "".join(traceback.format_exception(exc, limit=-MAX_FRAMES))
        except Exception:
            return f"{type(exc).__name__} (its traceback could not be formatted)"
    return bound(mask(text), MAX_CHARS)


def error_message(exc: BaseException) -> str:
    """``str(exc)`` (or its type's name), masked and bounded."""
    try:
        text = str(exc) or type(exc).__name__
    except Exception:
        text = type(exc).__name__
    return bound(mask(text), MAX_ERROR_CHARS, keep_head=MAX_ERROR_CHARS - 512)


def fitted(make: Callable[[str, list[Marker]], E], error: str, inputs: list[Marker], limit: int) -> E:
    """``make(error, inputs)``; if that event is over ``limit`` bytes, one with the first inputs that fit
    (in order) and the error saying how many were left out."""
    event = make(error, inputs)
    if not inputs or len(encode(event)) <= limit:
        return event
    room = limit - len(encode(make(error + _left_out(len(inputs), len(inputs)), [])))
    kept: list[Marker] = []
    for marker in inputs:
        size = len(marker.model_dump_json()) + 1  # and a comma
        if size <= room:
            kept.append(marker)
            room -= size
    while True:  # the sizes were close, not exact (an event's encoding): make sure
        event = make(error + _left_out(len(inputs) - len(kept), len(inputs)), kept)
        if not kept or len(encode(event)) <= limit:
            return event
        kept.pop()


def _left_out(n: int, of: int) -> str:
    return (f" ({n:,} of {of:,} input markers are not in this event: they did not fit in one message of the "
            "bus; the transition_fired event names them all by id)")


# ---------------------------------------------------------------- formatting


def _format_chain(exc: BaseException) -> list[str]:
    chain: list[tuple[BaseException, str | None]] = []  # innermost last, as Python prints them
    seen: set[int] = set()
    current: BaseException | None = exc
    link: str | None = None
    while current is not None and id(current) not in seen and len(chain) < MAX_CHAINED:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, "The above exception was the direct cause of the following exception:"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "During handling of the above exception, another exception occurred:"
        else:
            current = None
    more = current is not None and id(current) not in seen
    lines: list[str] = []
    if more:
        lines.append(f"(earlier exceptions of the chain left out; {MAX_CHAINED} shown)\n\n")
    for i, (each, _) in enumerate(reversed(chain)):
        lines.extend(_format_one(each))
        if i < len(chain) - 1:
            # each link is kept with the exception printed above it
            lines.append(f"\n{chain[len(chain) - 1 - i][1]}\n\n")
    return lines


def _format_one(exc: BaseException) -> list[str]:
    frames = [(frame, lineno) for frame, lineno in traceback.walk_tb(exc.__traceback__)]
    start = 0
    while start < len(frames) and not _is_users(frames[start][0].f_code.co_filename):
        start += 1
    if start < len(frames):  # the way in to the user's function (petribus's, asyncio's) is not theirs
        frames = frames[start:]
    lines: list[str] = []
    if frames:
        lines.append("Traceback (most recent call last):\n")
        if len(frames) > MAX_FRAMES:
            tail = MAX_FRAMES - HEAD_FRAMES
            lines.extend(_format_frames(frames[:HEAD_FRAMES]))
            lines.append(f"  … {len(frames) - MAX_FRAMES:,} frames left out …\n")
            lines.extend(_format_frames(frames[-tail:]))
        else:
            lines.extend(_format_frames(frames))
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return lines


def _format_frames(frames: list[tuple[types.FrameType, int]]) -> list[str]:
    summary = traceback.StackSummary.extract(iter(frames), lookup_lines=True)
    for fs, (frame, _) in zip(summary, frames):
        if _is_users(frame.f_code.co_filename):
            fs.locals = _locals(frame)
    return summary.format()


def _locals(frame: types.FrameType) -> dict[str, str]:
    shown: dict[str, str] = {}
    for name, value in frame.f_locals.items():
        if name.startswith("__") or isinstance(value, (types.ModuleType, types.FunctionType)):
            continue  # imports and helpers: noise next to the values the code worked on
        if len(shown) == MAX_LOCALS:
            shown["…"] = f"{len(frame.f_locals) - MAX_LOCALS} more"
            break
        shown[name] = _repr.repr(value)
    return shown


def _is_internal(filename: str) -> bool:
    return filename.startswith(_INTERNAL)


def _is_users(filename: str) -> bool:
    return not filename.startswith(_INTERNAL) and not filename.startswith(_LIBRARY) and not filename.startswith("<")


class _MaskedRepr(reprlib.Repr):
    """``reprlib``'s short reprs, with secrets masked before anything is cut (no prefix of one survives)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring = 160
        self.maxother = 160
        self.maxlong = 60
        self.maxlevel = 3

    def repr_str(self, x: str, level: int) -> str:
        return super().repr_str(mask(x), level)

    def repr_instance(self, x: Any, level: int) -> str:
        try:
            s = mask(repr(x))
        except Exception:
            return f"<{type(x).__name__} instance at {id(x):#x}>"
        if len(s) > self.maxother:
            i = max(0, (self.maxother - 3) // 2)
            j = max(0, self.maxother - 3 - i)
            s = s[:i] + "..." + s[len(s) - j:]
        return s


_repr = _MaskedRepr()


def _forms(values: Iterable[str]) -> tuple[str, ...]:
    """Each value as written, and escaped as repr and JSON escape it (twice over), longest first."""
    forms = {v for v in values if v}
    for _ in range(2):
        for form in list(forms):
            doubled = form.replace("\\", "\\\\")
            forms.update((json.dumps(form)[1:-1], doubled, doubled.replace("'", "\\'"),
                          doubled.replace('"', '\\"')))
    return tuple(sorted(forms, key=len, reverse=True))
