"""The model's tools: one per exposed location, whose parameters are that marker's JSON schema.

Calling the tool ``UserName`` with ``{"name": "alice"}`` proposes a ``UserName`` marker. Every call is
checked with the marker's own model (``Net.validate_marker``) before it counts; a call that fails gets
a tool result naming the problem, so the model can correct it (``openai_responder`` bounds how often).
Locations with ``expose=False`` have no tool.

Each bot this one may hand over to (``Bot(handoffs=...)``) is a tool too, ``transfer_to_<bot>``, with
one argument, ``request``: what that bot is asked. Calling it proposes a hand-off (docs/handoffs.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from petribus.errors import InvalidInput
from petribus.net import Handoff, LocationDef, Net

from petribus_llm import describe
from petribus_llm.responder import ProposedHandoff, ProposedMarker


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
    out.extend(handoff_tool(h) for h in net.handoffs)
    return out


def handoff_tool(h: Handoff) -> dict[str, Any]:
    """The tool that hands the conversation over to ``h.bot``."""
    what = f" ({h.description})" if h.description else ""
    return {"type": "function", "function": {
        "name": h.tool,
        "description": f"Hand the conversation over to the bot {h.bot}{what}. Use it when what the user "
                       f"wants is {h.bot}'s to do, not yours: a new session of {h.bot} starts with the "
                       "request, and the user is told to follow it there.",
        "parameters": {"type": "object", "properties": {"request": {
            "type": "string",
            "description": f"What the user wants from {h.bot}, in the user's words, with every detail they gave."}},
            "required": ["request"]},
    }}


def check(net: Net, call: ToolCall, asked: str = "") -> ProposedMarker | ProposedHandoff | Rejected:
    """The marker or hand-off ``call`` proposes, validated; or what is wrong with it, in words the model
    can act on. ``asked`` (the user's message) is the request of a hand-off whose call gives none."""
    handoff = next((h for h in net.handoffs if h.tool == call.name), None)
    if handoff is not None:
        return _handoff(handoff, call, asked)
    loc = net.locations.get(call.name)
    if loc is None or not loc.expose:
        names = ", ".join([loc.name for loc in describe.exposed_locations(net)]
                          + [h.tool for h in net.handoffs]) or "none"
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


def _handoff(h: Handoff, call: ToolCall, asked: str) -> ProposedHandoff | Rejected:
    try:
        data = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as exc:
        return Rejected(call, f"the arguments are not valid JSON ({exc.msg} at column {exc.colno}); "
                              'send {"request": "..."}')
    request = data.get("request") if isinstance(data, dict) else None
    if request is not None and not isinstance(request, str):
        return Rejected(call, "request must be a string: what the user wants from " + h.bot)
    request = (request or "").strip() or asked.strip()
    if not request:
        return Rejected(call, f"request is empty: say what the user wants from {h.bot}")
    return ProposedHandoff(h.bot, request)


def accepted(proposed: ProposedMarker | ProposedHandoff) -> str:
    """The tool result of a call that counts."""
    if isinstance(proposed, ProposedHandoff):
        return (f"Accepted: the conversation is handed over to {proposed.bot}, which gets the request; the "
                "user is told where to follow it. Tell the user briefly, and do not call the tool again.")
    marker = proposed
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
