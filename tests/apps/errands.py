"""Test app for time travel over a whole session: the model adds an errand from the chat; the errand says
something, remembers, asks a yes/no question, asks for a file and sends one back; a purchase waits for
the user's confirmation before it runs."""

import os
import tempfile

from pydantic import BaseModel, Field

from petribus import Bot, BotContext, BotLocation


class Errand(BaseModel):
    """Something to do for the user."""

    what: str = Field(description="What to do, in a few words.")


class Receipt(BaseModel):
    what: str
    approved: bool
    size: int


class Purchase(BaseModel):
    item: str


class Bought(BaseModel):
    item: str


bot = Bot(
    name="errands",
    model="gpt-test",
    locations=[BotLocation(marker=m) for m in (Errand, Receipt, Purchase, Bought)],
    description="Runs errands for the user; asks before it buys anything.",
)


@bot.transition(inputs={Errand: 1}, outputs=[Receipt], description="Runs an errand.")
def run_errand(context: BotContext, inputs):
    what = inputs[Errand][0].what
    context.say(f"Starting: {what}")
    context.remember({"errand": what})
    approved = context.confirm(f"Go ahead with {what}?", timeout=60)
    with open(context.get_file("the shopping list", timeout=60), "rb") as f:
        data = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "receipt.txt")
        with open(path, "wb") as f:
            f.write(data.upper())
        context.send_file(path, "your receipt")
    return {Receipt: [Receipt(what=what, approved=approved, size=len(data))]}


@bot.transition(inputs={Purchase: 1}, outputs=[Bought], confirm=True, description="Buys an item.")
def buy(inputs):
    return {Bought: [Bought(item=inputs[Purchase][0].item)]}
