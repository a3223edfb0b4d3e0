"""Ids for what a firing does besides returning markers: the same in every run of the firing.

A firing may run more than once: its executor was killed (``kill -9``) after the transition said
something, its heartbeats lapsed and another executor took the work, a scheduler re-dispatched it, or
it failed and is retried. Whatever a run appends (``say``, ``remember``, questions, file requests, sent
files, prompts) is named by the firing and its place in the run: the ``n``-th ``say`` of firing ``F`` is
``F:say:n``, in every run. That key is the event's ``Nats-Msg-Id`` (JetStream drops a second append
within its duplicate window) and, hashed, the event's id and request id (the fold ignores a second one
at any age, and a re-run asks the very question the first run asked, so it reads the answer already
given instead of asking again).

What this cannot cover is outside the log: an HTTP call the transition made before its executor died is
made again by the re-run. ``context.idempotency_key`` (the firing id, the same in every run) is what to
send to such services so that they can drop the repeat.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

_IDS = uuid.UUID("2f6b8d0e-93a1-4c57-8e1d-5a4b3c2d1e0f")


@dataclass(frozen=True)
class Effect:
    key: str  # ``<firing>:<kind>:<n>``: the Nats-Msg-Id
    id: str  # the event id (and request or file id): a uuid5 of the key, hex

    @classmethod
    def of(cls, firing_id: str, kind: str, n: int) -> "Effect":
        key = f"{firing_id}:{kind}:{n}"
        return cls(key, uuid.uuid5(_IDS, key).hex)


@dataclass
class Effects:
    """The effects of one run of one firing, numbered per kind in the order the run makes them.

    ``rerun`` is true when the log shows an earlier run of this firing started; ``known`` holds the ids
    of the effects the log already has (as of the check before this run), which a re-run does not
    append again.
    """

    firing_id: str
    rerun: bool = False
    known: frozenset[str] = frozenset()
    _counts: dict[str, int] = field(default_factory=dict)  # not a Counter: one per firing, cheap to make

    def next(self, kind: str) -> Effect:
        n = self._counts.get(kind, 0)
        self._counts[kind] = n + 1
        return Effect.of(self.firing_id, kind, n)

    def landed(self, effect: Effect) -> bool:
        """Whether an earlier run's ``effect`` is already in the log."""
        return self.rerun and effect.id in self.known
