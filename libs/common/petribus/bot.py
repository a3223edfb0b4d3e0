"""The user's SDK: ``Bot``, ``BotLocation`` and the ``@bot.transition`` decorator.

The decorator only records. ``Bot.net()`` judges the whole definition at once, raises one
:class:`~petribus.errors.NetDefinitionError` listing every problem, and freezes the result into a
:class:`~petribus.net.Net` that the services use.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, SecretStr

from petribus.errors import NetDefinitionError
from petribus.net import LocationDef, Net, TransitionDef

F = TypeVar("F", bound=Callable[..., Any])

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class BotLocation:
    """A place of the net. Its name is the marker model's class name."""

    def __init__(self, marker: type[BaseModel], expose: bool = True, description: str | None = None) -> None:
        self.marker = marker
        self.expose = expose
        self.description = description

    @property
    def name(self) -> str:
        return getattr(self.marker, "__name__", repr(self.marker))

    def __repr__(self) -> str:
        return f"BotLocation(marker={self.name}, expose={self.expose})"


@dataclass
class _Recorded:
    """What ``@bot.transition`` saw, unjudged."""

    fn: Callable[..., Any]
    inputs: Any
    outputs: Any
    options: dict[str, Any] = field(default_factory=dict)


class Bot:
    """A bot: typed locations holding markers, and transitions that fire when their inputs are present.

    ``api_key`` is accepted for Beam compatibility but is better left to the environment
    (``OPENAI_API_KEY``); it is kept as a secret and never logged or sent to a client.
    """

    def __init__(
        self,
        model: str | None = None,
        api_key: str | None = None,
        locations: list[BotLocation] | tuple[BotLocation, ...] = (),
        description: str = "",
        authorized: bool = True,
        welcome_message: str | None = None,
        name: str | None = None,
        base_url: str | None = None,
        **extra: Any,
    ) -> None:
        self.model = model
        self.api_key = SecretStr(api_key) if api_key else None
        self.locations = list(locations)
        self.description = description
        self.authorized = authorized
        self.welcome_message = welcome_message
        self.name = name
        self.base_url = base_url
        self.extra = extra
        self._recorded: list[_Recorded] = []
        self._net: Net | None = None

    def __repr__(self) -> str:
        return f"Bot(name={self.name!r}, model={self.model!r}, locations={len(self.locations)})"

    def location(self, marker: type[BaseModel], expose: bool = True, description: str | None = None) -> None:
        """Add a location after construction (same as passing ``BotLocation`` in ``locations``)."""
        self.locations.append(BotLocation(marker=marker, expose=expose, description=description))
        self._net = None

    def transition(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        inputs: dict[type[BaseModel], int] | None = None,
        outputs: list[type[BaseModel]] | tuple[type[BaseModel], ...] = (),
        cpu: float = 1,
        memory: int = 128,
        gpu: str | int | None = None,
        image: str | None = None,
        python_packages: list[str] | tuple[str, ...] = (),
        description: str | None = None,
        expose: bool = True,
        confirm: bool = False,
        timeout: float | None = None,
        retries: int = 0,
        concurrency: int | None = None,
        when: Callable[..., bool] | None = None,
        name: str | None = None,
        sandbox: str = "process",
    ) -> Any:
        """Record a transition. Nothing is checked here; ``Bot.net()`` checks the whole net at once."""

        def record(f: F) -> F:
            self._recorded.append(
                _Recorded(
                    fn=f,
                    inputs=inputs,
                    outputs=outputs,
                    options=dict(
                        cpu=cpu, memory=memory, gpu=gpu, image=image, python_packages=tuple(python_packages),
                        description=description, expose=expose, confirm=confirm, timeout=timeout,
                        retries=retries, concurrency=concurrency, when=when, name=name, sandbox=sandbox,
                    ),
                )
            )
            self._net = None
            return f

        if fn is not None:
            return record(fn)  # used as a bare ``@bot.transition``
        return record

    def net(self, name: str | None = None) -> Net:
        """Validate the whole bot and return its frozen net. Raises ``NetDefinitionError`` listing all problems."""
        bot_name = name or self.name
        if self._net is not None and self._net.bot == bot_name:
            return self._net
        self._net = _build_net(self, bot_name)
        return self._net


