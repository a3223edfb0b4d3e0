"""What the model reads: a system prompt built from the net and the session, then the conversation.

The system prompt says what the bot is (its description), the rules (never invent data the user did
not give; ask instead), the exposed locations with their fields (each one is a tool) and the exposed
transitions with their descriptions, inputs and outputs; then the session as its log has it now:
markers waiting, firings in flight, memory and recent events. ``expose=False`` locations and
transitions are never named.

**The context budget** (``PETRIBUS_LLM_CONTEXT_CHARS``, characters, ~4 per token) is kept by this rule:

1. The system prompt always goes in. Its session part is capped: at most ``MAX_MARKERS`` markers per
   location, and the newest memory items and events that fit in a quarter (events) and an eighth
   (memory, markers) of the budget.
2. What is being answered (the user's message or the transition's question) always goes in, cut to
   half the budget if it is longer.
3. Earlier turns are added newest first while everything stays within the budget. The first turn
   that does not fit, and every older one, is dropped; the system prompt then says how many were
   dropped and quotes the start of the last few user messages among them (a short summary).

So a long session keeps its newest turns, the current state of the net, and a trace of what went
before, and one request never outgrows the budget by more than the net's own description.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from petribus.net import Net

from petribus_llm import describe
from petribus_llm.conversation import Conversation, Turn
from petribus_llm.responder import Ask

MAX_MARKERS = 20  # per location
ITEM_CHARS = 300  # one marker, memory item or event
SUMMARY_USER_TURNS = 3
SUMMARY_QUOTE_CHARS = 120
SUMMARY_RESERVE = 700  # room kept for the summary line of dropped turns
TURN_OVERHEAD = 16  # a message's role and framing, in characters

RULES = """\
Rules:
- Never invent data the user did not give. If a required field is missing, unclear or ambiguous, ask \
the user for it instead of calling a tool, and never fill a field with a guess or a placeholder.
- Call several tools in one reply when the user gives several things at once.
- A tool call that comes back with an error added nothing: correct it only with what the user said, \
or ask the user.
- You do not run transitions; adding the markers they take is what makes them fire.
- Keep answers short and in the user's language."""


def system_prompt(net: Net, conv: Conversation, *, budget: int, before: int,
                  dropped: Sequence[Turn] = ()) -> str:
    """The system prompt for an ask at log sequence ``before`` (events from then on are not shown)."""
    parts = [
        f'You are the assistant of the bot "{net.bot}". It works as a Petri net: typed locations hold '
        "markers, and transitions fire on their own as soon as their inputs are present.",
    ]
    if net.description.strip():
        parts.append(f"What the bot does: {net.description.strip()}")
    parts.append("Your job: understand what the user wants and turn it into markers by calling the tools, "
                 "one tool per location; then tell the user briefly what you did or what you need.")
    parts.append(RULES)
    locs = describe.exposed_locations(net)
    parts.append("Locations (each is a tool; its arguments are the marker's fields):\n"
                 + ("\n".join(describe.describe_location(loc) for loc in locs) if locs else "  (none)"))
    if net.handoffs:
        parts.append("Other bots you can hand the conversation over to, with their tool, when what the user "
                     "wants is theirs to do and not yours:\n"
                     + "\n".join(f"  - {h.bot} ({h.tool})" + (f": {h.description}" if h.description else "")
                                  for h in net.handoffs))
    transitions = describe.exposed_transitions(net)
    if transitions:
        parts.append("Transitions (they fire on their own once their inputs are present):\n"
                     + "\n".join(describe.describe_transition(net, t) for t in transitions))
    parts.append(session(net, conv, budget=budget, before=before))
    if dropped:
        parts.append(summary(dropped))
    return "\n\n".join(parts)


