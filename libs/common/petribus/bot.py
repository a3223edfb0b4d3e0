"""The user's SDK: ``Bot``, ``BotLocation`` and the ``@bot.transition`` decorator.

The decorator only records. ``Bot.net()`` judges the whole definition at once, raises one
:class:`~petribus.errors.NetDefinitionError` listing every problem, and freezes the result into a
:class:`~petribus.net.Net` that the services use.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, SecretStr

from petribus import resources
from petribus.errors import NetDefinitionError
from petribus.graph import FORMATS, Picture, render
from petribus.net import MAX_HANDOFF_NAME, Handoff, LocationDef, Net, TransitionDef
from petribus.resources import Image, TaskPolicy, Volume

F = TypeVar("F", bound=Callable[..., Any])

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")

# Beam options petribus does not implement: refused by ``Bot.net()`` with what to do instead, never ignored.
BEAM_BOT_OPTIONS = {
    "disks": "Beam's durable disks are not supported; use volumes=[Volume(name=..., mount_path=...)]",
}
BEAM_TRANSITION_OPTIONS = {
    "volumes": "volumes belong to the bot in petribus: Bot(volumes=[Volume(...)]) mounts them into every transition",
    "keep_warm": "set PETRIBUS_CONTAINER_WARM on the executor (idle containers kept per transition)",
    "keep_warm_seconds": "set PETRIBUS_CONTAINER_WARM on the executor (idle containers kept per transition)",
    "max_pending": "use task_policy=TaskPolicy(ttl=...) to bound how long a firing may wait, or concurrency=",
    "max_pending_tasks": "use task_policy=TaskPolicy(ttl=...) to bound how long a firing may wait, or concurrency=",
    "handler": "petribus runs the decorated function itself; drop handler=",
    "env": "use secrets=['NAME'] for secret values, or Image(env_vars={...}) for plain settings",
    "block_network": "a container has no network unless network=True; drop block_network=",
    "allow_list": "per-address network rules are not supported; use network=True or False",
    "workers": "set --workers / PETRIBUS_WORKERS on the executor",
    "concurrent_requests": "use concurrency= (firings of this transition at once)",
    "autoscaler": "run more executors for the pool (petribus executor --pool NAME)",
    "checkpoint_enabled": "checkpoints are not supported; drop checkpoint_enabled=",
    "on_start": "do the setup at import time of the app, or lazily in the transition",
    "ports": "transitions do not serve ports in petribus; drop ports=",
    "docker_enabled": "docker inside a transition is not supported; drop docker_enabled=",
}


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
    extra: dict[str, Any] = field(default_factory=dict)  # keywords petribus does not have


class Bot:
    """A bot: typed locations holding markers, and transitions that fire when their inputs are present.

    ``api_key`` and ``base_url`` (Beam's) are this bot's model endpoint, used for its model calls over
    the environment's ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL``; the key is kept as a secret and never
    logged or sent to a client (reading it from the environment in the app keeps it out of the code).
    ``volumes`` are
    :class:`~petribus.Volume` folders mounted into every transition. ``handoffs`` names the bots this one
    may hand a conversation over to (a name, or ``Handoff(bot=..., description=...)``): its model gets a
    tool for each (docs/handoffs.md); the services that load the nets refuse a target they do not serve. Other keywords (Beam's ``disks``, a
    typo) are refused by ``Bot.net()``, naming each.
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
        volumes: list[Volume] | tuple[Volume, ...] | None = None,
        handoffs: list[str | Handoff] | tuple[str | Handoff, ...] = (),
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
        self.volumes = volumes
        self.handoffs = handoffs
        self.extra = extra  # options petribus does not have: Bot.net() refuses each, naming it
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
        cpu: float | str = 1,
        memory: int | str = 128,
        gpu: str | list[str] | int | None = None,
        gpu_count: int | None = None,
        pool: str | None = None,
        image: Image | str | None = None,
        python_packages: list[str] | tuple[str, ...] = (),
        secrets: list[str] | tuple[str, ...] | None = None,
        network: bool = False,
        callback_url: str | None = None,
        task_policy: TaskPolicy | None = None,
        description: str | None = None,
        expose: bool = True,
        confirm: bool = False,
        timeout: float | None = None,
        retries: int | None = None,
        concurrency: int | None = None,
        when: Callable[..., bool] | None = None,
        name: str | None = None,
        sandbox: str | None = None,
        **extra: Any,
    ) -> Any:
        """Record a transition. Nothing is checked here; ``Bot.net()`` checks the whole net at once.

        Beam's options keep Beam's names and meaning: ``cpu`` (cores, or ``"500m"``), ``memory`` (MiB, or
        ``"2Gi"``), ``gpu`` (a type such as ``"A10G"``, ``"any"``, or a list of types) with ``gpu_count``,
        ``image`` (an :class:`~petribus.Image`; a tag string also works), ``secrets`` (names, see
        ``docs/secrets.md``), ``callback_url`` and ``task_policy`` (:class:`~petribus.TaskPolicy`).
        ``pool`` names the executor pool (default: from ``gpu``); ``network`` gives a container a network;
        ``sandbox`` is ``"process"`` or ``"container"`` (default: a container when there is an image).
        Any other keyword is refused by ``Bot.net()``, naming it.
        """

        def record(f: F) -> F:
            self._recorded.append(
                _Recorded(
                    fn=f,
                    inputs=inputs,
                    outputs=outputs,
                    options=dict(
                        cpu=cpu, memory=memory, gpu=gpu, gpu_count=gpu_count, pool=pool, image=image,
                        python_packages=python_packages, secrets=secrets, network=network,
                        callback_url=callback_url, task_policy=task_policy,
                        description=description, expose=expose, confirm=confirm, timeout=timeout,
                        retries=retries, concurrency=concurrency, when=when, name=name, sandbox=sandbox,
                    ),
                    extra=dict(extra),
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

    def visualize(self, format: str = "svg", marking: dict[str, int] | None = None) -> Picture:
        """The net as a picture (``petribus.graph``): in a notebook it shows itself (an SVG, or a Mermaid
        chart); ``str()`` is its text. ``format`` is svg, mermaid, dot or json; ``marking`` (location ->
        number of markers) is drawn in the places. A bot with no name yet (one made in a notebook) is
        drawn as ``bot``."""
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; the formats are {', '.join(FORMATS)}")
        return Picture(render(self.net(self.name or "bot"), format, marking), format)  # type: ignore[arg-type]


def _build_net(bot: Bot, bot_name: str | None) -> Net:
    problems: list[str] = []
    if bot_name is None:
        problems.append("the bot has no name: pass Bot(name=...) or load it from a file (its stem is the name)")
        bot_name = "bot"
    elif not NAME_RE.match(bot_name):
        problems.append(
            f"bot name {bot_name!r} is not allowed: use letters, digits, '_' or '-' (1-64 chars, not starting with a digit)"
        )

    for key in bot.extra:
        hint = BEAM_BOT_OPTIONS.get(key, f"the options are {', '.join(_BOT_OPTIONS)}")
        problems.append(f"Bot({key}=...) is not supported by petribus: {hint}")
    volumes = resources.judge_volumes(bot.volumes, problems)

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
        for key in rec.extra:
            hint = BEAM_TRANSITION_OPTIONS.get(key, f"the options are {', '.join(_TRANSITION_OPTIONS)}")
            problems.append(f"{where}: {key}= is not supported by petribus: {hint}")
        conc = opts["concurrency"]
        if conc is not None and (isinstance(conc, bool) or not isinstance(conc, int) or conc < 1):
            problems.append(f"{where}: concurrency={conc!r}; it must be a whole number >= 1 or None (unbounded)")
        if opts["when"] is not None and not callable(opts["when"]):
            problems.append(f"{where}: when={opts['when']!r} is not callable")
        res = resources.judge(opts, where, problems)

        transitions.append(
            TransitionDef(
                name=tname, fn=rec.fn, inputs=tuple(inputs), outputs=tuple(outputs), **res,
                description=opts["description"] or (inspect.getdoc(rec.fn) or "").strip() or None,
                expose=bool(opts["expose"]), confirm=bool(opts["confirm"]),
                concurrency=conc, when=opts["when"], wants_context=wants_context,
                is_async=inspect.iscoroutinefunction(rec.fn),
            )
        )

    handoffs = _judge_handoffs(bot.handoffs, bot_name, locations, problems)
    if problems:
        raise NetDefinitionError(problems)
    return Net(
        bot=bot_name, description=bot.description, model=bot.model, welcome_message=bot.welcome_message,
        authorized=bot.authorized, locations=locations, transitions=tuple(transitions), volumes=volumes,
        api_key=bot.api_key, base_url=bot.base_url, handoffs=handoffs,
    )


def _judge_handoffs(given: Any, bot_name: str, locations: dict[str, LocationDef],
                    problems: list[str]) -> tuple[Handoff, ...]:
    """``Bot(handoffs=...)`` as ``Handoff``s. Whether each target is served is for the services that load
    the nets to say (``petribus.net.check_handoffs``): here only its shape is judged."""
    if given is None:
        return ()
    if isinstance(given, (str, Handoff)) or not isinstance(given, (list, tuple)):
        problems.append(f"handoffs={given!r}: give a list of bot names or Handoff(bot=..., description=...)")
        return ()
    out: list[Handoff] = []
    for i, item in enumerate(given):
        h = Handoff(item) if isinstance(item, str) else item
        if not isinstance(h, Handoff) or not isinstance(h.bot, str):
            problems.append(f"handoffs[{i}] is {item!r}: give a bot name or Handoff(bot=..., description=...)")
            continue
        if not NAME_RE.match(h.bot) or len(h.bot) > MAX_HANDOFF_NAME:
            problems.append(f"handoffs[{i}]: {h.bot!r} is not a bot name a hand-off can use: letters, digits, "
                            f"'_' or '-', 1-{MAX_HANDOFF_NAME} characters, not starting with a digit")
        elif h.bot == bot_name:
            problems.append(f"handoffs[{i}]: bot {h.bot!r} cannot hand over to itself")
        elif any(o.bot == h.bot for o in out):
            problems.append(f"handoffs[{i}]: {h.bot!r} is named twice")
        elif h.tool in locations:
            problems.append(f"handoffs[{i}]: the hand-off tool {h.tool!r} has the name of a location; rename "
                            "the location's marker type")
        else:
            out.append(h)
    return tuple(out)


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


_BOT_OPTIONS = [p for p in inspect.signature(Bot.__init__).parameters if p not in ("self", "extra")]
_TRANSITION_OPTIONS = [p for p in inspect.signature(Bot.transition).parameters if p not in ("self", "fn", "extra")]
