"""Test app for bus faults: each token is moved (saying so once) and then finished: two firings per token."""

import asyncio

from petribus import Bot, BotContext, BotLocation
from pydantic import BaseModel


class Token(BaseModel):
    n: int


class Moved(BaseModel):
    n: int


class Finished(BaseModel):
    n: int


bot = Bot(
    name="tokens",
    locations=[BotLocation(marker=Token), BotLocation(marker=Moved), BotLocation(marker=Finished)],
    description="Moves each token, then finishes it.",
)


@bot.transition(inputs={Token: 1}, outputs=[Moved], description="Moves a token and says so.")
async def move(context: BotContext, inputs):
    n = inputs[Token][0].n
    context.say(f"moved {n}")
    await asyncio.sleep(0.05)  # long enough that a fault lands while firings are running
    return {Moved: [Moved(n=n)]}


@bot.transition(inputs={Moved: 1}, outputs=[Finished], description="Finishes a moved token.")
def finish(inputs):
    return {Finished: [Finished(n=inputs[Moved][0].n)]}
