"""An invoice bot with a bug, for the debugging loop in the README ("When a step fails").

``parse_amount`` turns the amount a user typed into a number; it fails on "1,200.50" because
``float`` does not take a thousands separator. The failure's ``transition_failed`` shows the
exception, where it happened and the ``Invoice`` it consumed; fix the line marked below (while
``petribus serve --reload`` runs), then fork the session at the step before the failure and watch the
fixed code take it from there.
"""

from pydantic import BaseModel

from petribus import Bot, BotContext, BotLocation


class Invoice(BaseModel):
    customer: str
    amount: str  # as the user typed it, e.g. "1,200.50"


class Amount(BaseModel):
    customer: str
    cents: int


class Booked(BaseModel):
    customer: str
    cents: int


bot = Bot(
    name="invoices",
    locations=[BotLocation(marker=Invoice), BotLocation(marker=Amount, expose=False),
               BotLocation(marker=Booked)],
    description="Books invoices: give it a customer and an amount.",
)


@bot.transition(inputs={Invoice: 1}, outputs=[Amount], description="Reads the amount of an invoice.")
def parse_amount(inputs):
    invoice = inputs[Invoice][0]
    value = float(invoice.amount)  # the bug: "1,200.50" has a thousands separator; fix: .replace(",", "")
    return {Amount: [Amount(customer=invoice.customer, cents=round(value * 100))]}


@bot.transition(inputs={Amount: 1}, outputs=[Booked], description="Books the amount.")
def book(context: BotContext, inputs):
    amount = inputs[Amount][0]
    context.say(f"Booked {amount.cents / 100:.2f} for {amount.customer}")
    return {Booked: [Booked(customer=amount.customer, cents=amount.cents)]}