def _build_net(bot: Bot, bot_name: str | None) -> Net:
    problems: list[str] = []
    if bot_name is None:
        problems.append("the bot has no name: pass Bot(name=...) or load it from a file (its stem is the name)")
        bot_name = "bot"
    elif not NAME_RE.match(bot_name):
        problems.append(
            f"bot name {bot_name!r} is not allowed: use letters, digits, '_' or '-' (1-64 chars, not starting with a digit)"
        )

    locations: dict[str, LocationDef] = {}
    by_model: dict[type, str] = {}
    for i, loc in enumerate(bot.locations):
        if not isinstance(loc, BotLocation):
            problems.append(f"locations[{i}] is {loc!r}, not a BotLocation: wrap it as BotLocation(marker=...)")
            continue
        marker = loc.marker
        if not (isinstance(marker, type) and issubclass(marker, BaseModel)):
            problems.append(f"locations[{i}]: marker {marker!r} is not a pydantic BaseModel subclass")
            continue
        if loc.name in locations:
            problems.append(f"location {loc.name!r} is declared twice: each marker type may have one location")
            continue
        if not NAME_RE.match(loc.name):
            problems.append(f"location name {loc.name!r} is not allowed: use letters, digits and '_'")
        locations[loc.name] = LocationDef(
            name=loc.name, model=marker, expose=loc.expose,
            description=loc.description or _own_doc(marker),
        )
        by_model[marker] = loc.name

    def place_of(model: Any, where: str) -> str | None:
        if isinstance(model, type) and model in by_model:
            return by_model[model]
        label = getattr(model, "__name__", repr(model))
        if isinstance(model, type) and issubclass(model, BaseModel):
            problems.append(f"{where}: marker type {label} has no location; add BotLocation(marker={label})")
        else:
            problems.append(f"{where}: {model!r} is not a marker type (a pydantic BaseModel subclass with a location)")
        return None

    transitions: list[TransitionDef] = []
    seen: set[str] = set()
    for rec in bot._recorded:
        opts = rec.options
        tname = opts["name"] or getattr(rec.fn, "__name__", None) or repr(rec.fn)
        where = f"transition {tname!r}"
        if not callable(rec.fn):
            problems.append(f"{where}: {rec.fn!r} is not callable")
            continue
        if tname in seen:
            problems.append(f"{where} is declared twice: transition names must be unique")
        seen.add(tname)
        if not NAME_RE.match(tname):
            problems.append(f"{where}: name is not allowed: use letters, digits, '_' or '-'")

        inputs: list[tuple[str, int]] = []
        if not isinstance(rec.inputs, dict) or not rec.inputs:
            problems.append(f"{where} has no inputs: give inputs={{Marker: count}} with at least one marker type")
        else:
            for model, count in rec.inputs.items():
                place = place_of(model, f"{where} inputs")
                if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    label = getattr(model, "__name__", repr(model))
                    problems.append(f"{where} inputs: count for {label} is {count!r}; it must be a whole number >= 1")
                    continue
                if place is not None:
                    inputs.append((place, count))

        outputs: list[str] = []
        if not isinstance(rec.outputs, (list, tuple)):
            problems.append(f"{where}: outputs must be a list of marker types, got {rec.outputs!r}")
        else:
            for model in rec.outputs:
                place = place_of(model, f"{where} outputs")
                if place is not None and place not in outputs:
                    outputs.append(place)

        wants_context, arity_problem = _signature(rec.fn)
        if arity_problem:
            problems.append(f"{where}: {arity_problem}")
        if not _positive(opts["cpu"]):
            problems.append(f"{where}: cpu={opts['cpu']!r} is not allowed; it must be a positive number")
        if not _positive(opts["memory"]) or opts["memory"] != int(opts["memory"]):
            problems.append(
                f"{where}: memory={opts['memory']!r} is not allowed; it must be a whole number of MiB >= 1")
        if opts["timeout"] is not None and not _positive(opts["timeout"]):
            problems.append(f"{where}: timeout={opts['timeout']!r}; it must be a positive number of seconds or None")
        if isinstance(opts["retries"], bool) or not isinstance(opts["retries"], int) or opts["retries"] < 0:
            problems.append(f"{where}: retries={opts['retries']!r}; it must be a whole number >= 0")
        conc = opts["concurrency"]
        if conc is not None and (isinstance(conc, bool) or not isinstance(conc, int) or conc < 1):
            problems.append(f"{where}: concurrency={conc!r}; it must be a whole number >= 1 or None (unbounded)")
        if opts["when"] is not None and not callable(opts["when"]):
            problems.append(f"{where}: when={opts['when']!r} is not callable")
        if opts["sandbox"] not in ("process", "container"):
            problems.append(f"{where}: sandbox={opts['sandbox']!r}; use 'process' or 'container'")

        gpu = opts["gpu"]
        transitions.append(
            TransitionDef(
                name=tname, fn=rec.fn, inputs=tuple(inputs), outputs=tuple(outputs),
                cpu=float(opts["cpu"]) if _positive(opts["cpu"]) else 1.0,
                memory=int(opts["memory"]) if _positive(opts["memory"]) else 128,
                gpu=str(gpu) if gpu else None, pool="gpu" if gpu else "cpu",
                image=opts["image"], python_packages=opts["python_packages"],
                description=opts["description"] or (inspect.getdoc(rec.fn) or "").strip() or None,
                expose=bool(opts["expose"]), confirm=bool(opts["confirm"]), timeout=opts["timeout"],
                retries=opts["retries"] if isinstance(opts["retries"], int) else 0,
                concurrency=conc, when=opts["when"], wants_context=wants_context,
                is_async=inspect.iscoroutinefunction(rec.fn), sandbox=opts["sandbox"],
            )
        )

    if problems:
        raise NetDefinitionError(problems)
    return Net(
        bot=bot_name, description=bot.description, model=bot.model, welcome_message=bot.welcome_message,
        authorized=bot.authorized, locations=locations, transitions=tuple(transitions),
    )


