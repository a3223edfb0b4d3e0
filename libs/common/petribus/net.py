"""The frozen, validated definition of a bot's net, as every service sees it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from petribus.errors import InvalidInput, UnknownHandoff, UnknownLocation

if TYPE_CHECKING:
    from petribus.core import NetShape


@dataclass(frozen=True)
class LocationDef:
    name: str
    model: type[BaseModel]
    expose: bool = True
    description: str | None = None

    def json_schema(self) -> dict[str, Any]:
        return self.model.model_json_schema()


@dataclass(frozen=True)
class TransitionDef:
    name: str
    fn: Callable[..., Any]
    inputs: tuple[tuple[str, int], ...]
    outputs: tuple[str, ...]
    cpu: float = 1.0
    memory: int = 128  # MiB
    gpu: str | None = None  # a GPU type name (Beam's: "T4", "A10G", "H100", ...) or None for any type
    gpu_count: int = 0  # GPUs each firing gets to itself (0: none)
    pool: str = "cpu"  # the executor pool its work goes to (see ``petribus.resources.pool_for``)
    image: Any = None  # a ``petribus.Image``, an image reference (str), or None (the sandbox's default)
    python_packages: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()  # names of the secrets this transition (and no other) sees as env vars
    network: bool = False  # a container sandbox gets a network only when this is True
    callback_url: str | None = None  # each outcome of its firings is POSTed here (never blocking them)
    ttl: float | None = None  # seconds a queued firing may wait for an executor before it fails (Beam's task_policy.ttl)
    description: str | None = None
    expose: bool = True
    confirm: bool = False
    timeout: float | None = None
    retries: int = 0
    concurrency: int | None = None
    when: Callable[..., bool] | None = None
    wants_context: bool = False
    is_async: bool = False
    sandbox: str = "process"


HANDOFF_TOOL_PREFIX = "transfer_to_"
MAX_HANDOFF_NAME = 64 - len(HANDOFF_TOOL_PREFIX)  # a model's tool name is at most 64 characters


@dataclass(frozen=True)
class Handoff:
    """A bot this bot may hand the conversation over to (``Bot(handoffs=[...])``): the model gets a tool
    ``transfer_to_<bot>``, and ``description`` tells it when to use it (docs/handoffs.md)."""

    bot: str
    description: str | None = None

    @property
    def tool(self) -> str:
        """The name of the model's tool that hands over to ``bot``."""
        return f"{HANDOFF_TOOL_PREFIX}{self.bot}"


@dataclass(frozen=True)
class Net:
    bot: str
    description: str
    locations: dict[str, LocationDef]
    transitions: tuple[TransitionDef, ...]
    model: str | None = None
    welcome_message: str | None = None
    authorized: bool = True
    volumes: tuple[Any, ...] = ()  # ``petribus.Volume``s mounted into every transition of the bot
    # The bot's own model endpoint (Beam's Bot(api_key=...)), over the environment's: a SecretStr, never
    # shown (not in repr, not in GET /bots, not in logs).
    api_key: Any = field(default=None, repr=False, compare=False)
    base_url: str | None = None
    handoffs: tuple[Handoff, ...] = ()  # the bots it may hand a conversation over to
    _by_name: dict[str, TransitionDef] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update({t.name: t for t in self.transitions})

    def transition(self, name: str) -> TransitionDef:
        return self._by_name[name]

    def has_transition(self, name: str) -> bool:
        return name in self._by_name

    def handoff(self, bot: str) -> Handoff | None:
        """The hand-off to ``bot``, if this bot may hand over to it."""
        return next((h for h in self.handoffs if h.bot == bot), None)

    def location_of(self, model: type[BaseModel]) -> str | None:
        for loc in self.locations.values():
            if loc.model is model:
                return loc.name
        return None

    def validate_marker(self, location: str, data: Any, *, exposed_only: bool = False) -> dict[str, Any]:
        """Validate ``data`` for ``location`` and return it as JSON-ready data with its real types.

        Raises ``UnknownLocation`` or ``InvalidInput`` naming the problem.
        """
        loc = self.locations.get(location)
        if loc is None or (exposed_only and not loc.expose):
            known = sorted(n for n, l in self.locations.items() if l.expose or not exposed_only)
            raise UnknownLocation(f"unknown location {location!r}; this bot has {known}")
        if not isinstance(data, dict):
            raise InvalidInput(f"marker data for {location} must be a JSON object, got {type(data).__name__}")
        try:
            return loc.model.model_validate(data).model_dump(mode="json")
        except ValidationError as exc:
            raise InvalidInput(f"invalid {location}: {_describe(exc)}") from None

    def judge(self, transition: str, picked: dict[str, list[Any]]) -> tuple[bool, str]:
        """Whether ``transition``'s guard (``when=``) takes these markers (location -> markers with
        ``.data``), and if not, why. Inputs that no longer validate, and a guard that raises, count as
        false: a guard never stops the scheduler. The scheduler and the replay check both ask this."""
        t = self.transition(transition)
        if t.when is None:
            return True, ""
        try:
            inputs = {self.locations[loc].model: [self.locations[loc].model.model_validate(m.data) for m in ms]
                      for loc, ms in picked.items()}
        except (KeyError, ValidationError) as exc:
            return False, f"cannot be asked: its inputs do not validate ({type(exc).__name__})"
        try:
            return (True, "") if t.when(inputs) else (False, "returns false for them")
        except Exception as exc:  # noqa: BLE001  (the guard is user code: raising means no)
            return False, f"raises {type(exc).__name__}: {exc} (taken as false)"

    def shape(self) -> "NetShape":
        from petribus.core import NetShape, TransitionShape

        return NetShape(
            tuple(TransitionShape(t.name, t.inputs, t.concurrency, t.confirm) for t in self.transitions)
        )


def check_handoffs(nets: Iterable[Net]) -> None:
    """Refuse a set of nets in which a bot hands over to a bot that is not among them: a service that
    loads the nets calls it at start, where every bot it serves is known. ``UnknownHandoff`` lists
    every such hand-off, with the bots served."""
    nets = list(nets)
    served = sorted(n.bot for n in nets)
    problems = [f"bot {n.bot!r} hands over to {h.bot!r}, which this deployment does not serve (it serves "
                f"{', '.join(served)}): serve {h.bot!r} too, or drop it from Bot(handoffs=...)"
                for n in nets for h in n.handoffs if h.bot not in served]
    if problems:
        raise UnknownHandoff(problems)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
