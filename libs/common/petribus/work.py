"""The work command a scheduler sends to an executor pool on PB_WORK (not part of any session log).

One item per firing, on its own subject (``subjects.work_item``), so whether a firing still has work
waiting or running is one look-up; the executors of a pool share one consumer over ``subjects.work``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from petribus import subjects
from petribus.events import Marker


class WorkItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bot: str
    session_id: str
    firing_id: str
    transition: str
    inputs: list[Marker] = Field(description="The consumed markers, in the transition's input order.")
    fired_seq: int = Field(description="Sequence of the transition_fired event that claimed the inputs "
                           "(0 while claim_pending: not known yet).")
    trace: str | None = None
    fresh: bool = Field(default=False, description="Sent by the scheduler that made the claim, right after it "
                        "was durable or together with it (claim_pending): the firing's first and only first "
                        "dispatch. Its first delivery needs no look at the log (the firing cannot have "
                        "started or ended yet; one sent with its claim waits for the claim's republish "
                        "instead); any other needs one.")
    claim_pending: bool = Field(default=False, description="Sent together with its claim, before the claim "
                                "was known to land: it may run only once its claim is known stored (its "
                                "republish on pb.landed, or the log). An older executor refuses the field.")

    def msg_id(self, redispatch: str | None = None) -> str:
        """``work:<firing>`` for the first dispatch (however many schedulers send it, one lands);
        ``work:<firing>:<redispatch>`` for a later one that replaces a lost item."""
        return f"work:{self.firing_id}" if redispatch is None else f"work:{self.firing_id}:{redispatch}"

    def subject(self, pool: str) -> str:
        return subjects.work_item(pool, self.bot, self.session_id, self.firing_id)
