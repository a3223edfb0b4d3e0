"""Cancel a user's order, then offer a refund: the Beam Bots example, unchanged but for the import.

    petribus serve examples/order_bot.py:bot

then type ``/add UserName {"name": "alice"}`` (or, with a model configured, "please cancel alice's order").
"""

from pydantic import BaseModel

from petribus import Bot, BotContext, BotLocation


class UserName(BaseModel):
    name: str


class OrderStatus(BaseModel):
    message: str


class RefundStatus(BaseModel):
    message: str


bot = Bot(
    model="gpt-4o",
    locations=[BotLocation(marker=UserName), BotLocation(marker=OrderStatus), BotLocation(marker=RefundStatus)],
    description="A simple bot to cancel orders and offer refunds.",
)


@bot.transition(
    cpu=1, memory=128, inputs={UserName: 1}, outputs=[OrderStatus],
    description="Cancels a user's order.", confirm=False, expose=True,
)
def cancel_order(context: BotContext, inputs):
    name = inputs[UserName][0].name
    context.say(f"Order cancelled for {name}")
    return {OrderStatus: [OrderStatus(message=f"order_cancelled for {name}")]}


@bot.transition(
    cpu=1, memory=128, inputs={OrderStatus: 1}, outputs=[RefundStatus],
    description="Offers a refund for a cancelled order.",
)
def offer_refund(context: BotContext, inputs):
    status = inputs[OrderStatus][0]
    context.say(f"A refund has been offered ({status.message})")
    return {RefundStatus: [RefundStatus(message="refund_offered")]}
