"""Test app for the Python client: an order goes check -> offer_refund -> refund; a Boom always fails."""

from pydantic import BaseModel

from petribus import Bot, BotLocation


class Order(BaseModel):
    id: int


class Checked(BaseModel):
    id: int


class Offer(BaseModel):
    id: int
    amount: int


class Refunded(BaseModel):
    id: int
    amount: int


class Boom(BaseModel):
    why: str


bot = Bot(
    name="client_chain",
    locations=[BotLocation(marker=Order), BotLocation(marker=Checked), BotLocation(marker=Offer),
               BotLocation(marker=Refunded), BotLocation(marker=Boom)],
    description="Checks an order, offers a refund, refunds it.",
)


@bot.transition(inputs={Order: 1}, outputs=[Checked], description="Checks an order.")
def check(inputs):
    return {Checked: [Checked(id=inputs[Order][0].id)]}


@bot.transition(inputs={Checked: 1}, outputs=[Offer], description="Offers a refund of ten per id.")
def offer_refund(inputs):
    order = inputs[Checked][0].id
    return {Offer: [Offer(id=order, amount=10 * order)]}


@bot.transition(inputs={Offer: 1}, outputs=[Refunded], description="Refunds what was offered.")
def refund(inputs):
    offer = inputs[Offer][0]
    return {Refunded: [Refunded(id=offer.id, amount=offer.amount)]}


@bot.transition(inputs={Boom: 1}, description="Always fails, with the marker's reason.")
def explode(inputs):
    raise RuntimeError(inputs[Boom][0].why)
