"""Test app for hand-offs (docs/handoffs.md): the billing bot the support bot hands refunds over to."""

from petribus import Bot, BotContext, BotLocation
from pydantic import BaseModel, Field


class Refund(BaseModel):
    """A refund to make."""

    order: str = Field(description="The order number, as the user gave it.")


class Refunded(BaseModel):
    order: str


bot = Bot(
    model="gpt-test",
    locations=[BotLocation(marker=Refund), BotLocation(marker=Refunded)],
    description="Refunds orders.",
    welcome_message="Billing here.",
)


@bot.transition(inputs={Refund: 1}, outputs=[Refunded], description="Refunds an order.")
def refund(context: BotContext, inputs):
    order = inputs[Refund][0].order
    context.say(f"Refunded order {order}")
    return {Refunded: [Refunded(order=order)]}
