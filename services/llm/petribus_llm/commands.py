"""Explicit chat commands, answered the same way with or without a model.

``/add LOCATION {json}`` turns into a validated marker; ``/help`` describes the bot. A command that
cannot be honoured gets a reply saying what was wrong and what to type instead; nothing invalid is
ever proposed.
"""

from __future__ import annotations

import json
import re

from petribus.errors import InvalidInput
from petribus.net import Net

from petribus_llm import describe
from petribus_llm.responder import ProposedMarker, Reply

_SPLIT = re.compile(r"\s+")


def handle(net: Net, text: str) -> Reply | None:
    """The reply to a command, or ``None`` when ``text`` is not a command (free text for the responder)."""
    stripped = text.strip()
    if not stripped.startswith("/"):
        return None
    cmd, *rest = _SPLIT.split(stripped, maxsplit=1)
    args = rest[0] if rest else ""
    match cmd.lower():
        case "/help" | "/?":
            return Reply(describe.capabilities(net))
        case "/add":
            return add(net, args)
        case _:
            return Reply(f"I don't know the command {cmd}. I understand /add LOCATION {{json}} and /help.\n\n"
                         + describe.how_to_add(net))


def add(net: Net, args: str) -> Reply:
    locations = describe.exposed_locations(net)
    names = ", ".join(loc.name for loc in locations) or "none"
    if not locations:
        return Reply("This bot takes no markers from you, so there is nothing to /add.")
    if not args:
        return Reply(f"/add needs a location and its fields. Locations: {names}.\n"
                     f"For example: {describe.add_example(locations[0])}")
    name, *rest = _SPLIT.split(args, maxsplit=1)
    raw = rest[0].strip() if rest else ""
    loc = net.locations.get(name)
    if loc is None or not loc.expose:
        close = [c for c in locations if c.name.lower() == name.lower()]
        hint = f"Did you mean {close[0].name}? " if close else ""
        return Reply(f"I can't add a marker to {name!r}: this bot has no such location. {hint}"
                     f"Locations you can add to: {names}.\n"
                     f"For example: {describe.add_example(close[0] if close else locations[0])}")
    if not raw:
        if describe.example(loc):
            return Reply(f"Give the fields of {loc.name} as a JSON object after its name, for example:\n"
                         f"  {describe.add_example(loc)}\n\n{describe.describe_location(loc)}")
        raw = "{}"
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        return Reply(f"The fields of {loc.name} are not valid JSON ({exc.msg} at column {exc.colno} of "
                     f"{raw!r}). JSON needs double quotes around names and strings, for example:\n"
                     f"  {describe.add_example(loc)}")
    try:
        valid = net.validate_marker(loc.name, data, exposed_only=True)
    except InvalidInput as exc:
        return Reply(f"Not added: {exc.message}.\n{loc.name} takes:\n{describe.describe_location(loc)}\n"
                     f"For example: {describe.add_example(loc)}")
    return Reply(f"Added {loc.name} {json.dumps(valid)}.", (ProposedMarker(loc.name, valid),))
