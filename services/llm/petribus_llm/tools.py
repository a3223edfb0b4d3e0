"""The model's tools: one per exposed location, whose parameters are that marker's JSON schema.

Calling the tool ``UserName`` with ``{"name": "alice"}`` proposes a ``UserName`` marker. Every call is
checked with the marker's own model (``Net.validate_marker``) before it counts; a call that fails gets
a tool result naming the problem, so the model can correct it (``openai_responder`` bounds how often).
Locations with ``expose=False`` have no tool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from petribus.errors import InvalidInput
from petribus.net import LocationDef, Net

from petribus_llm import describe
from petribus_llm.responder import ProposedMarker


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # raw JSON, as the model wrote it


@dataclass(frozen=True)
class Rejected:
    call: ToolCall
    problem: str


def schema(loc: LocationDef) -> dict[str, Any]:
    """The marker model's JSON schema as function parameters (always an object)."""
    params = dict(loc.json_schema())
    params.setdefault("type", "object")
    params.setdefault("properties", {})
    return params


def for_net(net: Net) -> list[dict[str, Any]]:
    """The ``tools`` of a chat completion request for ``net``."""
    out = []
    for loc in describe.exposed_locations(net):
        what = f"Add a {loc.name} marker to the net" + (f" ({loc.description})" if loc.description else "")
        out.append({"type": "function", "function": {
            "name": loc.name,
            "description": f"{what}. Transitions that take {loc.name} fire on their own once their inputs "
                           "are there. Only use values the user gave.",
            "parameters": schema(loc),
        }})
    return out


def check(net: Net, call: ToolCall) -> ProposedMarker | Rejected:
    """The marker ``call`` proposes, validated; or what is wrong with it, in words the model can act on."""
    loc = net.locations.get(call.name)
    if loc is None or not loc.expose:
        names = ", ".join(loc.name for loc in describe.exposed_locations(net)) or "none"
        return Rejected(call, f"there is no tool {call.name!r}; the tools are: {names}")
    try:
        data = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as exc:
        return Rejected(call, f"the arguments are not valid JSON ({exc.msg} at column {exc.colno}); "
                              "send a JSON object with the fields of " + loc.name)
    try:
        return ProposedMarker(loc.name, net.validate_marker(loc.name, data, exposed_only=True))
    except InvalidInput as exc:
        return Rejected(call, exc.message)


def accepted(marker: ProposedMarker) -> str:
    """The tool result of a call that counts."""
    return (f"Accepted: {marker.location} {json.dumps(marker.data, ensure_ascii=False)} will be added to the net. "
            "Do not call the tool again for it.")


def rejected(r: Rejected) -> str:
    """The tool result of a call that does not count: the error, and what to do about it."""
    return (f"Error: {r.problem}. Nothing was added. Call {r.call.name} again with corrected arguments if "
            "the user's words give them; if they don't, ask the user instead of guessing.")


def explain(failures: list[Rejected]) -> str:
    """What the user is told when the model could not get a call right within its corrections."""
    lines = [f"I could not add {r.call.name}: {r.problem}." for r in failures]
    return " ".join(lines) + " Could you give me the missing or corrected details?"