def session(net: Net, conv: Conversation, *, budget: int, before: int) -> str:
    """The session now: markers waiting, firings in flight, memory and recent events."""
    lines = ["The session now:"]
    lines.append("Markers waiting:" + _block(_markers(net, conv), budget // 8, newest_first=False))
    running = [_firing(f.transition, f.status) for f in conv.state.in_flight.values()
               if net.has_transition(f.transition) and net.transition(f.transition).expose]
    lines.append("Transitions in flight: " + (", ".join(running) if running else "none"))
    memory = [_cut(_json(m), ITEM_CHARS) for m in conv.state.memory]
    lines.append("Memory (what transitions asked to remember, oldest first):"
                 + _block(memory, budget // 8, newest_first=True))
    events = [f"#{n.seq} {n.text}" for n in conv.notes if n.seq < before]
    lines.append("Recent events (oldest first):" + _block(events, budget // 4, newest_first=True))
    return "\n".join(lines)


def summary(dropped: Sequence[Turn]) -> str:
    said = [t for t in dropped if t.role == "user"][-SUMMARY_USER_TURNS:]
    text = (f"Earlier conversation: {len(dropped)} older message(s) are left out to fit your context.")
    if said:
        quotes = "; ".join(json.dumps(_cut(t.text, SUMMARY_QUOTE_CHARS), ensure_ascii=False) for t in said)
        text += f" The last user messages among them said: {quotes}."
    return text


def question(ask: Ask) -> str:
    """The final user turn: the message itself, or a transition's prompt framed as one."""
    if ask.kind == "message":
        return ask.text
    who = ask.transition or "an internal step"  # a hidden (expose=False) transition is not named
    shown = ("your answer is shown to the user as it is" if ask.shown
             else "the user does not see it; your answer goes back to the transition")
    return (f"A running transition, {who}, asks you this ({shown}). Answer it directly in text, using the "
            f"conversation and the session above:\n\n{ask.text}")


def messages(net: Net, conv: Conversation, ask: Ask, *, budget: int) -> list[dict[str, Any]]:
    """The chat messages for ``ask``: system prompt, the newest earlier turns that fit, the ask."""
    last = _cut(question(ask), max(1, budget // 2))
    prior = conv.history(ask.seq)
    fixed = system_prompt(net, conv, budget=budget, before=ask.seq)
    room = budget - len(fixed) - len(last) - TURN_OVERHEAD - SUMMARY_RESERVE
    kept: list[Turn] = []
    for turn in reversed(prior):
        cost = len(turn.text) + TURN_OVERHEAD
        if cost > room:
            break
        room -= cost
        kept.append(turn)
    kept.reverse()
    dropped = prior[: len(prior) - len(kept)]
    system = system_prompt(net, conv, budget=budget, before=ask.seq, dropped=dropped) if dropped else fixed
    out: list[dict[str, Any]] = [{"role": "system", "content": system}]
    for role, text in [(t.role, t.text) for t in kept] + [("user", last)]:
        if out[-1]["role"] == role:  # some chat templates refuse two turns of one role in a row
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": role, "content": text})
    return out


def size(messages: Sequence[dict[str, Any]]) -> int:
    """Characters a request's messages take, as the budget counts them."""
    return sum(len(m.get("content") or "") + TURN_OVERHEAD for m in messages)


def _markers(net: Net, conv: Conversation) -> list[str]:
    out = []
    for loc, markers in conv.state.marking().items():
        if loc not in net.locations or not net.locations[loc].expose:
            continue
        for m in markers[:MAX_MARKERS]:
            out.append(_cut(f"{loc} {_json(m.data)}", ITEM_CHARS))
        if len(markers) > MAX_MARKERS:
            out.append(f"… and {len(markers) - MAX_MARKERS} more {loc}")
    return out


def _firing(transition: str, status: str) -> str:
    what = {"awaiting_confirmation": "waiting for the user's confirmation", "claimed": "starting",
            "started": "running"}.get(status, status)
    return f"{transition} ({what})"


def _block(items: list[str], limit: int, *, newest_first: bool) -> str:
    """Items as an indented list within ``limit`` characters; the newest kept when ``newest_first``."""
    if not items:
        return " none"
    chosen: list[str] = []
    room = limit
    for item in reversed(items) if newest_first else items:
        if len(item) + 5 > room:
            break
        room -= len(item) + 5
        chosen.append(item)
    if newest_first:
        chosen.reverse()
    left = len(items) - len(chosen)
    lines = [f"  - {c}" for c in chosen]
    if left:
        lines.insert(0 if newest_first else len(lines), f"  ({left} {'older ' if newest_first else ''}not shown)")
    return "\n" + "\n".join(lines)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"

