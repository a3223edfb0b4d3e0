"""Test app for hand-offs (docs/handoffs.md): a support bot that hands refunds over to the billing bot."""

from petribus import Bot, BotLocation, Handoff
from pydantic import BaseModel


class Ticket(BaseModel):
    """A support ticket."""

    topic: str


bot = Bot(
    model="gpt-test",
    locations=[BotLocation(marker=Ticket)],
    description="Answers support questions.",
    handoffs=[Handoff(bot="handoff_billing", description="refunds and invoices")],
)


@bot.transition(inputs={Ticket: 1}, outputs=[], description="Files a ticket.")
def file_ticket(inputs):
    return {}
