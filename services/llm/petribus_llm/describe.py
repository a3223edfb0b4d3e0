"""What a bot can do, in words: its exposed locations (fields and types) and transitions.

Built from the net alone (the pydantic JSON schema of each marker model), so the text always matches
what ``Net.validate_marker`` accepts. Locations and transitions with ``expose=False`` are never named.
"""

from __future__ import annotations

import json
from typing import Any

from petribus.net import LocationDef, Net, TransitionDef


def exposed_locations(net: Net) -> list[LocationDef]:
    return [loc for loc in net.locations.values() if loc.expose]


def exposed_transitions(net: Net) -> list[TransitionDef]:
    return [t for t in net.transitions if t.expose]


def type_name(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    """A short, human name for a JSON-schema type: ``string``, ``list of integer``, ``string or null``."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"{name} object"
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(type_name(s, defs) for s in schema[key])
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return type_name(schema["allOf"][0], defs)
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array":
        items = schema.get("items")
        return f"list of {type_name(items, defs)}" if isinstance(items, dict) and items else "list"
    if kind == "object":
        extra = schema.get("additionalProperties")
        return f"object of {type_name(extra, defs)}" if isinstance(extra, dict) and extra else "object"
    if kind == "string" and "format" in schema:
        return f"string ({schema['format']})"
    return str(kind or "any")


def fields(loc: LocationDef) -> list[tuple[str, str, bool, dict[str, Any]]]:
    """(name, type, required, field schema) for each field of the location's model."""
    schema = loc.json_schema()
    defs = schema.get("$defs", {})
    required = set(schema.get("required", []))
    return [(name, type_name(prop, defs), name in required, prop)
            for name, prop in schema.get("properties", {}).items()]


def example_value(prop: dict[str, Any], defs: dict[str, Any]) -> Any:
    if "default" in prop:
        return prop["default"]
    if "enum" in prop:
        return prop["enum"][0]
    if "const" in prop:
        return prop["const"]
    if "$ref" in prop:
        target = defs.get(prop["$ref"].rsplit("/", 1)[-1], {})
        return {name: example_value(p, defs) for name, p in target.get("properties", {}).items()
                if name in set(target.get("required", []))}
    for key in ("anyOf", "oneOf"):
        if key in prop:
            options = [s for s in prop[key] if s.get("type") != "null"] or prop[key]
            return example_value(options[0], defs)
    kind = prop.get("type")
    return {"string": "...", "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {},
            "null": None}.get(kind if isinstance(kind, str) else "", "...")


def example(loc: LocationDef) -> dict[str, Any]:
    """An example of the location's data with its required fields (what ``/add`` needs at least)."""
    schema = loc.json_schema()
    defs = schema.get("$defs", {})
    required = set(schema.get("required", []))
    return {name: example_value(prop, defs) for name, prop in schema.get("properties", {}).items()
            if name in required}


def add_example(loc: LocationDef) -> str:
    return f"/add {loc.name} {json.dumps(example(loc))}"


def describe_location(loc: LocationDef) -> str:
    desc = loc.description
    lines = [f"  • {loc.name}" + (f": {desc}" if desc else "")]
    found = fields(loc)
    if not found:
        lines.append("      (no fields)")
    for name, kind, required, prop in found:
        note = "required" if required else f"optional, default {json.dumps(prop.get('default'))}"
        text = f"      {name}: {kind} ({note})"
        if prop.get("description"):
            text += f" — {prop['description']}"
        lines.append(text)
    return "\n".join(lines)


def _places(net: Net, items: list[tuple[str, int | None]]) -> str:
    shown = [f"{n} {loc}" if n else loc for loc, n in items if net.locations[loc].expose]
    hidden = sum(1 for loc, _ in items if not net.locations[loc].expose)
    if hidden:
        shown.append("internal markers" if hidden > 1 else "an internal marker")
    return ", ".join(shown) or "nothing"


def describe_transition(net: Net, t: TransitionDef) -> str:
    ins = _places(net, list(t.inputs))
    outs = _places(net, [(loc, None) for loc in t.outputs])
    lines = [f"  • {t.name}" + (f": {t.description}" if t.description else "")]
    lines.append(f"      takes {ins}; gives {outs}" + ("; asks you to confirm first" if t.confirm else ""))
    return "\n".join(lines)


def how_to_add(net: Net) -> str:
    locs = exposed_locations(net)
    if not locs:
        return "This bot takes no markers from you."
    first = locs[0]
    return (
        "To add a marker, type /add, the location, then its fields as a JSON object, e.g.\n"
        f"  {add_example(first)}\n"
        "A transition fires on its own as soon as all of its inputs are there."
    )


def capabilities(net: Net) -> str:
    """The whole description: what the bot is, what it takes, what it does, how to drive it."""
    parts = [net.description.strip() or f"This is the {net.bot} bot."]
    locs = exposed_locations(net)
    if locs:
        parts.append("Locations (markers you can add):\n" + "\n".join(describe_location(loc) for loc in locs))
    transitions = exposed_transitions(net)
    if transitions:
        parts.append("Transitions (what I do with them):\n"
                     + "\n".join(describe_transition(net, t) for t in transitions))
    parts.append(how_to_add(net))
    parts.append("Commands: /add LOCATION {json}, /help.")
    return "\n\n".join(parts)