def _positive(val: Any) -> bool:
    """A real, finite number above zero (``True`` is not a number here, nor is NaN)."""
    return not isinstance(val, bool) and isinstance(val, (int, float)) and math.isfinite(val) and val > 0


def _own_doc(obj: type) -> str | None:
    """The class's own docstring: a model without one must not describe itself with BaseModel's."""
    doc = obj.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _signature(fn: Callable[..., Any]) -> tuple[bool, str | None]:
    """Whether ``fn`` asks for ``context``, and a problem with its parameters if any."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False, None
    from petribus.context import BotContext

    wants_context = False
    others: list[str] = []  # required parameters besides context
    takes_inputs = False  # some parameter can receive the inputs positionally
    for i, p in enumerate(sig.parameters.values()):
        if p.kind is p.VAR_KEYWORD:
            continue
        if p.kind is p.VAR_POSITIONAL:
            takes_inputs = True
            continue
        if p.name == "context" or p.annotation is BotContext or p.annotation == "BotContext":
            wants_context = True
            if i != 0:
                return True, (
                    f"'{p.name}' must be the first parameter: a transition takes (inputs) or (context, inputs)")
            continue
        if p.kind is not p.KEYWORD_ONLY:
            takes_inputs = True
        if p.default is p.empty:
            others.append(p.name)
    if len(others) > 1:
        return wants_context, (
            f"takes parameters {others}; a transition takes (inputs) or (context, inputs)"
        )
    if not takes_inputs:
        return wants_context, "takes no parameter for its inputs; a transition takes (inputs) or (context, inputs)"
    return wants_context, None
