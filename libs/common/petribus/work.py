"""The work command a scheduler sends to an executor pool on PB_WORK (not part of any session log)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from petribus.events import Marker


class WorkItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bot: str
    session_id: str
    firing_id: str
    transition: str
    inputs: list[Marker] = Field(description="The consumed markers, in the transition's input order.")
    fired_seq: int = Field(description="Sequence of the transition_fired event that claimed the inputs.")
    trace: str | None = None

    def msg_id(self) -> str:
        return f"work:{self.firing_id}"
